"""Retention: prune each tenant's turns past its retention, keeping their alerts scrubbed."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from monitor.service.db import (
    Alert,
    Outbox,
    PendingTurn,
    Turn,
    TurnFeatures,
    VerdictRow,
    utcnow,
)

PRUNE_BATCH = 500


PRUNE_LOCK = 0x5AFE_0002  # advisory lock id: one prune at a time across instances


@dataclass
class PruneReport:
    turns: dict[str, int] = field(default_factory=dict)  # tenant -> turns deleted
    alerts_kept: int = 0  # alerts whose turn went; their metadata stays, text-bearing parts go
    outbox: int = 0  # outbox payloads of those alerts scrubbed the same way
    pending: int = 0  # batch turns never evaluated (raw text) past retention, deleted
    skipped: bool = False  # another instance was pruning (PostgreSQL)

    @property
    def total(self) -> int:
        return sum(self.turns.values())


def prune(
    sessions: sessionmaker[Session],
    default_days: int | None,
    tenant_days: dict[str, int],
    now: dt.datetime | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Delete each tenant's turns older than its retention, with their features and verdicts.

    Alerts stay (detector, severity, score, time, conversation id, summary) with their link to
    the turn cleared and their token evidence reduced to positions (token ids are text); their
    outbox payloads are scrubbed the same way (still deliverable). Batch turns still pending
    past retention (they hold text not yet redacted) are deleted. Runs in batches of
    ``PRUNE_BATCH`` turns, each its own transaction, so an interrupted prune leaves whole turns
    only and a rerun finishes the job. On PostgreSQL one instance prunes at a time; the others
    skip (``skipped``).
    """
    now = now or utcnow()
    report = PruneReport()
    with _exclusive(sessions) as mine:
        if not mine:
            report.skipped = True
            return report
        with sessions() as session:
            tenants = session.scalars(
                select(Turn.tenant).distinct().union(select(PendingTurn.tenant).distinct())
            ).all()
        for tenant in tenants:
            days = tenant_days.get(tenant, default_days)
            if days is None:
                continue
            cutoff = now - dt.timedelta(days=days)
            if dry_run:
                with sessions() as session:
                    n = session.scalar(
                        select(func.count())
                        .select_from(Turn)
                        .where(Turn.tenant == tenant, Turn.created_at < cutoff)
                    )
                if n:
                    report.turns[tenant] = int(n)
                continue
            _prune_tenant(sessions, tenant, cutoff, report)
    return report


def _prune_tenant(
    sessions: sessionmaker[Session], tenant: str, cutoff: dt.datetime, report: PruneReport
) -> None:
    with sessions() as session:
        gone = session.execute(
            delete(PendingTurn).where(PendingTurn.tenant == tenant, PendingTurn.created_at < cutoff)
        )
        report.pending += int(getattr(gone, "rowcount", 0) or 0)
        session.commit()
    while True:
        with sessions() as session:
            ids = session.scalars(
                select(Turn.id)
                .where(Turn.tenant == tenant, Turn.created_at < cutoff)
                .order_by(Turn.created_at)
                .limit(PRUNE_BATCH)
            ).all()
            if not ids:
                return
            report.turns[tenant] = report.turns.get(tenant, 0) + len(ids)
            alerts = session.scalars(select(Alert).where(Alert.turn_id.in_(ids))).all()
            for a in alerts:
                a.evidence = _scrub(a.evidence)
                report.alerts_kept += 1
            alert_ids = [a.id for a in alerts]
            for o in session.scalars(select(Outbox).where(Outbox.alert_id.in_(alert_ids))).all():
                o.payload = {
                    **o.payload,
                    "evidence": _scrub(o.payload.get("evidence")),
                    "metadata": {},
                }
                report.outbox += 1
            # Features and verdicts go with the turn (ON DELETE CASCADE); alerts keep a NULL
            # turn id (ON DELETE SET NULL). Said explicitly too, for back-ends where foreign
            # keys are off.
            session.execute(delete(TurnFeatures).where(TurnFeatures.turn_id.in_(ids)))
            session.execute(delete(VerdictRow).where(VerdictRow.turn_id.in_(ids)))
            session.execute(update(Alert).where(Alert.turn_id.in_(ids)).values(turn_id=None))
            session.execute(delete(Turn).where(Turn.id.in_(ids)))
            session.commit()


@contextlib.contextmanager
def _exclusive(sessions: sessionmaker[Session]) -> Iterator[bool]:
    """On PostgreSQL, a session advisory lock held while pruning; True when this call has it.

    The lock belongs to a connection, so one connection is held for the whole prune.
    """
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.scalar(select(func.pg_try_advisory_lock(PRUNE_LOCK))))
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.scalar(select(func.pg_advisory_unlock(PRUNE_LOCK)))
                conn.commit()


def _scrub(evidence: dict[str, Any] | None) -> dict[str, Any]:
    evidence = dict(evidence or {})
    evidence["tokens"] = [
        {k: v for k, v in t.items() if k != "token_id"} for t in evidence.get("tokens", [])
    ]
    evidence["pruned"] = True
    return evidence
