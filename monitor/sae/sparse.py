"""Sparse SAE activations: per token, the active feature indices and their values (CSR rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SparseActivations:
    """Rows are tokens; row ``t`` holds ``indices[indptr[t]:indptr[t+1]]`` and their values.

    Only positive activations are kept. The dense ``[tokens, d_sae]`` form exists only inside the
    encoder, a chunk at a time, and in ``to_dense`` for tests of small inputs.
    """

    indptr: Tensor  # [n_tokens + 1] int64
    indices: Tensor  # [nnz] int64
    values: Tensor  # [nnz] float32
    d_sae: int

    @property
    def n_tokens(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @classmethod
    def from_counts(
        cls, counts: Tensor, indices: Tensor, values: Tensor, d_sae: int
    ) -> SparseActivations:
        """Build from per-token active counts and the row-major flattened indices and values."""
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        return cls(indptr, indices.to(torch.int64), values, d_sae)

    @classmethod
    def empty(cls, d_sae: int) -> SparseActivations:
        return cls(
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.float32),
            d_sae,
        )

    @classmethod
    def concat(cls, parts: Sequence[SparseActivations]) -> SparseActivations:
        """Stack token rows of several parts (same ``d_sae``) in order."""
        if not parts:
            raise ValueError("concat needs at least one part")
        d_sae = parts[0].d_sae
        assert all(p.d_sae == d_sae for p in parts)
        offsets = []
        base = 0
        for p in parts:
            offsets.append(p.indptr[1:] + base)
            base += p.nnz
        indptr = torch.cat([parts[0].indptr[:1], *offsets])
        return cls(
            indptr,
            torch.cat([p.indices for p in parts]),
            torch.cat([p.values for p in parts]),
            d_sae,
        )

    def with_empty_rows(self, keep: Tensor) -> SparseActivations:
        """Spread these rows over the True places of ``keep``; the False places get no entries."""
        assert int(keep.sum()) == self.n_tokens
        counts = torch.zeros(keep.numel(), dtype=torch.int64, device=self.indptr.device)
        counts[keep.to(self.indptr.device)] = self.indptr[1:] - self.indptr[:-1]
        return SparseActivations.from_counts(counts, self.indices, self.values, self.d_sae)

    def rows(self, start: int, stop: int) -> SparseActivations:
        """Token rows ``start:stop`` as their own object (views, no copy of the entries)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return SparseActivations(
            self.indptr[start : stop + 1] - lo, self.indices[lo:hi], self.values[lo:hi], self.d_sae
        )

    def row(self, t: int) -> tuple[Tensor, Tensor]:
        """Active feature indices and values of token ``t``."""
        lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
        return self.indices[lo:hi], self.values[lo:hi]

    def top(self, t: int, n: int) -> list[tuple[int, float]]:
        """The ``n`` strongest features of token ``t`` as (index, activation), strongest first."""
        idx, val = self.row(t)
        order = torch.argsort(val, descending=True, stable=True)[:n]
        return [(int(i), float(v)) for i, v in zip(idx[order], val[order], strict=True)]

    def index_sets(self) -> list[frozenset[int]]:
        """Per token, the set of active feature indices."""
        ptr = self.indptr.tolist()
        idx = self.indices.tolist()
        return [frozenset(idx[ptr[t] : ptr[t + 1]]) for t in range(self.n_tokens)]

    def to(self, device: str | torch.device) -> SparseActivations:
        return SparseActivations(
            self.indptr.to(device), self.indices.to(device), self.values.to(device), self.d_sae
        )

    def to_dense(self) -> Tensor:
        """Dense ``[n_tokens, d_sae]`` copy, for tests and small inputs only."""
        out = torch.zeros(self.n_tokens, self.d_sae, dtype=self.values.dtype)
        rows = torch.repeat_interleave(
            torch.arange(self.n_tokens), (self.indptr[1:] - self.indptr[:-1]).cpu()
        )
        out[rows, self.indices.cpu()] = self.values.cpu()
        return out
