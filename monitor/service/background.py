"""The API's background loops: evaluate accepted batch turns, prune expired turns.

Both outlive database outages: a failed round is retried with backoff and reported to
``state.loops`` (``/readyz`` answers 503 while a loop is failing), and the loop resumes when the
database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select

from monitor.service.db import PendingTurn, claim, utcnow
from monitor.service.health import DB_UNAVAILABLE, Backoff
from monitor.service.ingest import TurnRequest
from monitor.service.retention import prune
from monitor.service.schemas import TurnIn

if TYPE_CHECKING:
    from monitor.service.app import State

log = logging.getLogger(__name__)

PENDING_LEASE_S = 300
PENDING_MAX_ATTEMPTS = 5


def _claim_pending(state: State, limit: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Lease due pending turns to this instance (SKIP LOCKED on PostgreSQL)."""
    now = utcnow()
    with state.sessions() as session:
        q = (
            select(PendingTurn)
            .where(PendingTurn.available_at <= now, PendingTurn.attempts < PENDING_MAX_ATTEMPTS)
            .order_by(PendingTurn.created_at)
            .limit(limit)
        )
        rows = session.scalars(claim(q, session)).all()
        out = []
        for r in rows:
            r.available_at = now + dt.timedelta(seconds=PENDING_LEASE_S)
            r.attempts += 1
            out.append((r.id, r.tenant, r.body))
        session.commit()
    return out


def _finish_pending(state: State, turn_id: str, error: str | None) -> None:
    """Done: delete the row. Failed: keep the error and retry later (doubling waits)."""
    with state.sessions() as session:
        row = session.get(PendingTurn, turn_id)
        if row is None:
            return
        if error is None:
            session.delete(row)
        else:
            row.last_error = error[:1000]
            row.available_at = utcnow() + dt.timedelta(seconds=2**row.attempts)
            log.error("pending turn %s failed (attempt %d): %s", turn_id, row.attempts, error)
        session.commit()


async def drain_pending(state: State) -> None:
    """Evaluate accepted batch turns; they go through the same batcher as synchronous ones."""
    # Outcomes not yet written back (the database went away between evaluating and finishing):
    # turn id -> error. Written first thing once the database answers again, so a turn caught
    # by an outage is retried seconds later, not left leased for PENDING_LEASE_S.
    unfinished: dict[str, str | None] = {}

    async def one(turn_id: str, tenant: str, body: dict[str, Any]) -> None:
        error = None
        try:
            t = TurnIn.model_validate(body)
            await state.ingest.submit(
                TurnRequest.of(t, tenant, source_id=f"batch:{turn_id}", turn_id=turn_id)
            )
        except ValidationError as exc:  # its text quotes the input (the turn's text): not logged
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            error = f"ValidationError: {problems}"
        except Exception as exc:  # stays pending, retried with backoff, then left for an operator
            error = f"{type(exc).__name__}: {exc}"
        unfinished[turn_id] = error

    def write_back() -> None:
        for turn_id, error in list(unfinished.items()):
            _finish_pending(state, turn_id, error)
            del unfinished[turn_id]

    backoff = Backoff()
    while True:
        try:
            await asyncio.to_thread(write_back)
            rows = await asyncio.to_thread(_claim_pending, state, state.settings.max_batch_turns)
        except Exception as exc:  # the database is away (or worse): report, wait, retry
            state.loops.failed("pending", exc)
            await asyncio.sleep(backoff.next())
            continue
        state.loops.ok("pending")
        backoff.reset()
        if rows:
            await asyncio.gather(*(one(*r) for r in rows))
            continue
        state.pending_event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.pending_event.wait(), timeout=1.0)


async def prune_periodically(state: State) -> None:
    """Retention: delete expired turns every ``retention_interval_s`` (0: never here)."""
    s = state.settings
    if not s.retention_interval_s or (s.retention_days is None and not s.tenant_retention_days):
        return
    backoff = Backoff(first=1.0, cap=min(60.0, s.retention_interval_s))
    while True:
        try:
            report = await asyncio.to_thread(
                prune, state.sessions, s.retention_days, s.tenant_retention_days
            )
        except DB_UNAVAILABLE as exc:  # retried soon, not a whole interval later
            state.loops.failed("retention", exc)
            await asyncio.sleep(backoff.next())
            continue
        except Exception:  # not an outage: retried next interval; the service carries on
            log.exception("retention prune failed")
            await asyncio.sleep(s.retention_interval_s)
            continue
        state.loops.ok("retention")
        backoff.reset()
        if report.total:
            log.info("retention: pruned %d turns (%s)", report.total, report.turns)
            state.metrics.pruned.inc(report.total)
        await asyncio.sleep(s.retention_interval_s)
