"""Corpus build, capture, evaluation and atlas on small real data with the real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.models import LoadedModel
from monitor.registry import RegistryError
from monitor.sae.builtin import placeholder_topk_sae
from monitor.training.atlas import NO_TOKEN, build_atlas, load_card
from monitor.training.capture import ActivationShards, CaptureOptions, capture_split
from monitor.training.corpus import CorpusOptions, build_corpus
from monitor.training.evaluation import activation_metrics, evaluate_windows

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
DOCS = [
    {"source": "t", "id": "a", "text": "The committee approved the budget for the library. " * 6},
    {"source": "t", "id": "b", "text": "def add(a, b):\n    return a + b\n" * 5},
    {
        "source": "t",
        "id": "c",
        "messages": [
            {"role": "user", "content": "Is this legit?"},
            {"role": "assistant", "content": "No, it is a scam."},
        ],
    },
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for split in ("train", "heldout"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return root


def test_corpus_build_without_a_registry_client_fails_and_writes_nothing(
    tmp_path: Path, full_models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm on this PATH
    out = tmp_path / "corpus"
    with pytest.raises(RegistryError, match="needs npm"):
        build_corpus(out, tmp_path / "downloads", full_models[MODEL], CorpusOptions())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".corpus")] == []


def test_capture_skips_the_sink_and_resumes_after_an_interruption(
    corpus: Path, tmp_path: Path, full_models: dict[str, LoadedModel]
):
    model = full_models[MODEL]
    opts = CaptureOptions(layer=4, ctx=32, shard_windows=2)
    summary = capture_split(corpus, "train", tmp_path / "acts", model, opts)
    split = tmp_path / "acts" / "train"
    shards = ActivationShards(split)
    windows = shards.windows()
    lengths = (windows >= 0).sum(1)
    assert shards.n_rows == summary["rows"] == int((lengths - 1).sum())
    meta = shards.rows_meta()
    assert meta[:, 1].min() == 1, "position 0 (the attention sink) is never captured"
    assert summary["shards"] >= 3
    # the rows are the truncated forward's residuals at those positions
    w, pos = meta[5]
    ids = torch.tensor([windows[w][: lengths[w]].tolist()])
    from monitor.forward import TruncatedForward

    with torch.inference_mode():
        expected = TruncatedForward(model.adapter, 4)(ids, torch.ones_like(ids))[0, pos]
    torch.testing.assert_close(shards.gather(np.array([5]))[0], expected, rtol=1e-3, atol=0.05)

    before = {p.name: p.read_bytes() for p in split.glob("*.npy")}
    (split / "capture.json").unlink()
    (split / "acts_00001.npy").unlink()  # as if killed while writing shard 1
    capture_split(corpus, "train", tmp_path / "acts", model, opts)
    after = {p.name: p.read_bytes() for p in split.glob("*.npy")}
    assert after == before


def test_eval_metrics_match_their_definitions(full_models: dict[str, LoadedModel]):
    model = full_models[MODEL]
    sae = placeholder_topk_sae(576, d_sae=256, k=8)
    x = torch.randn(300, 576) * 3 + 1
    metrics = activation_metrics(sae, [x[:100], x[100:]])
    x_hat = sae.decode(sae.encode(x))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert metrics.fvu == pytest.approx(fvu, rel=1e-4)
    assert metrics.l0 == pytest.approx(sae.encode(x).nnz / 300)
    assert metrics.tokens == 300
    fired = set(sae.encode(x).indices.tolist())
    assert metrics.dead_features == 256 - len(fired)

    windows = np.full((2, 24), -1, dtype=np.int32)
    ids = model.tokenizer("A short text to measure the loss of the language model on.")["input_ids"]
    windows[0, : len(ids)] = ids
    windows[1, : len(ids)] = ids
    result = evaluate_windows(model, sae, 6, windows, loss_windows=2)
    assert result.ce_clean is not None and result.ce_zero_ablation is not None
    assert result.ce_clean < result.ce_zero_ablation, "ablating layer 6 must hurt"
    assert result.loss_recovered is not None and result.loss_recovered < 1.0


def test_atlas_records_density_maximum_and_peak_contexts(
    corpus: Path, tmp_path: Path, full_models: dict[str, LoadedModel]
):
    model = full_models[MODEL]
    capture_split(corpus, "heldout", tmp_path / "acts", model, CaptureOptions(layer=4, ctx=32))
    shards = ActivationShards(tmp_path / "acts" / "heldout")
    sae = placeholder_topk_sae(576, d_sae=64, k=4)
    atlas = build_atlas(sae, shards, top_n=3, chunk=50)
    feats = sae.encode(shards.gather(np.arange(shards.n_rows)))
    counts = np.bincount(feats.indices.numpy(), minlength=64)
    np.testing.assert_allclose(atlas["density"], counts / shards.n_rows, rtol=1e-6)
    f = int(counts.argmax())
    card_path = tmp_path / "atlas.npz"
    np.savez_compressed(card_path, **atlas)
    card = load_card(card_path, f)
    assert card.max_activation == pytest.approx(float(feats.to_dense()[:, f].max()), rel=1e-3)
    assert card.contexts[0][2] == pytest.approx(card.max_activation, rel=1e-2)
    assert all(0 <= peak < len(tokens) for tokens, peak, _ in card.contexts)
    assert NO_TOKEN not in card.contexts[0][0]
    with pytest.raises(IndexError, match=r"outside 0\.\.63"):
        load_card(card_path, 64)
    shutil.rmtree(tmp_path / "acts")
