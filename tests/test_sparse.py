"""Sparse activations: rows, concatenation and top features keep their tokens straight."""

from __future__ import annotations

import torch

from monitor.sae import SparseActivations


def _dense_to_sparse(dense: torch.Tensor) -> SparseActivations:
    mask = dense > 0
    return SparseActivations.from_counts(
        mask.sum(1), mask.nonzero()[:, 1], dense[mask], dense.shape[1]
    )


def test_rows_and_concat_round_trip_the_dense_form():
    dense = torch.relu(torch.randn(10, 12, generator=torch.Generator().manual_seed(0)))
    dense[3] = 0  # a token with no active feature
    sparse = _dense_to_sparse(dense)
    assert torch.equal(sparse.to_dense(), dense)
    parts = [sparse.rows(0, 4), sparse.rows(4, 4), sparse.rows(4, 10)]
    assert torch.equal(parts[0].to_dense(), dense[:4])
    assert parts[1].n_tokens == 0
    assert torch.equal(SparseActivations.concat(parts).to_dense(), dense)


def test_top_lists_the_strongest_features_first():
    dense = torch.zeros(2, 6)
    dense[1, 2], dense[1, 4], dense[1, 5] = 0.5, 2.0, 1.0
    sparse = _dense_to_sparse(dense)
    assert sparse.top(0, 3) == []
    assert sparse.top(1, 2) == [(4, 2.0), (5, 1.0)]
    assert sparse.index_sets() == [frozenset(), frozenset({2, 4, 5})]
