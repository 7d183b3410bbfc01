"""``detectors eval`` and ``detectors fire-rate``: each labelled detector's quality beside its
probes and baselines, and how often each detector fires on real (unlabelled) traffic."""

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


def evaluate(
    engine: Engine,
    data: LabelledSet,
    batch: TurnBatch,
    traffic: LabelledSet | None = None,
    traffic_batch: TurnBatch | None = None,
) -> dict[str, dict[str, Any]]:
    """Per labelled detector: counts, AUROC, recall at 1% FPR, precision and recall as it fires.

    Each probe declared as ``signal_of`` a detector is scored on the same examples: the dense
    (residual) probe's AUROC is the baseline every rule is compared with. With ``traffic``
    (real turns, labels optional), each detector and probe is also scored with the traffic as
    its negatives (a turn a reader labelled a positive for the detector is left out of them),
    and its fire rate on that traffic is reported.
    """
    results = engine.score(batch)
    t_results = engine.score(traffic_batch) if traffic_batch is not None else None
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
        if traffic is not None and t_results is not None:
            entry["traffic"] = _against_traffic(
                engine, detector_id, y, rows, results, traffic, t_results
            )
        report[detector_id] = entry
    return report


def _against_traffic(
    engine: Engine,
    detector_id: str,
    y: np.ndarray,
    rows: list[int],
    results: dict[str, tuple[Any, Any]],
    traffic: LabelledSet,
    t_results: dict[str, tuple[Any, Any]],
) -> dict[str, Any]:
    """The data's positives against real-traffic negatives, for the detector and its probes."""
    negs = [i for i, e in enumerate(traffic.examples) if e.labels.get(detector_id, 0) == 0]
    out: dict[str, Any] = {"n_neg": len(negs)}
    ids = [detector_id] + [d.id for d in engine.detectors if d.spec.signal_of == detector_id]
    for det_id in ids:
        pos_scores = results[det_id][0].numpy()[rows][y == 1]
        neg_scores = t_results[det_id][0].numpy()[negs]
        fired = t_results[det_id][1].numpy()[negs]
        labels = np.r_[np.ones(len(pos_scores)), np.zeros(len(neg_scores))]
        scores = np.r_[pos_scores, neg_scores]
        key = "rule" if det_id == detector_id else _probe_key(engine, det_id)
        out[key] = {
            "fire_rate": _num(float(fired.mean())) if negs else None,
            "auroc": _num(auroc(labels, scores)),
            "recall_at_1pct_fpr": _num(recall_at_fpr(labels, scores, FPR)),
        }
    return out


def _probe_key(engine: Engine, detector_id: str) -> str:
    d = engine.detector(detector_id)
    return "dense_probe" if isinstance(d, ResidualProbeDetector) else "sae_probe"


def fire_rates(
    engine: Engine, data: LabelledSet, batch: TurnBatch, top: int = 3
) -> dict[str, dict[str, Any]]:
    """Per detector: fires on the traffic, fires per 1,000 turns, and the top-scoring turns."""
    results = engine.score(batch)
    n = len(data.examples)
    report: dict[str, dict[str, Any]] = {}
    for d in engine.detectors:
        scores, fired = (t.numpy() for t in results[d.id])
        order = np.argsort(-scores, kind="stable")[:top]
        report[d.id] = {
            "kind": d.spec.kind,
            "fired": int(fired.sum()),
            "per_1000": round(1000 * float(fired.sum()) / n, 2),
            "top": [
                {
                    "id": data.examples[i].id,
                    "line": data.examples[i].line,
                    "score": round(float(scores[i]), 4),
                    "fired": bool(fired[i]),
                    "preview": _preview(data.examples[i]),
                }
                for i in order.tolist()
            ],
        }
    return report


def _preview(example: Any, chars: int = 160) -> str:
    text = " | ".join(f"{m.role}: {m.content}" for m in example.messages)
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def text_baseline(
    train_texts: list[str], y_train: np.ndarray, texts: list[str], y: np.ndarray
) -> dict[str, float | None]:
    """TF-IDF word and character n-grams + logistic regression: what plain text gets."""
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000)
    model = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced")
    model.fit(vec.fit_transform(train_texts), y_train)
    s = model.decision_function(vec.transform(texts))
    return {"auroc": _num(auroc(y, s)), "recall_at_1pct_fpr": _num(recall_at_fpr(y, s, FPR))}
