"""The TopK SAE ("Scaling and evaluating sparse autoencoders", 2024): keep the k largest.

Unlike a scatter into a dense ``[tokens, d_sae]`` tensor, the top-k indices and values are
returned as they come out of ``torch.topk``: they already are the sparse form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from monitor.sae.base import SAEError, SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    architecture = "topk"

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__(cfg, tensors)
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int) or not 0 < k <= self.d_sae:
            raise SAEError(f"field 'k' must be an integer in 1..d_sae={self.d_sae}, got {k!r}")
        self.k = k

    def feature_values(self, x: Tensor, features: Tensor) -> Tensor:
        # A feature is active only if it is positive and ranks in the top k. Its own column
        # says whether it is positive; only rows where one is need every pre-activation (to
        # find the k-th largest), so the whole encoder is read only for those.
        if self.apply_b_dec_to_input:
            x = x - self.tensor("b_dec")
        picked = torch.addmm(self.tensor("b_enc")[features], x, self.tensor("W_enc")[:, features])
        out = torch.zeros_like(picked)
        rows = (picked > 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            pre = torch.addmm(self.tensor("b_enc"), x[rows], self.tensor("W_enc"))
            kth = pre.topk(self.k, dim=1).values[:, -1:]
            mine = pre[:, features]  # from the same sums as kth: a feature ranked k-th stays in
            out[rows] = torch.where(mine >= kth, torch.relu(mine), torch.zeros_like(mine))
        return out

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, indices, torch.relu(values))

    def sparsify(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, indices = pre.topk(self.k, dim=1)
        values = torch.relu(values)
        keep = values > 0
        return keep.sum(dim=1), indices[keep], values[keep]
