"""``safety-monitor sae eval``: how well an SAE explains a layer's residual stream.

- ``fvu``: fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² over all tokens;
- ``l0``: mean number of active features per token;
- ``dead_fraction``: features that never fire over the evaluated tokens (with the token count);
- ``loss_recovered``: next-token cross-entropy with the SAE's reconstruction spliced in at layer
  L, placed between the clean model (1.0) and the layer's output zero-ablated (0.0).

Every measure leaves out each window's first position (the attention sink) and any other
token whose residual is as long (``exclude_norm_above``), which the SAE is not trained on; the
splice and the ablation leave them untouched too. ``excluded_massive_tokens`` counts the latter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - the usual name

from monitor.models.loading import LoadedModel
from monitor.sae.base import SparseAutoencoder
from monitor.training.capture import window_tensors


@dataclass
class SAEMetrics:
    fvu: float
    l0: float
    dead_fraction: float
    dead_features: int
    tokens: int
    excluded_massive_tokens: int = 0
    loss_recovered: float | None = None
    ce_clean: float | None = None
    ce_sae: float | None = None
    ce_zero_ablation: float | None = None
    loss_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    """Running sums for FVU, L0 and feature firing counts over chunks of activations."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.n = 0
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.err_sq = 0.0
        self.active = 0
        self.fired = torch.zeros(d_sae, dtype=torch.int64)
        self.excluded = 0

    def add(self, sae: SparseAutoencoder, x: Tensor) -> None:
        keep = sae.keep_mask(x)
        self.excluded += int((~keep).sum())
        x = x[keep]
        feats = sae.encode(x)
        x_hat = sae.decode(feats, x).cpu().double()
        x = x.double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += float(x.pow(2).sum())
        self.err_sq += float((x - x_hat).pow(2).sum())
        self.active += feats.nnz
        self.fired += torch.bincount(feats.indices.cpu(), minlength=sae.d_sae)

    def metrics(self) -> SAEMetrics:
        total_var = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        dead = int((self.fired == 0).sum())
        return SAEMetrics(
            fvu=self.err_sq / total_var,
            l0=self.active / self.n,
            dead_fraction=dead / self.fired.numel(),
            dead_features=dead,
            tokens=self.n,
            excluded_massive_tokens=self.excluded,
        )


def activation_metrics(sae: SparseAutoencoder, chunks: Iterable[Tensor]) -> SAEMetrics:
    """FVU, L0 and dead features over ``[tokens, d_in]`` chunks of raw activations."""
    acc = _Accumulator(sae.d_in, sae.d_sae)
    for x in chunks:
        acc.add(sae, x)
    if acc.n == 0:
        raise ValueError("no tokens to evaluate")
    return acc.metrics()


@torch.inference_mode()
def loss_recovered(
    model: LoadedModel,
    sae: SparseAutoencoder,
    layer: int,
    windows: np.ndarray,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Cross-entropy clean, with the SAE spliced in at ``layer``, and with it zero-ablated."""
    target = model.adapter.layers[layer - 1]
    mode: dict[str, str] = {"now": "clean"}

    def splice(_m: nn.Module, _a: object, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if mode["now"] == "clean":
            return output
        new = hidden.clone()
        body = hidden[:, 1:]
        flat = body.reshape(-1, body.shape[-1])
        keep = sae.keep_mask(flat)  # massive activations stay as they are, like position 0
        replaced = flat.clone()
        if mode["now"] == "zero":
            replaced[keep] = 0.0
        else:
            kept = flat[keep]
            replaced[keep] = sae.decode(sae.encode(kept), kept).to(hidden.dtype)
        new[:, 1:] = replaced.reshape(body.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    handle = target.register_forward_hook(splice)
    try:
        for b in range(0, len(windows), batch_size):
            ids, attn = window_tensors(windows[b : b + batch_size], 0, model.device)
            # predict token t+1 from position t, for t >= 1 (position 0 is the sink)
            labels = ids[:, 2:]
            valid = attn[:, 2:].bool()
            for name in sums:
                mode["now"] = name
                logits = model.model(input_ids=ids, attention_mask=attn).logits[:, 1:-1]
                ce = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels.reshape(-1),
                    reduction="none",
                )
                sums[name] += float(ce[valid.reshape(-1)].sum())
            count += int(valid.sum())
    finally:
        handle.remove()
    clean, spliced, zero = (sums[k] / count for k in ("clean", "sae", "zero"))
    return {
        "loss_recovered": (zero - spliced) / (zero - clean),
        "ce_clean": clean,
        "ce_sae": spliced,
        "ce_zero_ablation": zero,
        "loss_tokens": count,
    }


def evaluate_windows(
    model: LoadedModel,
    sae: SparseAutoencoder,
    layer: int,
    windows: np.ndarray,
    loss_windows: int,
    batch_size: int = 8,
) -> SAEMetrics:
    """All measures on token windows (int32, -1 padded): activations from the model itself."""
    from monitor.forward import TruncatedForward

    forward = TruncatedForward(model.adapter, layer)

    @torch.inference_mode()
    def chunks() -> Iterable[Tensor]:
        for b in range(0, len(windows), batch_size):
            ids, mask = window_tensors(windows[b : b + batch_size], 0, model.device)
            hidden = forward(ids, mask)
            keep = mask.bool()
            keep[:, 0] = False
            yield hidden[keep].float()

    metrics = activation_metrics(sae, chunks())
    if loss_windows > 0:
        for key, value in loss_recovered(model, sae, layer, windows[:loss_windows]).items():
            setattr(metrics, key, value)
    return metrics
