"""Silences: a detector's fires for a tenant, or for every tenant (``tenant`` None: the
operator's, made and expired with the CLI only; every key is one tenant's and no tenant may
silence another), optionally narrowed to one pipeline and to fires whose evidence has a feature
matching a pattern (``silence_match``), withheld from alerting for a time window, with a reason.

While a silence is active, a fire of its detector is stored as always (the turn, its verdict,
``fired`` true) and counted (the verdict row names the silence in ``silence_id``, the silence's
``fires`` grows, ``safety_monitor_silenced_fires_total`` too), but makes no alert: no alert row,
no outbox row, no delivery, no cooldown fold, no escalation (and a window's count leaves
silenced fires out). Silences are never deleted: they expire at ``ends_at``, or when someone
expires them early (``expired_by``), and stay listed.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from monitor.service.db import Silence, Turn, VerdictRow, utcnow
from monitor.service.rows import utc_iso
from monitor.service.silence_match import fire_matches, normalise

State = Literal["pending", "active", "expired"]
STATES: tuple[str, ...] = ("pending", "active", "expired")
MAX_SILENCE = dt.timedelta(days=90)
MAX_REASON = 1000
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SilenceError(ValueError):
    """A silence that cannot be made as asked; ``field`` names the input at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class SilenceNotFoundError(LookupError):
    """No such silence in this tenant."""


class SilenceRefusedError(PermissionError):
    """An all-tenant silence, expired through a tenant's key (only the operator may)."""

    def __init__(self, silence_id: int) -> None:
        super().__init__(
            f"silence {silence_id} applies to every tenant: only the operator expires it "
            f"(safety-monitor silences expire {silence_id})"
        )


def _affecting(tenant: str) -> ColumnElement[bool]:
    """The silences that apply to a tenant: its own and the all-tenant ones."""
    return or_(Silence.tenant == tenant, Silence.tenant.is_(None))


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w``, or several (``1h30m``); ValueError otherwise."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"{text!r} is not a duration (90s, 30m, 2h, 7d, 1w, 1h30m)")
    return dt.timedelta(seconds=sum(int(n) * _UNIT[u] for n, u in parts))


def _utc(when: dt.datetime) -> dt.datetime:
    when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
    return when.astimezone(dt.UTC)


def create(
    session: Session,
    *,
    tenant: str | None,
    detector: str,
    reason: str,
    created_by: str,
    pipeline: str | None = None,
    features: str | None = None,
    starts_at: dt.datetime | None = None,
    ends_at: dt.datetime | None = None,
    duration: dt.timedelta | None = None,
) -> Silence:
    """A new silence from ``starts_at`` (default now) to ``ends_at`` or for ``duration``, of
    ``tenant`` (None: every tenant; the caller checks the key may), narrowed to the fires matching
    ``features`` (blank: every fire), which is stored normalised."""
    now = utcnow()
    start = _utc(starts_at) if starts_at is not None else now
    if (ends_at is None) == (duration is None):
        raise SilenceError("ends_at", "give exactly one of ends_at or duration")
    end = _utc(ends_at) if ends_at is not None else start + (duration or dt.timedelta())
    where = "ends_at" if ends_at is not None else "duration"
    if end <= max(start, now):
        raise SilenceError(where, "the silence would end before it starts or in the past")
    if end - start > MAX_SILENCE:
        raise SilenceError(where, f"at most {MAX_SILENCE.days} days; fix the detector instead")
    if not reason.strip():
        raise SilenceError("reason", "say why (it is shown with the silence)")
    pattern = None
    if features is not None and features.strip():
        try:
            pattern = normalise(features)[1]
        except ValueError as exc:
            raise SilenceError("features", str(exc)) from None
    silence = Silence(
        tenant=tenant,
        detector=detector,
        pipeline=pipeline,
        features=pattern,
        reason=reason.strip()[:MAX_REASON],
        created_by=created_by,
        starts_at=start,
        ends_at=end,
        created_at=now,
        fires=0,
    )
    session.add(silence)
    session.flush()
    return silence


def silence_state(s: Silence, now: dt.datetime | None = None) -> State:
    now = now or utcnow()
    if _utc(s.ends_at) <= now:
        return "expired"
    return "pending" if _utc(s.starts_at) > now else "active"


def silence_json(
    s: Silence, now: dt.datetime | None = None, fires: int | None = None
) -> dict[str, Any]:
    """The silence as the API lists it; ``fires`` in place of its own count (every tenant's)."""
    return {
        "id": s.id,
        "tenant": s.tenant,
        "all_tenants": s.tenant is None,
        "detector": s.detector,
        "pipeline": s.pipeline,
        "features": s.features,
        "reason": s.reason,
        "created_by": s.created_by,
        "starts_at": utc_iso(s.starts_at),
        "ends_at": utc_iso(s.ends_at),
        "created_at": utc_iso(s.created_at),
        "expired_by": s.expired_by,
        "state": silence_state(s, now),
        "fires": s.fires if fires is None else fires,
    }


def list_silences(
    session: Session,
    tenant: str | None,
    state: str | None = None,
    detector: str | None = None,
    limit: int = 100,
) -> list[Silence]:
    """Silences affecting a tenant (its own and the all-tenant ones), or every silence for None,
    latest ending first; ``state``: only pending, active or expired ones."""
    now = utcnow()
    query = select(Silence)
    if tenant is not None:
        query = query.where(_affecting(tenant))
    if detector:
        query = query.where(Silence.detector == detector)
    if state == "expired":
        query = query.where(Silence.ends_at <= now)
    elif state == "active":
        query = query.where(Silence.starts_at <= now, Silence.ends_at > now)
    elif state == "pending":
        query = query.where(Silence.starts_at > now, Silence.ends_at > now)
    query = query.order_by(Silence.ends_at.desc(), Silence.id.desc()).limit(limit)
    return list(session.scalars(query).all())


def listed(
    session: Session,
    tenant: str | None,
    state: str | None = None,
    detector: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """``list_silences`` as the API shows them. For a tenant, an all-tenant silence counts only
    the tenant's own withheld fires: its total would tell one tenant how often the others fire."""
    rows = list_silences(session, tenant, state, detector, limit)
    shared = [r.id for r in rows if r.tenant is None]
    own: dict[int, int] = {}
    if tenant is not None and shared:
        counted = session.execute(
            select(VerdictRow.silence_id, func.count())
            .join(Turn, Turn.id == VerdictRow.turn_id)
            .where(VerdictRow.silence_id.in_(shared), Turn.tenant == tenant)
            .group_by(VerdictRow.silence_id)
        )
        own = {i: 0 for i in shared} | {int(i or 0): int(n) for i, n in counted.all()}
    now = utcnow()
    return [silence_json(r, now, own.get(r.id)) for r in rows]


def expire(
    session: Session, tenant: str | None, silence_id: int, who: str, *, operator: bool = True
) -> Silence:
    """End a silence now (one not started yet never starts); an expired one is left as is.
    ``tenant``: one of its own or an all-tenant one (None: any); an all-tenant one only by the
    ``operator`` (SilenceRefusedError)."""
    query = select(Silence).where(Silence.id == silence_id)
    if tenant is not None:
        query = query.where(_affecting(tenant))
    silence = session.scalar(query)
    if silence is None:
        raise SilenceNotFoundError(silence_id)
    if silence.tenant is None and not operator:
        raise SilenceRefusedError(silence_id)
    now = utcnow()
    if silence_state(silence, now) != "expired":
        silence.ends_at, silence.expired_by = now, who
        if _utc(silence.starts_at) > now:
            silence.starts_at = now
        session.flush()
    return silence


def active_silence(
    session: Session,
    tenant: str,
    detector: str,
    pipeline: str,
    now: dt.datetime,
    evidence: Mapping[str, Any] | None = None,
) -> Silence | None:
    """The silence (the earliest made) that withholds this fire from alerting, if any: the
    tenant's own or an all-tenant one, of its pipeline or every one, whose feature pattern (if
    it has one) matches a feature of the fire's ``evidence``."""
    candidates = session.scalars(
        select(Silence)
        .where(
            _affecting(tenant),
            Silence.detector == detector,
            Silence.ends_at > now,
            Silence.starts_at <= now,
            or_(Silence.pipeline.is_(None), Silence.pipeline == pipeline),
        )
        .order_by(Silence.id)
    )
    return next((s for s in candidates if fire_matches(s.features, evidence or {})), None)


def count_fire(session: Session, silence_id: int) -> None:
    """One more fire withheld by the silence (an increment in SQL: concurrent recordings of
    the same silence do not lose counts)."""
    session.execute(
        update(Silence)
        .where(Silence.id == silence_id)
        .values(fires=Silence.fires + 1)
        .execution_options(synchronize_session=False)
    )
