"""Alert triage: status, verdict and assignee changes under optimistic concurrency, the history
of every change, and append-only notes.

An alert is ``open`` until someone ``acknowledged`` or ``resolved`` it (any status may follow
any other: a resolved alert can be reopened); its ``verdict`` is ``true_positive``,
``false_positive``, ``unsure`` or none yet. Every change raises the alert's ``version`` by one
and writes one ``alert_history`` row per field changed, in the same transaction: an update is
applied only to the version it was read at (``UPDATE ... WHERE version = v``), so of two
concurrent changes from the same version one wins and the other gets ``StaleAlertError`` (HTTP 409),
never a silent overwrite. A bulk change applies to every alert it selects or to none.
Every query is tenant-scoped; the HTTP side is ``triage_api``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from monitor.service.audit import AuditFilter
from monitor.service.db import Alert, AlertHistory, AlertNote, utcnow
from monitor.service.deliveries import queue_resolutions
from monitor.service.rows import utc_iso

Status = Literal["open", "acknowledged", "resolved"]
Verdict = Literal["true_positive", "false_positive", "unsure"]
STATUSES: tuple[str, ...] = ("open", "acknowledged", "resolved")
VERDICTS: tuple[str, ...] = ("true_positive", "false_positive", "unsure")
FIELDS = ("status", "verdict", "assignee")  # what a change may set
MAX_NOTE = 4000  # characters of one note
MAX_ASSIGNEE = 64
MAX_BULK = 1000  # alerts one bulk change may touch


class AlertNotFoundError(LookupError):
    """No such alert in this tenant."""


class StaleAlertError(Exception):
    """The alert changed since the version the caller read."""

    def __init__(self, alert_id: str, sent: int | None, current: int) -> None:
        self.alert_id, self.sent, self.current = alert_id, sent, current
        read = f"version {sent}" if sent is not None else "it"
        super().__init__(
            f"alert {alert_id} changed since {read} was read: it is at version {current}; "
            "read it again and reapply the change"
        )


class TooManyAlertsError(ValueError):
    """A bulk change that would touch more than ``MAX_BULK`` alerts."""


class UnknownAlertsError(LookupError):
    """Ids a bulk change names that are not alerts of this tenant (by position in the list)."""

    def __init__(self, positions: list[int]) -> None:
        self.positions = positions
        super().__init__(f"{len(positions)} of the ids are no alert of this tenant")


def apply_change(
    session: Session,
    alert: Alert,
    change: Mapping[str, str | None],
    author: str,
    now: dt.datetime | None = None,
    resolve_to: Collection[str] = (),
) -> bool:
    """Set the fields of ``change`` on ``alert`` (as read at ``alert.version``) and write their
    history; False when nothing differs (no new version). ``StaleAlertError`` if another transaction
    changed the alert since it was read. An alert newly resolved queues a resolution to each of
    the ``resolve_to`` sinks it was sent to."""
    diffs = [(f, getattr(alert, f), v) for f, v in change.items() if getattr(alert, f) != v]
    if not diffs:
        return False
    now = now or utcnow()
    read_at, version = alert.version, alert.version + 1
    done = session.execute(
        update(Alert)
        .where(Alert.id == alert.id, Alert.version == read_at)
        .values(**{f: v for f, _, v in diffs}, version=version, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if cast("CursorResult[Any]", done).rowcount != 1:
        current = session.scalar(select(Alert.version).where(Alert.id == alert.id))
        raise StaleAlertError(alert.id, read_at, int(current or read_at))
    for f, old, new in diffs:
        session.add(
            AlertHistory(
                alert_id=alert.id,
                author=author,
                changed_at=now,
                field=f,
                old=old,
                new=new,
                version=version,
            )
        )
    if any(f == "status" and new == "resolved" for f, _, new in diffs):
        queue_resolutions(session, alert, resolve_to, now)
    # The row as now stored, without marking the object dirty (no second UPDATE at flush).
    for name, value in [
        *((f, new) for f, _, new in diffs),
        ("version", version),
        ("updated_at", now),
    ]:
        set_committed_value(alert, name, value)
    return True


def find(session: Session, tenant: str, alert_id: str) -> Alert:
    alert = session.scalar(select(Alert).where(Alert.id == alert_id, Alert.tenant == tenant))
    if alert is None:
        raise AlertNotFoundError(alert_id)
    return alert


def change_one(
    session: Session,
    tenant: str,
    alert_id: str,
    version: int,
    change: Mapping[str, str | None],
    author: str,
    resolve_to: Collection[str] = (),
) -> Alert:
    """One alert's change from the ``version`` the caller read (``StaleAlertError`` when it is
    not the current one, even if the change would alter nothing)."""
    alert = find(session, tenant, alert_id)
    if alert.version != version:
        raise StaleAlertError(alert_id, version, alert.version)
    apply_change(session, alert, change, author, resolve_to=resolve_to)
    return alert


def change_many(
    session: Session,
    tenant: str,
    change: Mapping[str, str | None],
    author: str,
    *,
    ids: Sequence[str] | None = None,
    flt: AuditFilter | None = None,
    versions: Mapping[str, int] | None = None,
    note: str | None = None,
    resolve_to: Collection[str] = (),
) -> tuple[list[Alert], int]:
    """A change to every alert named by ``ids`` or matched by ``flt`` (the tenant's only), and
    optionally the same note on each: (the alerts, how many changed). With ``versions`` (alert
    id → the version the caller read) an alert at another version is ``StaleAlertError``.
    ``UnknownAlertsError``, ``TooManyAlertsError`` or ``StaleAlertError`` leave the caller to
    roll back: nothing is half-applied."""
    if ids is not None:
        wanted = list(dict.fromkeys(ids))
        if len(wanted) > MAX_BULK:
            raise TooManyAlertsError(f"{len(wanted)} ids; at most {MAX_BULK} per call")
        query = select(Alert).where(Alert.tenant == tenant, Alert.id.in_(wanted))
    else:
        assert flt is not None and flt.tenant == tenant
        query = flt.alerts().limit(MAX_BULK + 1)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=Alert)  # concurrent changes wait instead of failing
    alerts = list(session.scalars(query).all())
    if ids is not None:
        found = {a.id for a in alerts}
        missing = [i for i, a in enumerate(ids) if a not in found]
        if missing:
            raise UnknownAlertsError(missing)
    elif len(alerts) > MAX_BULK:
        raise TooManyAlertsError(f"the filter matches over {MAX_BULK} alerts; narrow it")
    for a in alerts:
        if versions is not None and a.id in versions and versions[a.id] != a.version:
            raise StaleAlertError(a.id, versions[a.id], a.version)
    now = utcnow()
    changed = sum(apply_change(session, a, change, author, now, resolve_to) for a in alerts)
    if note is not None:
        for a in alerts:
            session.add(AlertNote(alert_id=a.id, author=author, text=note, created_at=now))
    return alerts, changed


def add_note(session: Session, tenant: str, alert_id: str, text: str, author: str) -> AlertNote:
    find(session, tenant, alert_id)
    note = AlertNote(alert_id=alert_id, author=author, text=text, created_at=utcnow())
    session.add(note)
    session.flush()
    return note


def note_json(n: AlertNote) -> dict[str, Any]:
    return {"id": n.id, "author": n.author, "text": n.text, "created_at": utc_iso(n.created_at)}


def history_json(h: AlertHistory) -> dict[str, Any]:
    return {
        "author": h.author,
        "changed_at": utc_iso(h.changed_at),
        "field": h.field,
        "from": h.old,
        "to": h.new,
        "version": h.version,
    }


def notes_and_history(session: Session, alert_id: str) -> dict[str, list[dict[str, Any]]]:
    """An alert's notes and change history, oldest first."""
    notes = session.scalars(
        select(AlertNote).where(AlertNote.alert_id == alert_id).order_by(AlertNote.id)
    ).all()
    history = session.scalars(
        select(AlertHistory).where(AlertHistory.alert_id == alert_id).order_by(AlertHistory.id)
    ).all()
    return {"notes": [note_json(n) for n in notes], "history": [history_json(h) for h in history]}
