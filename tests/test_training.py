"""TopK SAE training: it learns, keeps decoder rows unit-norm, revives dead latents, resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monitor.training.trainer import TopKTrainer, TrainOptions, drop_massive_activations

D_IN, D_SAE = 32, 128


def synthetic_activations(rows: int = 8192, seed: int = 0) -> np.ndarray:
    """Sparse combinations of a hidden dictionary, with an offset: what an SAE should recover."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(96, D_IN, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    codes = torch.rand(rows, 96, generator=gen) * (torch.rand(rows, 96, generator=gen) < 0.05)
    x = codes @ atoms * 10 + torch.randn(D_IN, generator=gen) * 3
    return x.numpy().astype(np.float16)


def options(**changes: Any) -> TrainOptions:
    small = TrainOptions(
        d_sae=D_SAE,
        k=8,
        aux_k=16,
        batch_size=256,
        epochs=4.0,
        lr=3e-3,
        warmup_steps=10,
        dead_tokens=2048,
        checkpoint_every=10,
    )
    return dataclasses.replace(small, **changes)


def test_training_reduces_loss_and_keeps_decoder_rows_unit_norm():
    trainer = TopKTrainer(synthetic_activations(), options())
    first = trainer.train_step()
    history = [first]
    trainer.train(on_step=history.append)
    last = history[-1]
    assert trainer.step == trainer.total_steps == 128
    assert last.fvu < 0.5 * first.fvu
    assert last.fvu < 0.25
    norms = trainer.params["W_dec"].detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(D_SAE), rtol=0, atol=1e-5)


def _planted_dead_latent_fires(aux_coef: float) -> bool:
    """Train with latent 7 planted dead; True if it fired within the last ``dead_tokens``."""
    opts = options(aux_coef=aux_coef, epochs=12.0)
    trainer = TopKTrainer(synthetic_activations(), opts)
    latent = 7
    with torch.no_grad():  # negative on every token: the main loss never reaches it
        trainer.params["W_enc_T"][latent] = 0.0
        trainer.params["b_enc"][latent] = -1.0
    trainer.train()
    return int(trainer.tokens_since_fired[latent]) < opts.dead_tokens


def test_auxk_revives_a_planted_dead_latent():
    assert _planted_dead_latent_fires(aux_coef=1 / 32)
    assert not _planted_dead_latent_fires(aux_coef=0.0), "without AuxK it stays dead"


def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path):
    data = synthetic_activations()
    straight = TopKTrainer(data, options(epochs=1.0))
    straight.train()

    interrupted = TopKTrainer(data, options(epochs=1.0))
    interrupted.train(checkpoint=tmp_path / "ckpt.pt", max_steps=20)
    resumed = TopKTrainer(data, options(epochs=1.0))
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 20
    resumed.train()
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name


def test_checkpoint_of_other_options_is_refused(tmp_path: Path):
    data = synthetic_activations(1024)
    TopKTrainer(data, options(epochs=1.0)).train(checkpoint=tmp_path / "c.pt", max_steps=2)
    with pytest.raises(ValueError, match="other training options"):
        TopKTrainer(data, options(epochs=1.0, k=4)).load_checkpoint(tmp_path / "c.pt")


def test_exported_sae_takes_raw_activations():
    data = synthetic_activations()
    trainer = TopKTrainer(data, options(epochs=1.0))
    trainer.train()
    sae = trainer.export()
    x = torch.from_numpy(data[:64]).float()
    _, indices, values = trainer._encode(x * trainer.scale)
    feats = sae.encode(x)
    positive = [set(i[v > 0].tolist()) for i, v in zip(indices, values, strict=True)]
    assert positive == [set(s) for s in feats.index_sets()]
    reconstruction = sae.decode(feats)
    expected = trainer._decode(indices, values).detach() / trainer.scale
    torch.testing.assert_close(reconstruction, expected, rtol=1e-4, atol=1e-3)


def test_massive_activations_are_dropped_before_training():
    data = synthetic_activations(1000)
    data[[3, 500]] *= 200  # two attention-sink-like rows
    kept, limit = drop_massive_activations(data)
    assert len(kept) == 998
    assert limit == pytest.approx(10 * np.median(np.linalg.norm(data.astype(np.float32), axis=1)))
