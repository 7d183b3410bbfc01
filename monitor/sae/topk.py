"""The TopK SAE ("Scaling and evaluating sparse autoencoders", 2024): keep the k largest.

Unlike a scatter into a dense ``[tokens, d_sae]`` tensor, the top-k indices and values are
returned as they come out of ``torch.topk``: they already are the sparse form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from monitor.sae.base import SAEError, SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    rescales_by_decoder_norm = True

    def __init__(
        self, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], source: str = "cfg"
    ) -> None:
        super().__init__(cfg, tensors, source)
        self.k = self._k()

    def _k(self) -> int:
        """``k``, or older SAELens' ``activation_fn_kwargs.k``; both given must agree."""
        given = {
            where: value
            for where, value in (
                ("k", self.cfg.get("k")),
                ("activation_fn_kwargs.k", (self.cfg.get("activation_fn_kwargs") or {}).get("k")),
            )
            if value is not None
        }
        values = list(given.values())
        if any(value != values[0] for value in values[1:]):
            raise SAEError(f"{self.source}: fields k disagree ({given})")
        k = values[0] if values else None
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.d_sae:
            raise SAEError(
                f"{self.source}: field 'k' must be an integer in 1..d_sae={self.d_sae}, got {k!r}"
            )
        return k

    def feature_values(self, x: Tensor, features: Tensor) -> Tensor:
        # A feature is active only if it is positive and ranks in the top k. Its own column
        # says whether it is positive; only rows where one is need every pre-activation (to
        # find the k-th largest), so the whole encoder is read only for those.
        x = self.encoder_input(x)
        picked = torch.addmm(self.tensor("b_enc")[features], x, self.tensor("W_enc")[:, features])
        out = torch.zeros_like(picked)
        rows = (picked > 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            pre = torch.addmm(self.tensor("b_enc"), x[rows], self.tensor("W_enc"))
            kth = pre.topk(self.k, dim=1).values[:, -1:]
            mine = pre[:, features]  # from the same sums as kth: a feature ranked k-th stays in
            out[rows] = torch.where(mine >= kth, torch.relu(mine), torch.zeros_like(mine))
        return out.float()

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, indices, torch.relu(values))

    def sparsify(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, indices = pre.topk(self.k, dim=1)
        values = torch.relu(values)
        keep = values > 0
        return keep.sum(dim=1), indices[keep], values[keep]
