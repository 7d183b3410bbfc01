"""Detector quality numbers: AUROC, recall at a false-positive rate, thresholds for a target FPR."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return math.nan
    return float(roc_auc_score(labels, scores))


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Best true-positive rate among thresholds whose false-positive rate is at most ``fpr``."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return math.nan
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def threshold_for_fpr(negative_scores: np.ndarray, fpr: float) -> float:
    """Lowest threshold (``score >= t`` fires) at which at most ``fpr`` of negatives fire."""
    # Kept in the scores' own dtype: the step above the top allowed negative must be a step in
    # the precision the scores are compared in.
    neg = np.sort(np.asarray(negative_scores))[::-1]
    if neg.size == 0:
        raise ValueError("no negatives to calibrate on")
    allowed = math.floor(fpr * neg.size + 1e-9)  # negatives that may fire
    if allowed >= neg.size:
        return float(neg[-1])
    return float(np.nextafter(neg[allowed], np.asarray(math.inf, dtype=neg.dtype)))


def precision_recall(labels: np.ndarray, fired: np.ndarray) -> tuple[float, float]:
    labels = np.asarray(labels).astype(bool)
    fired = np.asarray(fired).astype(bool)
    tp = int((labels & fired).sum())
    precision = tp / int(fired.sum()) if fired.any() else math.nan
    recall = tp / int(labels.sum()) if labels.any() else math.nan
    return precision, recall
