"""Triage fed back into the detectors: triaged alerts as a labelled set, and a sample of stored
traffic, in the JSONL format ``detectors eval`` and ``detectors calibrate`` read
(``detectors.dataset``).

Each alert of the detector judged ``true_positive`` (label 1) or ``false_positive`` (label 0)
whose turn is still stored becomes one line: ``{"id", "messages", "labels", ...}`` with the
turn's messages as stored (redacted), labelled for the detector and for the rule it is judged
by (a probe's ``signal_of``). ``unsure`` and unjudged alerts are left out, as are escalation
alerts (about volume, not one turn's text), alerts whose turn retention has pruned, and turns
two alerts judged both ways. The traffic sample is drawn uniformly from the stored turns of the
same scope, alerted or not (so the share the detector fires on is the real one, which an alert
budget is set against); a sampled turn triage judged carries that label, the others none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.service.db import Alert, Turn
from monitor.service.rows import utc_iso

LABEL = {"true_positive": 1, "false_positive": 0}


@dataclass
class ExportCounts:
    positives: int = 0
    negatives: int = 0
    unsure: int = 0  # judged unsure: left out
    pruned: int = 0  # the turn is gone (retention)
    conflicting: int = 0  # turns judged both ways by two alerts
    traffic: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return self.positives + self.negatives


def labelled_examples(
    session: Session,
    detector: str,
    label_ids: Sequence[str],
    counts: ExportCounts,
    *,
    tenant: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The detector's triaged alerts (made in [since, until)) as labelled examples, oldest
    first; ``counts`` says what was written and what was left out."""
    clauses: list[Any] = [Alert.detector == detector, Alert.kind != "escalation"]
    if tenant is not None:
        clauses.append(Alert.tenant == tenant)
    if since is not None:
        clauses.append(Alert.created_at >= since)
    if until is not None:
        clauses.append(Alert.created_at < until)
    counts.unsure = int(
        session.scalar(
            select(func.count()).select_from(Alert).where(*clauses, Alert.verdict == "unsure")
        )
        or 0
    )
    judged = [*clauses, Alert.verdict.in_(tuple(LABEL))]
    counts.pruned = int(
        session.scalar(
            select(func.count())
            .select_from(Alert)
            .outerjoin(Turn, Turn.id == Alert.turn_id)
            .where(*judged, Turn.id.is_(None))
        )
        or 0
    )
    rows = session.execute(
        select(Alert, Turn)
        .join(Turn, Turn.id == Alert.turn_id)
        .where(*judged)
        .order_by(Alert.created_at, Alert.id)
    ).all()
    by_turn: dict[str, dict[str, Any]] = {}
    conflicts: set[str] = set()
    for alert, turn in rows:
        label = LABEL[str(alert.verdict)]
        seen = by_turn.get(turn.id)
        if seen is not None:
            if next(iter(seen["labels"].values())) != label:
                conflicts.add(turn.id)
            continue
        by_turn[turn.id] = {
            "id": alert.id,
            "messages": turn.messages,
            "labels": dict.fromkeys(label_ids, label),
            "source": "triage",
            "verdict": alert.verdict,
            "alert_id": alert.id,
            "turn_id": turn.id,
            "tenant": alert.tenant,
            "pipeline": alert.pipeline,
            "created_at": utc_iso(alert.created_at),
        }
    counts.conflicting = len(conflicts)
    counts.skipped_ids = sorted(conflicts)
    out = [ex for tid, ex in by_turn.items() if tid not in conflicts]
    counts.positives = sum(next(iter(ex["labels"].values())) == 1 for ex in out)
    counts.negatives = len(out) - counts.positives
    return out


def traffic_sample(
    session: Session,
    detector: str,
    label_ids: Sequence[str],
    n: int,
    counts: ExportCounts,
    *,
    tenant: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Up to ``n`` stored turns drawn at random (made in [since, until)), as unlabelled
    traffic; those triage judged for the detector carry that label."""
    clauses: list[Any] = []
    if tenant is not None:
        clauses.append(Turn.tenant == tenant)
    if since is not None:
        clauses.append(Turn.created_at >= since)
    if until is not None:
        clauses.append(Turn.created_at < until)
    turns = session.scalars(select(Turn).where(*clauses).order_by(func.random()).limit(n)).all()
    verdicts: dict[str, set[int]] = {}
    ids = [t.id for t in turns]
    for start in range(0, len(ids), 500):
        for turn_id, verdict in session.execute(
            select(Alert.turn_id, Alert.verdict).where(
                Alert.turn_id.in_(ids[start : start + 500]),
                Alert.detector == detector,
                Alert.kind != "escalation",
                Alert.verdict.in_(tuple(LABEL)),
            )
        ).all():
            verdicts.setdefault(str(turn_id), set()).add(LABEL[str(verdict)])
    for t in turns:
        doc: dict[str, Any] = {
            "id": t.id,
            "messages": t.messages,
            "source": "traffic",
            "tenant": t.tenant,
            "pipeline": t.pipeline,
            "created_at": utc_iso(t.created_at),
        }
        judged = verdicts.get(t.id, set())
        if len(judged) == 1:
            doc["labels"] = dict.fromkeys(label_ids, next(iter(judged)))
        counts.traffic += 1
        yield doc
