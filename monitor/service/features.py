"""The one codec of a turn's stored per-token features: CSR columns of int8 roles, int32
indptr and indices, float16 values (``row`` writes them, ``StoredFeatures.of`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitor.pipeline import EncodedInput
from monitor.service.db import TurnFeatures


def row(turn_id: str, encoded: EncodedInput, tokens: list[str]) -> TurnFeatures:
    """The stored row of one turn's features (``tokens`` as displayed: redacted)."""
    f = encoded.features
    return TurnFeatures(
        turn_id=turn_id,
        tokens=tokens,
        roles=np.asarray([int(r) for r in encoded.roles], dtype=np.int8).tobytes(),
        indptr=f.indptr.numpy().astype(np.int32).tobytes(),
        indices=f.indices.numpy().astype(np.int32).tobytes(),
        values=f.values.numpy().astype(np.float16).tobytes(),
    )


@dataclass(frozen=True)
class StoredFeatures:
    """A turn's stored per-token sparse features, decoded from their CSR columns."""

    tokens: list[str]
    roles: np.ndarray  # int8 [n]
    indptr: np.ndarray  # int32 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]

    @classmethod
    def of(cls, row: TurnFeatures) -> StoredFeatures:
        return cls(
            tokens=list(row.tokens),
            roles=np.frombuffer(row.roles, dtype=np.int8),
            indptr=np.frombuffer(row.indptr, dtype=np.int32),
            indices=np.frombuffer(row.indices, dtype=np.int32),
            values=np.frombuffer(row.values, dtype=np.float16).astype(np.float32),
        )

    def top(self, t: int, n: int) -> list[tuple[int, float]]:
        lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
        order = np.argsort(-self.values[lo:hi])[:n]
        return [(int(self.indices[lo + j]), round(float(self.values[lo + j]), 4)) for j in order]

    def has(self, feature: int) -> bool:
        return bool(np.any(self.indices == feature))
