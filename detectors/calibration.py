"""Operating points: where a detector fires, set on real traffic (the alert budget) or on a
labelled set's negatives, and written back into its definition file."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors.batch import TurnBatch
from detectors.dataset import LabelledSet
from detectors.engine import Detector, Engine, RuleDetector
from detectors.metrics import precision_recall, threshold_for_fpr
from detectors.rules import Calibration, ProbeSpec, RuleSpec, load_definitions, write_definition

MIN_POINT = 1e-6  # below this the traffic never reached the detector: the budget does not bind


class CalibrationError(ValueError):
    """The operating point cannot be set from what was given; the message says why."""


@dataclass(frozen=True)
class CalibrationResult:
    detector_id: str
    point: float  # rules: the factor on every cut-off; probes: the probability threshold
    calibration: Calibration
    summary: str

    def write(self, paths: Sequence[Path], data: str | None, traffic: str | None) -> Path:
        """Rewrite the detector's file with the new point; lands whole or not at all."""
        for file, spec in load_definitions(paths):
            if spec.id != self.detector_id:
                continue
            cal = self.calibration.model_copy(update={"data": data, "traffic": traffic})
            if isinstance(spec, RuleSpec):
                prior = (
                    spec.calibration.scale if spec.calibration and spec.calibration.scale else 1.0
                )
                cal = cal.model_copy(update={"scale": round(prior * self.point, 6)})
                new: RuleSpec | ProbeSpec = spec.scaled(self.point).model_copy(
                    update={"calibration": cal}
                )
            else:
                # exact: a rounded threshold can fall below the last turn the budget allows
                probe = spec.probe.model_copy(update={"threshold": float(self.point)})
                new = spec.model_copy(update={"probe": probe, "calibration": cal})
            write_definition(new, file)
            return file
        raise CalibrationError(f"no definition {self.detector_id!r} in the catalog")


def calibrate(
    engine: Engine,
    detector: Detector,
    data: LabelledSet | None,
    traffic: LabelledSet | None,
    batches: dict[str, tuple[list[int], TurnBatch]],
    budget: float,
    fpr: float,
) -> CalibrationResult:
    """The point at which ``detector`` fires on at most ``budget`` of the traffic turns (those not
    labelled positive for it), or, without traffic, on at most ``fpr`` of the data's negatives."""
    det_id = detector.id
    label_id = detector.spec.judged_by
    rule = isinstance(detector, RuleDetector)
    y_data = scores_data = None
    if data is not None:
        rows, batch = batches["data"]
        y_data = np.asarray([data.examples[i].labels[label_id] for i in rows])
        scores_data = engine.score(batch)[det_id][0].numpy()
    traffic_neg = None
    if traffic is not None:
        rows, batch = batches["traffic"]
        scores = engine.score(batch)[det_id][0].numpy()
        keep = [j for j, i in enumerate(rows) if traffic.examples[i].labels.get(label_id, 0) == 0]
        if not keep:
            raise CalibrationError("the traffic holds no turns that are not positives")
        traffic_neg = scores[keep]
        point = threshold_for_fpr(traffic_neg, budget)
        if point < MIN_POINT:
            raise CalibrationError(
                f"{det_id} never scores above zero on the traffic, so the budget does not bind; "
                "calibrate it on labelled negatives with --data and --fpr instead"
            )
    else:
        assert y_data is not None and scores_data is not None
        if (y_data == 0).sum() == 0:
            raise CalibrationError(f"the data has no negatives for {det_id!r}")
        point = threshold_for_fpr(scores_data[y_data == 0], fpr)
        if point < MIN_POINT:
            raise CalibrationError("the negatives do not reach the detector at all")
    if not rule:
        point = float(np.clip(point, MIN_POINT, 1 - MIN_POINT))
    # A rule fires at score >= 1 after its cut-offs are scaled by ``point``; a probe at >= point.
    parts = []
    n_traffic = None
    if traffic_neg is not None:
        n_traffic = len(traffic_neg)
        fired = int((traffic_neg >= point).sum())
        parts.append(
            f"fires on {fired} of {n_traffic} traffic turns "
            f"({fired / n_traffic:.4f}; budget {budget})"
        )
    n_neg = None
    if y_data is not None and scores_data is not None:
        fired_data = scores_data >= point
        precision, recall = precision_recall(y_data, fired_data)
        n_neg = int((y_data == 0).sum())
        neg_rate = float(fired_data[y_data == 0].mean()) if n_neg else float("nan")
        parts.append(
            f"labelled data: recall {recall:.3f}, precision {precision:.3f}, "
            f"FPR {neg_rate:.4f} ({int(y_data.sum())} pos, {n_neg} neg)"
        )
    what = f"cut-offs x {point:.4f}" if rule else f"threshold {point:.4f}"
    cal = Calibration(
        budget=budget if traffic_neg is not None else None,
        n_traffic=n_traffic,
        target_fpr=fpr if traffic_neg is None else None,
        n_neg=n_neg,
        at=dt.date.today().isoformat(),
    )
    return CalibrationResult(det_id, float(point), cal, f"{what} → " + "; ".join(parts))
