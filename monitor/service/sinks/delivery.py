"""The delivery loop every HTTP sink shares (webhooks, Slack, PagerDuty, Alertmanager): due rows
of the delivery table claimed under a lease, POSTed with no database connection held, their
outcome recorded; retried with doubling waits, dead-lettered after ``webhook_max_attempts``.

What differs per receiver is only the request an alert becomes (``sinks.Renderer``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from monitor.service.db import Outbox, WebhookDelivery, claim, utcnow
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sinks import BATCH, Renderer, Resolver

log = logging.getLogger(__name__)


def due_deliveries(session: Session, now: Any, *where: Any, limit: int) -> list[WebhookDelivery]:
    """Undelivered, live deliveries due by ``now`` that match ``where``, oldest first, claimed."""
    query = (
        select(WebhookDelivery)
        .where(
            *where,
            WebhookDelivery.delivered_at.is_(None),
            WebhookDelivery.dead_at.is_(None),
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.id)
        .limit(limit)
    )
    return list(session.scalars(claim(query, session)).all())


@dataclasses.dataclass(frozen=True)
class _Claimed:
    id: int
    alert_id: str
    event: str  # alert | resolve
    attempts: int  # this one included
    payload: dict[str, Any] | None  # None: its alert is gone (dead-lettered at the claim)


class DeliverySink:
    """Due deliveries of one configured receiver (``target``: its name, as the delivery rows
    hold it), one at a time.

    A delivery is claimed in a short transaction that moves its ``next_attempt_at`` past the
    longest the request can take (a lease), then posted with no database connection held, then
    its outcome is recorded: a slow receiver holds no row lock and no pooled connection. A crash
    mid-request leaves the delivery due again when the lease ends (receivers de-duplicate by
    the alert id). Any 2xx answer is a delivery.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        kind: str,  # webhook | slack | pagerduty | alertmanager
        target: str,
        renderer: Renderer,
        stop: threading.Event,
    ) -> None:
        self.sessions, self.settings, self.metrics = sessions, settings, metrics
        self.target, self.renderer = target, renderer
        self.name = f"{kind}:{target}"  # the loop's name in /readyz: dispatcher:slack:oncall
        self.idle_s = settings.dispatch_interval_s
        self.http = httpx.Client(timeout=settings.webhook_timeout_s)
        # httpx bounds connect, write and read each by the timeout; the lease covers all three.
        self.lease = dt.timedelta(seconds=4 * settings.webhook_timeout_s + 30)
        self._stop = stop

    def close(self) -> None:
        self.http.close()

    def round(self) -> int:
        delivered, after = 0, 0
        for _ in range(BATCH):
            if self._stop.is_set():  # stopping waits for one request at most
                break
            claimed = self._claim_next(after)
            if claimed is None:
                break
            after = claimed.id  # each delivery at most once a round
            if claimed.payload is not None:
                status, error = self._post(claimed, claimed.payload)
                delivered += self._record(claimed, status, error)
        return delivered

    def _claim_next(self, after: int) -> _Claimed | None:
        now = utcnow()
        with self.sessions() as session:
            found = due_deliveries(
                session,
                now,
                WebhookDelivery.webhook == self.target,
                WebhookDelivery.id > after,
                limit=1,
            )
            if not found:
                return None
            d = found[0]
            outbox = session.scalar(select(Outbox).where(Outbox.alert_id == d.alert_id))
            if outbox is None:
                d.dead_at, d.last_error = now, "alert no longer in the outbox"
                payload = None
            else:
                d.attempts += 1
                d.next_attempt_at = now + self.lease
                payload = dict(outbox.payload)
            claimed = _Claimed(d.id, d.alert_id, d.event, d.attempts, payload)
            session.commit()
            return claimed

    def _post(self, claimed: _Claimed, payload: dict[str, Any]) -> tuple[int | None, str | None]:
        """(HTTP status or None, error or None) of one attempt."""
        alert_id = claimed.alert_id
        try:
            if claimed.event == "resolve":
                if not isinstance(self.renderer, Resolver):
                    return None, f"{self.name} does not resolve alerts"
                req = self.renderer.resolve(alert_id, payload, utcnow())
            else:
                req = self.renderer.request(alert_id, payload, utcnow())
        except Exception as exc:  # a payload this receiver cannot be sent: a failed attempt
            log.exception("%s: alert %s could not be rendered", self.name, alert_id)
            return None, f"rendering failed: {type(exc).__name__}: {exc}"[:1000]
        try:
            r = self.http.post(req.url, content=req.body, headers=req.headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:1000]
        if 200 <= r.status_code < 300:
            return r.status_code, None
        answer = " ".join(r.text.split())[:300]  # the receiver's reason (PagerDuty, Alertmanager)
        return r.status_code, f"HTTP {r.status_code}" + (f": {answer}" if answer else "")

    def _record(self, claimed: _Claimed, status: int | None, error: str | None) -> int:
        now = utcnow()
        with self.sessions() as session:
            d = session.get(WebhookDelivery, claimed.id)
            if d is None:  # its alert was deleted meanwhile (retention, erasure)
                return 0
            if status is not None:
                d.last_status = status
            d.last_error = error
            if error is None:
                d.delivered_at = now
            elif claimed.attempts >= self.settings.webhook_max_attempts:
                d.dead_at = now
                log.error(
                    "%s: alert %s dead-lettered after %d attempts (%s)",
                    self.name,
                    d.alert_id,
                    claimed.attempts,
                    error,
                )
            else:
                delay = self.settings.webhook_backoff_s * 2 ** (claimed.attempts - 1)
                d.next_attempt_at = now + dt.timedelta(seconds=delay)
            session.commit()
        if error is None:
            # Every HTTP sink counts in the webhook channel and series, by its name.
            self.metrics.published.labels("webhook").inc()
            return 1
        self.metrics.webhook_failures.labels(self.target).inc()
        return 0
