"""The dispatcher: alerts from the outbox to Kafka, webhooks and the Slack, PagerDuty and
Alertmanager sinks, until each has landed.

A turn's alerts, their outbox rows and their webhook delivery rows are written in one
transaction by the recorder; the sinks (``monitor.service.sinks``) only read those rows and mark
them done. So when the broker or a receiver is down, alerts wait in the database and go out when
it returns: none are lost, and PostgreSQL holds each once. Kafka delivery is at-least-once (a
crash between the broker's ack and the mark re-sends); consumers de-duplicate by ``alert_id``.

Each sink (the Kafka outbox, every configured webhook and sink) runs in a thread of its own with
its own backoff, so a slow or failing receiver never delays Kafka or another receiver. A loop whose
round raises (the database is down) is reported to ``Loops`` as ``dispatcher:<sink>`` and
retried with growing waits.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from monitor.service.health import Backoff, Loops
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sink_settings import AlertmanagerConfig, AnySink, PagerDutyConfig
from monitor.service.sinks import Sink
from monitor.service.sinks.alertmanager import AlertmanagerSink
from monitor.service.sinks.delivery import DeliverySink
from monitor.service.sinks.kafka import KafkaSink
from monitor.service.sinks.pagerduty import PagerDutySink
from monitor.service.sinks.slack import SlackSink
from monitor.service.sinks.webhook import UnconfiguredWebhooks, WebhookSink

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0  # for all the loops together


class Dispatcher:
    """One loop per sink: Kafka when a bootstrap is set, each webhook, each Slack, PagerDuty
    and Alertmanager sink, and the dead-lettering of deliveries to receivers no longer
    configured."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        loops: Loops | None = None,
    ) -> None:
        self.settings = settings
        self.loops = loops or Loops()
        self._stop = threading.Event()
        self.sinks: list[Sink] = []
        if settings.kafka_bootstrap:
            self.sinks.append(KafkaSink(sessions, settings, metrics))
        for hook in settings.webhooks:
            self.sinks.append(WebhookSink(sessions, settings, metrics, hook, self._stop))
        for config in settings.sinks:
            self.sinks.append(self._delivery_sink(sessions, metrics, config))
        if settings.webhooks or settings.sinks:
            self.sinks.append(UnconfiguredWebhooks(sessions, settings))
        self._threads: list[threading.Thread] = []

    def _delivery_sink(
        self, sessions: sessionmaker[Session], metrics: Metrics, config: AnySink
    ) -> DeliverySink:
        if isinstance(config, PagerDutyConfig):
            return PagerDutySink(sessions, self.settings, metrics, config, self._stop)
        if isinstance(config, AlertmanagerConfig):
            return AlertmanagerSink(sessions, self.settings, metrics, config, self._stop)
        return SlackSink(sessions, self.settings, metrics, config, self._stop)

    def start(self) -> None:
        for sink in self.sinks:
            t = threading.Thread(
                target=self._loop, args=(sink,), name=f"dispatcher:{sink.name}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop every loop (each finishes the request in flight, if any), then close the sinks."""
        self._stop.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s did not stop within %.0f s", t.name, STOP_TIMEOUT_S)
        for sink in self.sinks:
            sink.close()

    def _loop(self, sink: Sink) -> None:
        name = f"dispatcher:{sink.name}"
        interval = self.settings.dispatch_interval_s
        # Capped short for every sink: /readyz waits for each loop's first good round.
        backoff = Backoff(first=interval, cap=max(5.0, interval))
        while not self._stop.is_set():
            try:
                busy = sink.round()
            except Exception as exc:  # the loop must outlive any bad round (database down)
                self.loops.failed(name, exc)
                self._stop.wait(backoff.next())
                continue
            self.loops.ok(name)
            backoff.reset()
            if not busy:
                self._stop.wait(sink.idle_s)
