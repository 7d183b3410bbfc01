"""Audit queries: the one filter by which conversations, turns and alerts are searched.

One filter (``AuditFilter``) serves the API, the web UI and the exports, so a search on the
page, in the API and in an export always selects the same rows. Every query is tenant-scoped.
Its rows' JSON views are in :mod:`monitor.service.rows`, the export in
:mod:`monitor.service.export`, retention in :mod:`monitor.service.retention`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Boolean, Select, Text, and_, case, cast, exists, false, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement

from monitor.service.db import Alert, Turn

NONE = "none"  # a verdict or assignee filter for alerts that have none


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
    # Triage (alerts only): status, verdict ("none": not judged yet), assignee ("none": nobody).
    status: str | None = None
    verdict: str | None = None
    assignee: str | None = None

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
        clauses.extend(self._triage_clauses())
        if self.text or self.metadata:
            turn = self._turn_clauses()
            clauses.append(Alert.turn_id.in_(select(Turn.id).where(*turn)))
        return clauses

    def _triage_clauses(self) -> list[Any]:
        clauses: list[Any] = []
        if self.status:
            clauses.append(Alert.status == self.status)
        for column, wanted in ((Alert.verdict, self.verdict), (Alert.assignee, self.assignee)):
            if wanted:
                clauses.append(column.is_(None) if wanted == NONE else column == wanted)
        return clauses

    def alerts(self) -> Select[Alert]:
        """Matching alerts, newest first."""
        return (
            select(Alert).where(*self._alert_clauses()).order_by(Alert.created_at.desc(), Alert.id)
        )

    def turns(self) -> Select[Turn]:
        """Matching turns, oldest first; detector, severity and triage fields: turns that raised
        such an alert."""
        clauses = self._turn_clauses()
        if self.since:
            clauses.append(Turn.created_at >= self.since)
        if self.until:
            clauses.append(Turn.created_at < self.until)
        triage = self._triage_clauses()
        if self.detector or self.severity or triage:
            alert = [Alert.turn_id == Turn.id, *triage]
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
        """Alert counts per detector, severity and status under this filter (the list's
        facets)."""
        clauses = self._alert_clauses()
        out: dict[str, dict[str, int]] = {}
        facets = (
            (Alert.detector, "detector"),
            (Alert.severity, "severity"),
            (Alert.status, "status"),
        )
        for column, name in facets:
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


T = TypeVar("T")


def keyset_pages(
    sessions: sessionmaker[Session],
    query: Select[Any],
    model: Any,
    size: int,
    within: Callable[[Session, list[Any]], T] | None = None,
) -> Iterator[tuple[list[Any], T | None]]:
    """``query``'s rows (turns or alerts) ``size`` at a time, oldest first, by keyset on
    (created_at, id): each page is read in a short session of its own, so a long scan holds no
    transaction open and sees rows committed meanwhile; ``within(session, rows)`` runs in that
    session and its result comes with the page."""
    base = query.order_by(None).order_by(model.created_at, model.id)
    after: tuple[dt.datetime, str] | None = None
    while True:
        page = base
        if after is not None:
            page = page.where(
                or_(
                    model.created_at > after[0],
                    and_(model.created_at == after[0], model.id > after[1]),
                )
            )
        with sessions() as session:
            rows = list(session.scalars(page.limit(size)).all())
            extra = within(session, rows) if within is not None and rows else None
        if not rows:
            return
        yield rows, extra
        if len(rows) < size:
            return
        after = (rows[-1].created_at, rows[-1].id)
