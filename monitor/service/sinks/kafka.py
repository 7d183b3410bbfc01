"""The Kafka sink: due outbox rows to the alerts topic, in order."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from monitor.service.db import Outbox, claim, utcnow
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sinks import BATCH, encode_payload

log = logging.getLogger(__name__)


class KafkaSink:
    """Due outbox rows to the alerts topic, in order; at least once (a crash between the
    broker's ack and the commit re-sends)."""

    name = "kafka"

    def __init__(
        self, sessions: sessionmaker[Session], settings: ServiceSettings, metrics: Metrics
    ) -> None:
        self.sessions, self.settings, self.metrics = sessions, settings, metrics
        self.idle_s = settings.dispatch_interval_s
        self._producer: Any = None
        self._last_warning = 0.0

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
                # Connecting is bounded by the same timeout (its own default is 30 s): a broker
                # that is down must not hold this sink's loop, or a shutdown, for longer.
                bootstrap_timeout_ms=timeout_ms,
                client_id="safety-monitor",
            )
        except (KafkaError, OSError, ValueError) as exc:
            self._warn(
                f"Kafka at {self.settings.kafka_bootstrap} unavailable ({exc}); "
                "alerts stay in the outbox"
            )
            return None
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except Exception:  # closing a broken producer may raise anything; it is dropped
                log.debug("closing the Kafka producer failed", exc_info=True)
            self._producer = None

    def _warn(self, message: str) -> None:
        if time.monotonic() - self._last_warning > 30:  # once per 30 s, not once per round
            log.warning(message)
            self._last_warning = time.monotonic()

    def round(self) -> int:
        with self.sessions() as session:
            rows = session.scalars(
                claim(
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
                    self._warn(
                        f"publishing alert {row.alert_id} failed ({row.last_error}); will retry"
                    )
                    self.close()
                    break
                row.published_at = utcnow()
                row.attempts += 1
                sent += 1
            session.commit()
            self.metrics.published.labels("kafka").inc(sent)
            return sent
