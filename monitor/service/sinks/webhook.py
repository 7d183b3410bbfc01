"""The webhook sinks: each configured receiver's due deliveries, signed and retried; and the
dead-lettering of deliveries to receivers no longer configured."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from monitor.service.db import Outbox, WebhookDelivery, claim, utcnow
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings, WebhookConfig
from monitor.service.sinks import BATCH, encode_payload

log = logging.getLogger(__name__)


def signed_headers(
    secrets: list[str], msg_id: str, body: bytes, at: dt.datetime | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: ``webhook-id`` (the alert id, the same on
    every retry: receivers de-duplicate by it), ``webhook-timestamp`` (now, in seconds: receivers
    refuse old ones, so a captured delivery cannot be replayed) and ``webhook-signature``, one
    ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` per active secret, space-separated."""
    at = at or utcnow()
    text = body.decode()
    signatures = [Webhook(secret).sign(msg_id, at, text) for secret in secrets]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def _due_deliveries(session: Session, now: Any, *where: Any, limit: int) -> list[WebhookDelivery]:
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
    attempts: int  # this one included
    body: bytes | None  # None: its alert is gone (dead-lettered at the claim)


class WebhookSink:
    """Due deliveries of one webhook, signed, one at a time: retried with doubling waits,
    dead-lettered after ``webhook_max_attempts``.

    A delivery is claimed in a short transaction that moves its ``next_attempt_at`` past the
    longest the request can take (a lease), then posted with no database connection held, then
    its outcome is recorded: a slow receiver holds no row lock and no pooled connection. A crash
    mid-request leaves the delivery due again when the lease ends (receivers de-duplicate by
    ``webhook-id``, the alert id).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        hook: WebhookConfig,
        stop: threading.Event,
    ) -> None:
        self.sessions, self.settings, self.metrics, self.hook = sessions, settings, metrics, hook
        self.name = f"webhook:{hook.name}"
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
            if claimed.body is not None:
                status, error = self._post(claimed.alert_id, claimed.body)
                delivered += self._record(claimed, status, error)
        return delivered

    def _claim_next(self, after: int) -> _Claimed | None:
        now = utcnow()
        with self.sessions() as session:
            found = _due_deliveries(
                session,
                now,
                WebhookDelivery.webhook == self.hook.name,
                WebhookDelivery.id > after,
                limit=1,
            )
            if not found:
                return None
            d = found[0]
            outbox = session.scalar(select(Outbox).where(Outbox.alert_id == d.alert_id))
            if outbox is None:
                d.dead_at, d.last_error = now, "alert no longer in the outbox"
                body = None
            else:
                d.attempts += 1
                d.next_attempt_at = now + self.lease
                body = encode_payload(outbox.payload)
            claimed = _Claimed(d.id, d.alert_id, d.attempts, body)
            session.commit()
            return claimed

    def _post(self, alert_id: str, body: bytes) -> tuple[int | None, str | None]:
        """(HTTP status or None, error or None) of one signed POST."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "safety-monitor",
            **signed_headers(self.hook.secrets, alert_id, body),
        }
        try:
            r = self.http.post(self.hook.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:1000]
        return r.status_code, None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"

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
                    "webhook %s: alert %s dead-lettered after %d attempts (%s)",
                    self.hook.name,
                    d.alert_id,
                    claimed.attempts,
                    error,
                )
            else:
                delay = self.settings.webhook_backoff_s * 2 ** (claimed.attempts - 1)
                d.next_attempt_at = now + dt.timedelta(seconds=delay)
            session.commit()
        if error is None:
            self.metrics.published.labels("webhook").inc()
            return 1
        self.metrics.webhook_failures.labels(self.hook.name).inc()
        return 0


class UnconfiguredWebhooks:
    """Dead-letters due deliveries to webhooks this instance does not configure (removed from
    the settings since they were written)."""

    name = "webhook-unconfigured"

    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        self.sessions = sessions
        self.names = [w.name for w in settings.webhooks]
        self.idle_s = max(30.0, settings.dispatch_interval_s)  # housekeeping, not delivery

    def close(self) -> None:
        pass

    def round(self) -> int:
        now = utcnow()
        with self.sessions() as session:
            orphans = _due_deliveries(
                session, now, WebhookDelivery.webhook.not_in(self.names), limit=BATCH
            )
            for d in orphans:
                d.dead_at, d.last_error = now, "webhook no longer configured"
            session.commit()
            return len(orphans)
