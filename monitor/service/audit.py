"""Audit queries: search conversations and alerts, stream exports, prune expired turns.

One filter (``AuditFilter``) serves the API, the web UI and the exports, so a search on the
page, in the API and in an export always selects the same rows. Every query is tenant-scoped.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Select,
    Text,
    and_,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from monitor.service.db import (
    Alert,
    Outbox,
    PendingTurn,
    Turn,
    TurnFeatures,
    VerdictRow,
    utcnow,
)

log = logging.getLogger(__name__)
SEVERITIES = ("info", "low", "medium", "high", "critical")


@dataclass(frozen=True)
class AuditFilter:
    """What an auditor searches by; empty fields do not filter."""

    tenant: str | None  # None: every tenant (operator commands only, never the API)
    detector: str | None = None
    severity: str | None = None
    model: str | None = None  # the pipeline name
    conversation_id: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    text: str | None = None  # case-insensitive substring of the turn's messages
    metadata: dict[str, str] = field(default_factory=dict)  # turn metadata field == value

    def __post_init__(self) -> None:
        # One time zone for every back-end: SQLite compares stored times as text, so an
        # offset other than UTC (or none, read as UTC) must be converted before comparing.
        for name in ("since", "until"):
            when = getattr(self, name)
            if when is not None:
                when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
                object.__setattr__(self, name, when.astimezone(dt.UTC))

    @staticmethod
    def parse_metadata(items: list[str] | None) -> dict[str, str]:
        """``["app=mail", "region=eu"]`` to a dict (empty items ignored); ValueError names the
        bad item."""
        out: dict[str, str] = {}
        for item in items or []:
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"metadata filter {item!r} is not FIELD=VALUE")
            out[name.strip()] = value
        return out

    def _turn_clauses(self) -> list[Any]:
        clauses: list[Any] = [] if self.tenant is None else [Turn.tenant == self.tenant]
        if self.model:
            clauses.append(Turn.pipeline == self.model)
        if self.conversation_id:
            clauses.append(Turn.conversation_id == self.conversation_id)
        if self.text:
            # A case-insensitive substring of the messages' content, what auditors expect (no
            # stemming); turns stored before search_text existed were backfilled by migration.
            clauses.append(Turn.search_text.contains(self.text.lower(), autoescape=True))
        for name, value in self.metadata.items():
            clauses.append(_meta_field(name) == value)
        return clauses

    def _alert_clauses(self) -> list[Any]:
        clauses: list[Any] = [] if self.tenant is None else [Alert.tenant == self.tenant]
        if self.detector:
            clauses.append(Alert.detector == self.detector)
        if self.severity:
            clauses.append(Alert.severity == self.severity)
        if self.model:
            clauses.append(Alert.pipeline == self.model)
        if self.conversation_id:
            clauses.append(Alert.conversation_id == self.conversation_id)
        if self.since:
            clauses.append(Alert.created_at >= self.since)
        if self.until:
            clauses.append(Alert.created_at < self.until)
        if self.text or self.metadata:
            turn = self._turn_clauses()
            clauses.append(Alert.turn_id.in_(select(Turn.id).where(*turn)))
        return clauses

    def alerts(self) -> Select[Alert]:
        """Matching alerts, newest first."""
        return (
            select(Alert).where(*self._alert_clauses()).order_by(Alert.created_at.desc(), Alert.id)
        )

    def turns(self) -> Select[Turn]:
        """Matching turns, oldest first; detector/severity: turns that raised such an alert."""
        clauses = self._turn_clauses()
        if self.since:
            clauses.append(Turn.created_at >= self.since)
        if self.until:
            clauses.append(Turn.created_at < self.until)
        if self.detector or self.severity:
            alert = [Alert.turn_id == Turn.id]
            if self.detector:
                alert.append(Alert.detector == self.detector)
            if self.severity:
                alert.append(Alert.severity == self.severity)
            clauses.append(exists().where(*alert))
        return select(Turn).where(*clauses).order_by(Turn.created_at, Turn.id)

    def conversations(self) -> Select[Any]:
        """One row per matching conversation: id, turns, first/last time, alerts; newest first."""
        turns = self.turns().order_by(None).subquery()
        alerts = (
            select(
                Alert.conversation_id,
                func.count(Alert.id).label("alerts"),
            )
            .where(*([] if self.tenant is None else [Alert.tenant == self.tenant]))
            .group_by(Alert.conversation_id)
            .subquery()
        )
        return (
            select(
                turns.c.conversation_id,
                func.count(turns.c.id).label("turns"),
                func.min(turns.c.created_at).label("first_at"),
                func.max(turns.c.created_at).label("last_at"),
                func.min(turns.c.pipeline).label("model"),
                func.coalesce(func.max(alerts.c.alerts), 0).label("alerts"),
            )
            .select_from(turns)
            .outerjoin(alerts, alerts.c.conversation_id == turns.c.conversation_id)
            .group_by(turns.c.conversation_id)
            .order_by(func.max(turns.c.created_at).desc(), turns.c.conversation_id)
        )

    def counts(self, session: Session) -> dict[str, dict[str, int]]:
        """Alert counts per detector and per severity under this filter (the list's facets)."""
        clauses = self._alert_clauses()
        out: dict[str, dict[str, int]] = {}
        for column, name in ((Alert.detector, "detector"), (Alert.severity, "severity")):
            rows = session.execute(
                select(column, func.count()).where(*clauses).group_by(column)
            ).all()
            out[name] = {str(k): int(n) for k, n in sorted(rows, key=lambda r: -r[1])}
        return out


# A stored JSON document that PostgreSQL cannot turn into text: an escaped NUL, or a lone
# surrogate (a high one not followed by a low one, a low one not after a high one). Every JSON
# operator on such a row fails (not only on the key asked for), so metadata search skips those
# rows instead of failing; the API no longer accepts them. ``_ESCAPE`` is an even run of
# backslashes: after an odd one, "u0000" is text, not an escape.
_ESCAPE = r"(?<!\\)(?:\\\\)*"
_UNREADABLE_JSON = (
    rf"{_ESCAPE}\\u0000"
    rf"|{_ESCAPE}\\u[dD][89abAB][0-9a-fA-F]{{2}}(?!\\u[dD][c-fC-F][0-9a-fA-F]{{2}})"
    rf"|{_ESCAPE}(?<!\\u[dD][89abAB][0-9a-fA-F]{{2}})\\u[dD][c-fC-F][0-9a-fA-F]{{2}}"
)


class _Unreadable(FunctionElement[bool]):
    """True where PostgreSQL could not read a stored JSON document as text (SQLite can)."""

    type = Boolean()
    inherit_cache = True
    name = "unreadable_json"


@compiles(_Unreadable)
def _readable_elsewhere(element: _Unreadable, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(false(), **kw))


@compiles(_Unreadable, "postgresql")
def _unreadable_on_postgresql(element: _Unreadable, compiler: Any, **kw: Any) -> str:
    (column,) = element.clauses
    return str(compiler.process(cast(column, Text).regexp_match(_UNREADABLE_JSON), **kw))


def _meta_field(name: str) -> Any:
    """A turn's metadata field as text, NULL where the stored document cannot be read."""
    return case((_Unreadable(Turn.meta), None), else_=Turn.meta[name].as_string())


def parse_day(value: str | None, name: str) -> dt.datetime | None:
    """``2026-11-01`` or a full ISO time (UTC unless it says otherwise), in UTC; ValueError
    names the option."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        return when.astimezone(dt.UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset past year 1 or 9999
        raise ValueError(
            f"{name}: {value!r} is not an ISO date or time (2026-11-21 or 2026-11-21T09:30Z)"
        ) from None


def alert_json(a: Alert) -> dict[str, Any]:
    return {
        "alert_id": a.id,
        "turn_id": a.turn_id,
        "conversation_id": a.conversation_id,
        "pipeline": a.pipeline,
        "detector": a.detector,
        "kind": a.kind,
        "severity": a.severity,
        "suppressed": a.suppressed,
        "score": a.score,
        "summary": a.summary,
        "created_at": a.created_at.isoformat(),
        "evidence": a.evidence,
    }


def turn_json(t: Turn) -> dict[str, Any]:
    return {
        "turn_id": t.id,
        "conversation_id": t.conversation_id,
        "created_at": t.created_at.isoformat(),
        "pipeline": t.pipeline,
        "messages": t.messages,
        "metadata": t.meta,
        "n_tokens": t.n_tokens,
        "dropped_tokens": t.dropped,
    }


def conversation_json(row: Any) -> dict[str, Any]:
    return {
        "conversation_id": row.conversation_id,
        "turns": int(row.turns),
        "alerts": int(row.alerts),
        "model": row.model,
        "first_at": _iso(row.first_at),
        "last_at": _iso(row.last_at),
    }


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


# -- export ----------------------------------------------------------------------------------

EXPORT_PAGE = 500
ALERT_COLUMNS = ("alert_id", "created_at", "conversation_id", "turn_id", "pipeline", "detector",
                 "kind", "severity", "score", "suppressed", "summary")  # fmt: skip
TURN_COLUMNS = ("turn_id", "created_at", "conversation_id", "pipeline", "n_tokens",
                "dropped_tokens", "metadata", "messages")  # fmt: skip


def export(
    sessions: sessionmaker[Session], what: str, fmt: str, flt: AuditFilter
) -> Iterator[bytes]:
    """Stream matching alerts or turns as JSONL or CSV, a page of rows at a time.

    Rows are read with keyset pagination (never the whole result in memory, no long-held
    cursor); each page is its own short read. A failure part-way is logged and raised to the
    consumer: the API's streamed reply is then aborted (the client sees an incomplete read, never
    a short file that looks complete), the CLI keeps no file.
    """
    if what not in ("alerts", "turns"):
        raise ValueError(f"export what={what!r}: choose alerts or turns")
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format={fmt!r}: choose jsonl or csv")
    columns = ALERT_COLUMNS if what == "alerts" else TURN_COLUMNS
    if fmt == "csv":
        yield _csv_line(columns)
    rows = 0
    try:
        for obj in _pages(sessions, what, flt):
            doc = alert_json(obj) if isinstance(obj, Alert) else turn_json(obj)
            if fmt == "jsonl":
                yield (json.dumps(doc, ensure_ascii=False) + "\n").encode()
            else:
                yield _csv_line([_cell(doc[c]) for c in columns])
            rows += 1
    except Exception:  # not GeneratorExit: a client going away is no failure
        log.exception("export of %s failed after %d rows; the output is incomplete", what, rows)
        raise


def _pages(sessions: sessionmaker[Session], what: str, flt: AuditFilter) -> Iterator[Any]:
    model: Any = Alert if what == "alerts" else Turn
    base = (flt.alerts() if what == "alerts" else flt.turns()).order_by(None)
    after: tuple[dt.datetime, str] | None = None
    while True:
        q = base
        if after is not None:
            q = q.where(
                or_(
                    model.created_at > after[0],
                    and_(model.created_at == after[0], model.id > after[1]),
                )
            )
        q = q.order_by(model.created_at, model.id).limit(EXPORT_PAGE)
        with sessions() as session:
            rows = session.scalars(q).all()
        yield from rows
        if len(rows) < EXPORT_PAGE:
            return
        after = (rows[-1].created_at, rows[-1].id)


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula (client-supplied ids, text) is quoted.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_line(cells: Any) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue().encode()


# -- per-token features -----------------------------------------------------------------------


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


# -- retention --------------------------------------------------------------------------------

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
                    n = session.scalar(select(func.count()).select_from(Turn).where(
                        Turn.tenant == tenant, Turn.created_at < cutoff))  # fmt: skip
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
            delete(PendingTurn).where(PendingTurn.tenant == tenant,
                                      PendingTurn.created_at < cutoff)
        )  # fmt: skip
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
                o.payload = {**o.payload, "evidence": _scrub(o.payload.get("evidence")),
                             "metadata": {}}  # fmt: skip
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
