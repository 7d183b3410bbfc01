"""Webhook deliveries as an operator sees them: listed, and dead-lettered ones sent again;
and the resolutions a resolved alert queues for the sinks that resolve incidents (PagerDuty)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from monitor.service.db import Alert, WebhookDelivery, utcnow
from monitor.service.rows import utc_iso

Status = Literal["pending", "delivered", "dead"]
RESOLVED_UNSENT = "resolved before it was sent"  # a dead trigger's reason; never retried


@dataclass(frozen=True)
class DeliveryFilter:
    tenant: str | None = None  # None: every tenant (the CLI)
    webhook: str | None = None
    since: dt.datetime | None = None  # alerts made at or after


def _alert_ids(flt: DeliveryFilter) -> Any:
    q = select(Alert.id)
    if flt.tenant is not None:
        q = q.where(Alert.tenant == flt.tenant)
    if flt.since is not None:
        q = q.where(Alert.created_at >= flt.since)
    return q


def list_deliveries(
    session: Session, flt: DeliveryFilter, status: Status | None, limit: int
) -> list[dict[str, Any]]:
    q = select(WebhookDelivery).where(WebhookDelivery.alert_id.in_(_alert_ids(flt)))
    if flt.webhook is not None:
        q = q.where(WebhookDelivery.webhook == flt.webhook)
    if status == "delivered":
        q = q.where(WebhookDelivery.delivered_at.is_not(None))
    elif status == "dead":
        q = q.where(WebhookDelivery.dead_at.is_not(None))
    elif status == "pending":
        q = q.where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.dead_at.is_(None))
    rows = session.scalars(q.order_by(WebhookDelivery.id.desc()).limit(limit)).all()
    return [
        {
            "alert_id": d.alert_id,
            "webhook": d.webhook,
            "event": d.event,
            "attempts": d.attempts,
            "status": "delivered" if d.delivered_at else "dead" if d.dead_at else "pending",
            "last_status": d.last_status,
            "last_error": d.last_error,
            "next_attempt_at": utc_iso(d.next_attempt_at),
        }
        for d in rows
    ]


def retry_dead(session: Session, flt: DeliveryFilter) -> int:
    """Dead-lettered deliveries matching ``flt`` due again now, with a fresh round of attempts
    (the cause fixed: a receiver back, a secret corrected). Committed; returns how many. A
    trigger withheld because its alert was resolved first (``RESOLVED_UNSENT``) stays dead: sent
    now it would open an incident nobody resolves."""
    q = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.dead_at.is_not(None),
            WebhookDelivery.delivered_at.is_(None),
            WebhookDelivery.alert_id.in_(_alert_ids(flt)),
            or_(
                WebhookDelivery.last_error.is_(None),
                WebhookDelivery.last_error != RESOLVED_UNSENT,
            ),
        )
        .values(dead_at=None, attempts=0, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if flt.webhook is not None:
        q = q.where(WebhookDelivery.webhook == flt.webhook)
    n = session.execute(q).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(n or 0)


def queue_resolutions(
    session: Session, alert: Alert, sinks: Collection[str], now: dt.datetime
) -> int:
    """A ``resolve`` delivery of a just-resolved alert to each of ``sinks`` (PagerDuty's) that
    was sent its trigger, due now (a resolution sent before, the alert reopened since, is sent
    again). The incident is shared by the alerts of one tenant, conversation and detector: while
    another of them is unresolved, nothing is resolved. A trigger not yet sent is not sent (it
    is dead-lettered, saying why). Part of the caller's transaction."""
    if not sinks:
        return 0
    rows = session.scalars(
        select(WebhookDelivery).where(
            WebhookDelivery.alert_id == alert.id, WebhookDelivery.webhook.in_(list(sinks))
        )
    ).all()
    resolved = {d.webhook: d for d in rows if d.event == "resolve"}
    queued = 0
    for trigger in sorted((d for d in rows if d.event == "alert"), key=lambda d: d.webhook):
        if trigger.delivered_at is None:
            if trigger.dead_at is None:
                trigger.dead_at, trigger.last_error = now, RESOLVED_UNSENT
            continue
        if _siblings_open(session, alert, trigger.webhook):
            continue
        again = resolved.get(trigger.webhook)
        if again is None:
            session.add(
                WebhookDelivery(
                    alert_id=alert.id, webhook=trigger.webhook, event="resolve", next_attempt_at=now
                )
            )
        else:
            again.delivered_at = again.dead_at = again.last_error = again.last_status = None
            again.attempts, again.next_attempt_at = 0, now
        queued += 1
    return queued


def _siblings_open(session: Session, alert: Alert, sink: str) -> bool:
    """Whether another unresolved alert of the same incident (tenant, conversation, detector)
    was sent to ``sink``."""
    found = session.scalar(
        select(Alert.id)
        .join(WebhookDelivery, WebhookDelivery.alert_id == Alert.id)
        .where(
            Alert.tenant == alert.tenant,
            Alert.conversation_id == alert.conversation_id,
            Alert.detector == alert.detector,
            Alert.id != alert.id,
            Alert.status != "resolved",
            WebhookDelivery.webhook == sink,
            WebhookDelivery.event == "alert",
            WebhookDelivery.delivered_at.is_not(None),
        )
        .limit(1)
    )
    return found is not None
