"""A batch of encoded turns in the one layout the engine, probes and discovery all read.

Token rows of every turn are stacked (CSR sparse features, a role per token); ``offsets`` marks
where each turn starts. Residual sums per role are there for dense probes. A batch saves to and
loads from one ``.npz`` file, which is how labelled sets are cached between evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
import torch
from torch import Tensor

from detectors.rules import Scope
from monitor.messages import Role
from monitor.sae.sparse import SparseActivations

if TYPE_CHECKING:
    from monitor.pipeline import EncodedInput

SCOPE_ROLES: dict[str, tuple[Role, ...]] = {
    "user": (Role.USER,),
    "assistant": (Role.ASSISTANT,),
    "system": (Role.SYSTEM,),
    "tool": (Role.TOOL,),
    # text from outside the model: what users wrote and what tools returned (where indirect
    # prompt injections arrive)
    "untrusted": (Role.USER, Role.TOOL),
    "all": tuple(Role),
}
assert set(SCOPE_ROLES) == set(get_args(Scope)), "every scope a rule may name has its roles"


@dataclass(frozen=True)
class TurnBatch:
    features: SparseActivations  # one row per token, all turns stacked
    roles: Tensor  # [n_tokens] int64 (Role values)
    token_ids: Tensor  # [n_tokens] int64
    offsets: Tensor  # [n_turns + 1] int64: turn i owns token rows offsets[i]:offsets[i+1]
    residual_sums: Tensor | None = None  # [n_turns, len(Role), d_model]
    residual_counts: Tensor | None = None  # [n_turns, len(Role)]
    # Per-batch derived tensors (turn index, scope masks and counts), computed once: every
    # detector of a catalog asks for them.
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_turns(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_tokens(self) -> int:
        return self.features.n_tokens

    @classmethod
    def from_encoded(cls, encoded: Sequence[EncodedInput]) -> TurnBatch:
        if not encoded:
            raise ValueError("a batch needs at least one turn")
        lengths = torch.tensor([e.features.n_tokens for e in encoded], dtype=torch.int64)
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        sums = counts = None
        if all(e.residual_sums is not None for e in encoded):
            sums = torch.stack([e.residual_sums for e in encoded])  # type: ignore[misc]
            counts = torch.stack([e.residual_counts for e in encoded])  # type: ignore[misc]
        return cls(
            features=SparseActivations.concat([e.features for e in encoded]),
            roles=torch.tensor([int(r) for e in encoded for r in e.roles], dtype=torch.int64),
            token_ids=torch.tensor([i for e in encoded for i in e.ids], dtype=torch.int64),
            offsets=offsets,
            residual_sums=sums,
            residual_counts=counts,
        )

    @classmethod
    def concat(cls, parts: Sequence[TurnBatch]) -> TurnBatch:
        base = torch.tensor([0, *[p.n_tokens for p in parts]]).cumsum(0)
        offsets = torch.cat(
            [parts[0].offsets[:1], *[p.offsets[1:] + base[i] for i, p in enumerate(parts)]]
        )
        dense = all(p.residual_sums is not None for p in parts)
        return cls(
            features=SparseActivations.concat([p.features for p in parts]),
            roles=torch.cat([p.roles for p in parts]),
            token_ids=torch.cat([p.token_ids for p in parts]),
            offsets=offsets,
            residual_sums=torch.cat([p.residual_sums for p in parts]) if dense else None,  # type: ignore[misc]
            residual_counts=torch.cat([p.residual_counts for p in parts]) if dense else None,  # type: ignore[misc]
        )

    def select(self, turns: Sequence[int]) -> TurnBatch:
        """A batch of only these turns, in this order."""
        parts = []
        for i in turns:
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            parts.append(
                TurnBatch(
                    features=self.features.rows(lo, hi),
                    roles=self.roles[lo:hi],
                    token_ids=self.token_ids[lo:hi],
                    offsets=torch.tensor([0, hi - lo]),
                    residual_sums=None
                    if self.residual_sums is None
                    else self.residual_sums[i : i + 1],
                    residual_counts=None
                    if self.residual_counts is None
                    else self.residual_counts[i : i + 1],
                )
            )
        return TurnBatch.concat(parts)

    def turn_of_token(self) -> Tensor:
        """[n_tokens] index of the turn each token row belongs to."""
        if "turn" not in self._cache:
            self._cache["turn"] = torch.repeat_interleave(
                torch.arange(self.n_turns), self.offsets[1:] - self.offsets[:-1]
            )
        return self._cache["turn"]

    def scope_mask(self, scope: str) -> Tensor:
        """[n_tokens] True for tokens in ``scope``; never a turn's first token (no features)."""
        key = f"mask:{scope}"
        if key not in self._cache:
            roles = torch.tensor([int(r) for r in SCOPE_ROLES[scope]], dtype=torch.int64)
            mask = torch.isin(self.roles, roles)
            mask[self.offsets[:-1][self.offsets[:-1] < self.n_tokens]] = False
            self._cache[key] = mask
        return self._cache[key]

    def scoped_counts(self, scope: str) -> Tensor:
        """[n_turns] how many tokens of each turn are in ``scope``."""
        key = f"count:{scope}"
        if key not in self._cache:
            mask = self.scope_mask(scope).float()
            self._cache[key] = torch.zeros(self.n_turns).index_add_(0, self.turn_of_token(), mask)
        return self._cache[key]

    def pool_max(self, dense: Tensor, scope: str) -> Tensor:
        """[n_turns, k]: the max of ``dense`` ([n_tokens, k], >= 0) over each turn's scope."""
        x = dense * self.scope_mask(scope)[:, None]
        index = self.turn_of_token()[:, None].expand_as(x)
        out = torch.zeros(self.n_turns, dense.shape[1])
        return out.scatter_reduce_(0, index, x, reduce="amax", include_self=True)

    def pool_sum(self, dense: Tensor, scope: str) -> Tensor:
        """[n_turns, k]: the sum of ``dense`` over each turn's scope."""
        x = dense * self.scope_mask(scope)[:, None]
        return torch.zeros(self.n_turns, dense.shape[1]).index_add_(0, self.turn_of_token(), x)

    def pool_mean(self, dense: Tensor, scope: str) -> Tensor:
        """[n_turns, k]: the mean of ``dense`` over each turn's scope (0 where it is empty)."""
        return self.pool_sum(dense, scope) / self.scoped_counts(scope).clamp(min=1)[:, None]

    def residual_mean(self, scope: str) -> Tensor:
        """[n_turns, d_model] mean layer-L residual over the scope's tokens (zeros if none)."""
        if self.residual_sums is None or self.residual_counts is None:
            raise ValueError("this batch carries no residuals (dense probes need them)")
        roles = [int(r) for r in SCOPE_ROLES[scope]]
        sums = self.residual_sums[:, roles].sum(1)
        counts = self.residual_counts[:, roles].sum(1, keepdim=True).clamp(min=1)
        return sums / counts

    def pooled_max(self, columns: Tensor, scope: str) -> Tensor:
        """[n_turns, len(columns)] max activation of these features over the scope's tokens."""
        return self.pool_max(gather_columns(self.features, columns), scope)

    def pooled_mean(self, columns: Tensor, scope: str) -> Tensor:
        """[n_turns, len(columns)] mean activation of these features over the scope's tokens."""
        return self.pool_mean(gather_columns(self.features, columns), scope)

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "indptr": self.features.indptr.numpy(),
            "indices": self.features.indices.to(torch.int32).numpy(),
            "values": self.features.values.to(torch.float16).numpy(),
            "d_sae": np.asarray(self.features.d_sae),
            "roles": self.roles.to(torch.int8).numpy(),
            "token_ids": self.token_ids.to(torch.int32).numpy(),
            "offsets": self.offsets.numpy(),
        }
        if self.residual_sums is not None and self.residual_counts is not None:
            arrays["residual_sums"] = self.residual_sums.numpy()
            arrays["residual_counts"] = self.residual_counts.numpy()
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TurnBatch:
        with np.load(path) as z:
            feats = SparseActivations(
                torch.from_numpy(z["indptr"]).to(torch.int64),
                torch.from_numpy(z["indices"]).to(torch.int64),
                torch.from_numpy(z["values"]).to(torch.float32),
                int(z["d_sae"]),
            )
            has_dense = "residual_sums" in z
            sums, counts = None, None
            if has_dense:
                sums, counts = _all_roles(
                    torch.from_numpy(z["residual_sums"]), torch.from_numpy(z["residual_counts"])
                )
            return cls(
                features=feats,
                roles=torch.from_numpy(z["roles"]).to(torch.int64),
                token_ids=torch.from_numpy(z["token_ids"]).to(torch.int64),
                offsets=torch.from_numpy(z["offsets"]).to(torch.int64),
                residual_sums=sums,
                residual_counts=counts,
            )


def _all_roles(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-role residual sums saved before a role was added get zeros for it: an encoding from
    then held no tokens of the new role, so a cached one stays valid."""
    missing = len(Role) - sums.shape[1]
    if missing <= 0:
        return sums, counts
    return (
        torch.cat([sums, sums.new_zeros(sums.shape[0], missing, sums.shape[2])], 1),
        torch.cat([counts, counts.new_zeros(counts.shape[0], missing)], 1),
    )


def gather_columns(features: SparseActivations, columns: Tensor) -> Tensor:
    """Dense ``[n_tokens, len(columns)]`` activations of a few features (zeros where inactive)."""
    lookup = torch.full((features.d_sae,), -1, dtype=torch.int64)
    lookup[columns] = torch.arange(columns.numel())
    col = lookup[features.indices]
    hit = col >= 0
    rows = torch.repeat_interleave(
        torch.arange(features.n_tokens), features.indptr[1:] - features.indptr[:-1]
    )
    dense = torch.zeros(features.n_tokens, columns.numel())
    dense[rows[hit], col[hit]] = features.values[hit].float()
    return dense
