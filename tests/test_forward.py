"""The truncated forward: layer L's residual stream, nothing after it, padding-safe."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from monitor.forward import TruncatedForward
from monitor.models import LoadedModel

pytestmark = pytest.mark.slow

TEXTS = [
    "The committee met on Tuesday and approved the budget for the new library branch.",
    "Short one.",
    "def check(user, password):\n    return verify_hash(user, password)",
]


def _padded(ids: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return batch, mask


def _close(actual: Tensor, expected: Tensor) -> None:
    # Residuals reach 1e4-1e5 on attention-sink tokens; compare at fp32 precision of that scale.
    tolerance = 1e-6 * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= tolerance


@torch.inference_mode()
def test_truncated_forward_equals_full_forward_hidden_state_with_padding(full_model: LoadedModel):
    tok = full_model.tokenizer
    ids = [tok(t)["input_ids"] for t in TEXTS]
    layer = full_model.default_layer
    batch, mask = _padded(ids, pad=tok.pad_token_id or 0)
    residuals = TruncatedForward(full_model.adapter, layer)(batch, mask)
    assert residuals.shape == (len(TEXTS), batch.shape[1], full_model.adapter.d_model)
    for row, seq in enumerate(ids):
        alone = full_model.model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        _close(residuals[row, : len(seq)], alone.hidden_states[layer][0])


@torch.inference_mode()
def test_truncated_forward_runs_no_layer_after_l_and_no_lm_head(full_model: LoadedModel):
    layer = 3
    calls: list[str] = []
    later = full_model.adapter.layers[layer]
    head = full_model.model.get_output_embeddings()
    handles = [
        later.register_forward_hook(lambda *_: calls.append("later layer")),
        head.register_forward_hook(lambda *_: calls.append("lm_head")),
        full_model.adapter.layers[layer - 1].register_forward_hook(
            lambda *_: calls.append("layer L")
        ),
    ]
    try:
        ids = torch.tensor([full_model.tokenizer("Hello world")["input_ids"]])
        TruncatedForward(full_model.adapter, layer)(ids, torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    assert calls == ["layer L"]


def test_layer_outside_the_model_is_refused(full_model: LoadedModel):
    n = full_model.adapter.n_layers
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=f"1..{n}"):
            TruncatedForward(full_model.adapter, bad)
