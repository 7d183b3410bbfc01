"""``detectors eval``: each labelled detector's quality, beside its probes and baselines."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from detectors.batch import TurnBatch
from detectors.dataset import LabelledSet
from detectors.engine import Engine, ResidualProbeDetector, SAEProbeDetector
from detectors.metrics import auroc, precision_recall, recall_at_fpr

FPR = 0.01


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def evaluate(engine: Engine, data: LabelledSet, batch: TurnBatch) -> dict[str, dict[str, Any]]:
    """Per labelled detector: counts, AUROC, recall at 1% FPR, precision and recall as it fires.

    Each probe declared as ``signal_of`` a detector is scored on the same examples: the dense
    (residual) probe's AUROC is the baseline every rule is compared with.
    """
    results = engine.score(batch)
    report: dict[str, dict[str, Any]] = {}
    for detector_id in data.detectors():
        rows, labels = data.labelled(detector_id)
        y = np.asarray(labels)
        entry: dict[str, Any] = {"n_pos": int(y.sum()), "n_neg": int((1 - y).sum())}
        if detector_id not in results:
            entry["error"] = "not in the catalog"
            report[detector_id] = entry
            continue
        scores, fired = (t.numpy()[rows] for t in results[detector_id])
        precision, recall = precision_recall(y, fired)
        entry.update(
            auroc=_num(auroc(y, scores)),
            recall_at_1pct_fpr=_num(recall_at_fpr(y, scores, FPR)),
            precision=_num(precision),
            recall=_num(recall),
            kind=engine.detector(detector_id).spec.kind,
        )
        for d in engine.detectors:
            if d.spec.signal_of != detector_id:
                continue
            s = results[d.id][0].numpy()[rows]
            key = "dense_probe" if isinstance(d, ResidualProbeDetector) else "sae_probe"
            if isinstance(d, SAEProbeDetector | ResidualProbeDetector):
                entry[f"{key}_auroc"] = _num(auroc(y, s))
                entry[f"{key}_recall_at_1pct_fpr"] = _num(recall_at_fpr(y, s, FPR))
        report[detector_id] = entry
    return report


def text_baseline(
    train_texts: list[str], y_train: np.ndarray, texts: list[str], y: np.ndarray
) -> dict[str, float | None]:
    """TF-IDF word and character n-grams + logistic regression: what plain text gets."""
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000)
    model = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced")
    model.fit(vec.fit_transform(train_texts), y_train)
    s = model.decision_function(vec.transform(texts))
    return {"auroc": _num(auroc(y, s)), "recall_at_1pct_fpr": _num(recall_at_fpr(y, s, FPR))}
