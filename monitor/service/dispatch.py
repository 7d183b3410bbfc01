"""The dispatcher: alerts from the outbox to Kafka and to webhooks, until each has landed.

A turn's alerts, their outbox rows and their webhook delivery rows are written in one
transaction by the recorder; this loop only reads those rows and marks them done. So when the
broker or a receiver is down, alerts wait in the database and go out when it returns: none are
lost, and PostgreSQL holds each once. Kafka delivery is at-least-once (a crash between the
broker's ack and the mark re-sends); consumers de-duplicate by ``alert_id``.

Several service instances may dispatch from one PostgreSQL: rows are claimed with
``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import httpx
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from monitor.service.db import Outbox, WebhookDelivery, utcnow
from monitor.service.health import Backoff, Loops
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings, WebhookConfig

log = logging.getLogger(__name__)
BATCH = 100


def sign(secret: str, body: bytes) -> str:
    """The ``X-Signature`` header value: ``sha256=`` + hex HMAC-SHA256 of the exact body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


class Dispatcher:
    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings,
                 metrics: Metrics, loops: Loops | None = None) -> None:  # fmt: skip
        self.sessions = sessions
        self.settings = settings
        self.metrics = metrics
        self.loops = loops or Loops()
        self.webhooks = {w.name: w for w in settings.webhooks}
        self.http = httpx.Client(timeout=settings.webhook_timeout_s)
        self._producer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._close_producer()
        self.http.close()

    def _loop(self) -> None:
        interval = self.settings.dispatch_interval_s
        backoff = Backoff(first=interval, cap=max(5.0, interval))
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # the loop must outlive any bad round (database down)
                self.loops.failed("dispatcher", exc)
                self._stop.wait(backoff.next())
                continue
            self.loops.ok("dispatcher")
            backoff.reset()
            if not busy:
                self._stop.wait(interval)

    def run_once(self) -> int:
        """One round: publish due outbox rows, deliver due webhooks; how many went out."""
        return self.publish_kafka() + self.deliver_webhooks()

    # ---- Kafka -----------------------------------------------------------------------------

    def _producer_or_none(self) -> Any:
        if self._producer is not None:
            return self._producer
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        timeout_ms = int(self.settings.kafka_timeout_s * 1000)
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                acks="all",
                enable_idempotence=True,
                retries=5,
                max_block_ms=timeout_ms,
                request_timeout_ms=timeout_ms,
                client_id="safety-monitor",
            )
        except (KafkaError, OSError, ValueError) as exc:
            self._warn(f"Kafka at {self.settings.kafka_bootstrap} unavailable ({exc}); "
                       "alerts stay in the outbox")  # fmt: skip
            return None
        return self._producer

    def _close_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except Exception:  # closing a broken producer may raise anything; it is dropped
                log.debug("closing the Kafka producer failed", exc_info=True)
            self._producer = None

    def publish_kafka(self) -> int:
        if not self.settings.kafka_bootstrap:
            return 0
        with self.sessions() as session:
            rows = session.scalars(
                _claim(
                    select(Outbox)
                    .where(Outbox.published_at.is_(None))
                    .order_by(Outbox.id)
                    .limit(BATCH),
                    session,
                )
            ).all()
            if not rows:
                return 0
            producer = self._producer_or_none()
            if producer is None:
                return 0
            sent = 0
            for row in rows:
                try:
                    future = producer.send(
                        self.settings.alerts_topic,
                        key=row.key.encode(),
                        value=encode_payload(row.payload),
                        headers=[("alert_id", row.alert_id.encode())],
                    )
                    future.get(timeout=self.settings.kafka_timeout_s)
                except Exception as exc:  # any send failure: keep the row, retry next round
                    row.attempts += 1
                    row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
                    self._warn(f"publishing alert {row.alert_id} failed ({row.last_error}); "
                               "will retry")  # fmt: skip
                    self._close_producer()
                    break
                row.published_at = utcnow()
                row.attempts += 1
                sent += 1
            session.commit()
            self.metrics.published.labels("kafka").inc(sent)
            return sent

    # ---- webhooks --------------------------------------------------------------------------

    def deliver_webhooks(self) -> int:
        if not self.webhooks:
            return 0
        now = utcnow()
        with self.sessions() as session:
            due = session.scalars(
                _claim(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.delivered_at.is_(None),
                        WebhookDelivery.dead_at.is_(None),
                        WebhookDelivery.next_attempt_at <= now,
                    )
                    .order_by(WebhookDelivery.id)
                    .limit(BATCH),
                    session,
                )
            ).all()
            delivered = 0
            for d in due:
                hook = self.webhooks.get(d.webhook)
                outbox = session.scalar(select(Outbox).where(Outbox.alert_id == d.alert_id))
                if hook is None or outbox is None:
                    d.dead_at, d.last_error = now, "webhook no longer configured"
                    continue
                delivered += self._deliver(d, hook, encode_payload(outbox.payload))
            session.commit()
            return delivered

    def _deliver(self, d: WebhookDelivery, hook: WebhookConfig, body: bytes) -> int:
        d.attempts += 1
        headers = {"Content-Type": "application/json", "X-Signature": sign(hook.secret, body),
                   "X-Alert-Id": d.alert_id, "User-Agent": "safety-monitor"}  # fmt: skip
        try:
            r = self.http.post(hook.url, content=body, headers=headers)
            d.last_status = r.status_code
            ok = 200 <= r.status_code < 300
            d.last_error = None if ok else f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            ok, d.last_error = False, f"{type(exc).__name__}: {exc}"[:1000]
        now = utcnow()
        if ok:
            d.delivered_at = now
            self.metrics.published.labels("webhook").inc()
            return 1
        self.metrics.webhook_failures.labels(hook.name).inc()
        if d.attempts >= self.settings.webhook_max_attempts:
            d.dead_at = now
            log.error("webhook %s: alert %s dead-lettered after %d attempts (%s)",
                      hook.name, d.alert_id, d.attempts, d.last_error)  # fmt: skip
        else:
            delay = self.settings.webhook_backoff_s * 2 ** (d.attempts - 1)
            d.next_attempt_at = now + dt.timedelta(seconds=delay)
        return 0

    def _warn(self, message: str) -> None:
        if time.monotonic() - self._last_warning > 30:  # once per 30 s, not once per round
            log.warning(message)
            self._last_warning = time.monotonic()


def _claim(query: Select[Any], session: Session) -> Select[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query
