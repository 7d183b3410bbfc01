"""Training the probe detectors that sit beside the rules.

* SAE probe: L1-regularised logistic regression on SAE features max-pooled over the scope, each
  divided by its atlas maximum; the L1 penalty keeps a handful of features, which it names.
* Dense probe: L2 logistic regression on the standardised mean layer-L residual over the scope,
  the baseline published work says single features can lose to.

The regularisation strength is chosen on the dev split (AUROC), the operating threshold too (a
target false-positive rate on dev negatives); the test split is never seen here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from detectors.batch import TurnBatch
from detectors.metrics import auroc, threshold_for_fpr

SAE_C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
DENSE_C_GRID = (0.001, 0.01, 0.1, 1.0)


def pooled_max_sparse(batch: TurnBatch, scope: str) -> sp.csr_matrix:
    """[n_turns, d_sae] max activation of every feature over each turn's scoped tokens."""
    f = batch.features
    token = torch.repeat_interleave(torch.arange(f.n_tokens), f.indptr[1:] - f.indptr[:-1])
    keep = batch.scope_mask(scope)[token]
    turn = batch.turn_of_token()[token][keep].numpy()
    idx = f.indices[keep].numpy()
    val = f.values[keep].float().numpy()
    key = turn.astype(np.int64) * f.d_sae + idx
    order = np.argsort(key, kind="stable")
    key, val = key[order], val[order]
    if key.size == 0:
        return sp.csr_matrix((batch.n_turns, f.d_sae), dtype=np.float32)
    starts = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
    maxima = np.maximum.reduceat(val, starts)
    uniq = key[starts]
    return sp.csr_matrix(
        (maxima, (uniq // f.d_sae, uniq % f.d_sae)), shape=(batch.n_turns, f.d_sae)
    )


@dataclass(frozen=True)
class TrainedProbe:
    weights: dict[str, np.ndarray]
    threshold: float
    c: float
    dev_auroc: float
    n_features: int


def _fit(
    x_train: np.ndarray | sp.csr_matrix,
    y_train: np.ndarray,
    c: float,
    l1: bool,
    sample_weight: np.ndarray | None = None,
) -> LogisticRegression:
    model = LogisticRegression(
        C=c,
        l1_ratio=1.0 if l1 else 0.0,
        solver="liblinear" if l1 else "lbfgs",
        class_weight="balanced",
        max_iter=2000,
        random_state=0,  # liblinear shuffles
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        model.fit(x_train, y_train, sample_weight=sample_weight)
    return model


def _select(
    x_train: np.ndarray | sp.csr_matrix,
    y_train: np.ndarray,
    x_dev: np.ndarray | sp.csr_matrix,
    y_dev: np.ndarray,
    grid: tuple[float, ...],
    l1: bool,
) -> tuple[LogisticRegression, float, float]:
    best: tuple[float, float, LogisticRegression] | None = None
    for c in grid:
        model = _fit(x_train, y_train, c, l1)
        score = auroc(y_dev, model.decision_function(x_dev))
        if best is None or score > best[0] + 1e-9:  # ties keep the stronger penalty
            best = (score, c, model)
    assert best is not None
    return best[2], best[1], best[0]


def _threshold(
    model: LogisticRegression, x_dev: np.ndarray | sp.csr_matrix, y_dev: np.ndarray, fpr: float
) -> float:
    prob = model.predict_proba(x_dev)[:, 1]
    return float(np.clip(threshold_for_fpr(prob[y_dev == 0], fpr), 1e-6, 1 - 1e-6))


def atlas_scaled(
    batches: list[TurnBatch], scope: str, atlas_max: np.ndarray
) -> tuple[np.ndarray, list[sp.csr_matrix]]:
    """Each batch's per-turn feature maxima over the scope as a share of the features' atlas
    maxima (what the SAE probe and an L1-drafted rule read), and the scale used."""
    scale = np.where(atlas_max > 0, atlas_max, 1.0).astype(np.float32)
    inv = sp.diags(1.0 / scale)
    return scale, [(pooled_max_sparse(b, scope) @ inv).tocsr() for b in batches]


def train_sae_probe(
    train: TurnBatch,
    y_train: np.ndarray,
    dev: TurnBatch,
    y_dev: np.ndarray,
    scope: str,
    atlas_max: np.ndarray,
    labels: dict[int, str],
    fpr: float = 0.01,
) -> TrainedProbe:
    scale, (x_train, x_dev) = atlas_scaled([train, dev], scope, atlas_max)
    model, c, dev_auc = _select(x_train, y_train, x_dev, y_dev, SAE_C_GRID, l1=True)
    coef = model.coef_[0]
    keep = np.nonzero(coef)[0]
    weights = {
        "indices": keep.astype(np.int64),
        "scale": scale[keep],
        "coef": coef[keep].astype(np.float32),
        "intercept": np.asarray(model.intercept_[0], dtype=np.float32),
        "labels": np.asarray([labels.get(int(i), f"feature {int(i)}") for i in keep]),
    }
    return TrainedProbe(weights, _threshold(model, x_dev, y_dev, fpr), c, dev_auc, len(keep))


def train_residual_probe(
    train: TurnBatch,
    y_train: np.ndarray,
    dev: TurnBatch,
    y_dev: np.ndarray,
    scope: str,
    fpr: float = 0.01,
) -> TrainedProbe:
    x_train = train.residual_mean(scope).numpy()
    x_dev = dev.residual_mean(scope).numpy()
    mean = x_train.mean(0)
    std = x_train.std(0) + 1e-6
    z_train, z_dev = (x_train - mean) / std, (x_dev - mean) / std
    model, c, dev_auc = _select(z_train, y_train, z_dev, y_dev, DENSE_C_GRID, l1=False)
    weights = {
        "mean": mean.astype(np.float32),
        "std": std.astype(np.float32),
        "coef": model.coef_[0].astype(np.float32),
        "intercept": np.asarray(model.intercept_[0], dtype=np.float32),
    }
    return TrainedProbe(weights, _threshold(model, z_dev, y_dev, fpr), c, dev_auc, len(mean))


def save_weights(weights: dict[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **weights)  # type: ignore[arg-type]
    tmp.replace(path)


def probe_scores(
    batch: TurnBatch, weights: dict[str, np.ndarray], scope: str, kind: str
) -> np.ndarray:
    """[n_turns] probabilities of fitted probe weights on a batch (what the engine computes for a
    saved probe), for probes fitted in memory."""
    if kind == "sae":
        x = pooled_max_sparse(batch, scope)[:, weights["indices"]].toarray() / weights["scale"]
    else:
        x = (batch.residual_mean(scope).numpy() - weights["mean"]) / weights["std"]
    z = x @ weights["coef"] + float(weights["intercept"])
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)
