"""The webhook sinks: each configured receiver's due deliveries, signed and retried; and the
dead-lettering of deliveries to receivers (webhooks or sinks) no longer configured."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from monitor.service.db import WebhookDelivery, utcnow
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings, WebhookConfig
from monitor.service.sinks import BATCH, HttpRequest, encode_payload
from monitor.service.sinks.delivery import DeliverySink, due_deliveries


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


class StandardWebhook:
    """A webhook's request: the alert payload as it is (compact JSON, sorted keys), signed."""

    def __init__(self, hook: WebhookConfig) -> None:
        self.hook = hook

    def request(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        body = encode_payload(payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "safety-monitor",
            **signed_headers(self.hook.secrets, alert_id, body, now),
        }
        return HttpRequest(self.hook.url, headers, body)


class WebhookSink(DeliverySink):
    """Due deliveries of one webhook, signed, one at a time (``DeliverySink``)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        hook: WebhookConfig,
        stop: threading.Event,
    ) -> None:
        super().__init__(
            sessions, settings, metrics, "webhook", hook.name, StandardWebhook(hook), stop
        )
        self.hook = hook


class UnconfiguredWebhooks:
    """Dead-letters due deliveries to webhooks and sinks this instance does not configure
    (removed from the settings since they were written)."""

    name = "webhook-unconfigured"

    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        self.sessions = sessions
        self.names = [t.name for t in settings.delivery_targets()]
        self.idle_s = max(30.0, settings.dispatch_interval_s)  # housekeeping, not delivery

    def close(self) -> None:
        pass

    def round(self) -> int:
        now = utcnow()
        with self.sessions() as session:
            orphans = due_deliveries(
                session, now, WebhookDelivery.webhook.not_in(self.names), limit=BATCH
            )
            for d in orphans:
                d.dead_at, d.last_error = now, "webhook no longer configured"
            session.commit()
            return len(orphans)
