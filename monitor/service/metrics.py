"""Prometheus metrics of the service, on one registry per app (so tests can run several).

Names follow Prometheus conventions (``_total``, ``_seconds``, base units); labels are bounded
sets (pipeline, detector, severity, channel, reason, configured webhook names), never a
conversation or tenant id. The dashboards in ``dashboards/`` (built by ``monitor.dashboards``)
query these names; rename one and ``tests/test_dashboards.py`` fails.

Counters and histograms are per process. The gauges set on each scrape (outbox, webhook
deliveries, pending batch turns, triage, active silences) describe the shared database, so
every instance reports the same values: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from sqlalchemy import func, select

from monitor.service.db import Alert, PendingTurn, Silence, WebhookDelivery, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from detectors.engine import Verdict
    from monitor.service.recorder import Recorded

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TRIAGE_DAYS = 30  # the triage gauges read the alerts made within this many days


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turns = Counter(
            "safety_monitor_turns_total", "Turns evaluated and stored.", ["pipeline"], registry=r
        )
        self.tokens = Counter(
            "safety_monitor_tokens_total", "Tokens through the pipeline.", ["pipeline"], registry=r
        )
        self.verdicts = Counter(
            "safety_monitor_verdicts_total",
            "Fired verdicts.",
            ["pipeline", "detector", "severity"],
            registry=r,
        )
        self.alerts = Counter(
            "safety_monitor_alerts_total",
            "Alerts created.",
            ["pipeline", "detector", "severity"],
            registry=r,
        )
        self.silenced = Counter(
            "safety_monitor_silenced_fires_total",
            "Fires an active silence withheld from alerting (stored and counted, not alerted).",
            ["pipeline", "detector"],
            registry=r,
        )
        self.triaged = Gauge(
            "safety_monitor_triaged_alerts",
            "Alerts of the last 30 days judged true_positive or false_positive in triage, per "
            "detector (every tenant; read from the database on each scrape).",
            ["detector"],
            registry=r,
        )
        self.triage_precision = Gauge(
            "safety_monitor_triage_precision",
            "Share of the last 30 days' judged alerts (true or false positive) that triage "
            "marked true_positive, per detector; 1 - it is the false-positive share.",
            ["detector"],
            registry=r,
        )
        self.active_silences = Gauge(
            "safety_monitor_active_silences",
            "Silences in effect now, per detector (every tenant's, an all-tenant one once; read "
            "from the database on each scrape).",
            ["detector"],
            registry=r,
        )
        self.rejected = Counter(
            "safety_monitor_requests_rejected_total",
            "Requests refused before evaluation.",
            ["reason"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "safety_monitor_pipeline_seconds",
            "Forward pass + SAE + detectors, per micro-batch.",
            ["pipeline"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_turns = Histogram(
            "safety_monitor_batch_turns",
            "Turns per micro-batch.",
            ["pipeline"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.request_seconds = Histogram(
            "safety_monitor_turn_request_seconds",
            "POST /v1/turns, request in to stored.",
            ["pipeline"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "safety_monitor_batch_tokens",
            "Tokens per micro-batch (the batcher closes a batch at batch_max_tokens).",
            ["pipeline"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "safety_monitor_outbox_backlog", "Alerts in the outbox not yet published.", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "safety_monitor_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row (0 when the outbox is empty).",
            registry=r,
        )
        self.webhook_deliveries = Gauge(
            "safety_monitor_webhook_deliveries",
            "Webhook deliveries waiting (pending) or dead-lettered (dead), per configured webhook.",
            ["webhook", "state"],
            registry=r,
        )
        self.pending_turns = Gauge(
            "safety_monitor_pending_turns",
            "Turns accepted by POST /v1/turns/batch and not yet evaluated.",
            registry=r,
        )
        self.database_up = Gauge(
            "safety_monitor_database_up",
            "1 when this scrape read the database-backed gauges (outbox, webhook deliveries, "
            "pending turns); 0 when the database could not be read (those gauges read NaN).",
            registry=r,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux /proc).
        ProcessCollector(registry=r)

        self.published = Counter(
            "safety_monitor_alerts_published_total",
            "Alerts delivered, by channel (kafka, webhook).",
            ["channel"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "safety_monitor_webhook_failures_total",
            "Failed webhook delivery attempts.",
            ["webhook"],
            registry=r,
        )
        self.pruned = Counter(
            "safety_monitor_pruned_turns_total",
            "Turns deleted by this instance's periodic retention prune.",
            registry=r,
        )

        # The Kafka worker's own (labelled, so the API exposes no samples of them). The turns a
        # worker stores count in safety_monitor_turns_total like the API's.
        self.worker_messages = Counter(
            "safety_monitor_worker_messages_total",
            "Messages read from the traffic topic, by outcome: stored (a new turn), duplicate "
            "(a turn stored before), dead_lettered (copied to <topic>.dlq).",
            ["outcome"],
            registry=r,
        )
        self.worker_errors = Counter(
            "safety_monitor_worker_errors_total",
            "Failures the worker rides out, by reason: database (a poll could not be stored, or "
            "the database did not answer while the worker waited for it), offsets (the topic's "
            "end offsets could not be read for the lag).",
            ["reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "safety_monitor_worker_consumer_lag",
            "Messages not yet handled on each partition this worker holds: the end offset minus "
            "the worker's position, which is its last commit (read between polls, every few "
            "seconds).",
            ["topic", "partition"],
            registry=r,
        )
        self._lagged: set[tuple[str, str]] = set()

    def observe_turn(self, pipeline: str, verdicts: list[Verdict], recorded: Recorded) -> None:
        """A stored turn: its fired verdicts and the alerts it made (nothing for a duplicate)."""
        if recorded.duplicate:
            return
        self.turns.labels(pipeline).inc()
        for v in verdicts:
            if v.fired:
                self.verdicts.labels(pipeline, v.detector, v.severity).inc()
        for detector, severity in recorded.alerts:
            self.alerts.labels(pipeline, detector, severity).inc()
        for detector in recorded.silenced:
            self.silenced.labels(pipeline, detector).inc()

    def observe_batch(self, pipeline: str, turns: int, tokens: int, seconds: float) -> None:
        self.batch_seconds.labels(pipeline).observe(seconds)
        self.batch_turns.labels(pipeline).observe(turns)
        self.batch_tokens.labels(pipeline).observe(tokens)
        self.tokens.labels(pipeline).inc(tokens)

    def observe_lag(self, topic: str, lag: Mapping[int, float]) -> None:
        """The lag of each partition the worker holds (NaN: unknown); partitions it no longer
        holds (after a rebalance) are dropped, so that their new owner's value stands alone."""
        held = {(topic, str(p)) for p in lag}
        for labels in self._lagged - held:
            self.consumer_lag.remove(*labels)
        for p, value in lag.items():
            self.consumer_lag.labels(topic, str(p)).set(value)
        self._lagged = held

    def observe_outbox(
        self, backlog: int, oldest: dt.datetime | None, now: dt.datetime | None = None
    ) -> None:
        """The outbox's unpublished rows and the creation time of the oldest one."""
        self.outbox_backlog.set(backlog)
        self.outbox_oldest_age.set(_age_seconds(now or utcnow(), oldest))

    def refresh_queues(self, session: Session, webhooks: Iterable[str]) -> None:
        """Set the webhook-delivery and pending-turn gauges from the database (each scrape).

        ``webhooks`` are the configured webhook names: each gets its pending and dead counts
        (0 when none); rows of webhooks no longer configured are left out.
        """
        names = list(webhooks)
        counts: dict[tuple[str, str], int] = {}
        if names:
            dead = WebhookDelivery.dead_at.is_not(None)
            rows = session.execute(
                select(WebhookDelivery.webhook, dead, func.count())
                .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.webhook.in_(names))
                .group_by(WebhookDelivery.webhook, dead)
            ).all()
            counts = {(w, "dead" if d else "pending"): int(n) for w, d, n in rows}
        for name in names:
            for state in ("pending", "dead"):
                self.webhook_deliveries.labels(name, state).set(counts.get((name, state), 0))
        pending = session.scalar(select(func.count()).select_from(PendingTurn))
        self.pending_turns.set(pending or 0)

    def refresh_triage(self, session: Session, now: dt.datetime | None = None) -> None:
        """Set the triage gauges from the alerts of the last ``TRIAGE_DAYS`` judged true or
        false positive, and the active-silence gauge from the silences in effect at ``now``
        (each scrape); detectors with no such alert, or no such silence, have no series."""
        now = now or utcnow()
        since = now - dt.timedelta(days=TRIAGE_DAYS)
        rows = session.execute(
            select(Alert.detector, Alert.verdict, func.count())
            .where(
                Alert.verdict.in_(("true_positive", "false_positive")),
                Alert.created_at >= since,
            )
            .group_by(Alert.detector, Alert.verdict)
        ).all()
        counts = {(str(d), str(v)): int(n) for d, v, n in rows}
        self.triaged.clear()
        self.triage_precision.clear()
        for d in sorted({d for d, _ in counts}):
            tp, fp = counts.get((d, "true_positive"), 0), counts.get((d, "false_positive"), 0)
            self.triaged.labels(d).set(tp + fp)
            self.triage_precision.labels(d).set(tp / (tp + fp))
        silenced = session.execute(
            select(Silence.detector, func.count())
            .where(Silence.starts_at <= now, Silence.ends_at > now)
            .group_by(Silence.detector)
        ).all()
        self.active_silences.clear()
        for d, n in silenced:
            self.active_silences.labels(str(d)).set(int(n))

    def database_unreadable(self, webhooks: Iterable[str]) -> None:
        """This scrape could not read the database: say so, and report the gauges it feeds as
        unknown (NaN) rather than repeat stale values."""
        self.database_up.set(0)
        self.triaged.clear()  # unknown: no series rather than stale ones
        self.triage_precision.clear()
        self.active_silences.clear()
        nan = float("nan")
        for gauge in (self.outbox_backlog, self.outbox_oldest_age, self.pending_turns):
            gauge.set(nan)
        for name in webhooks:
            for state in ("pending", "dead"):
                self.webhook_deliveries.labels(name, state).set(nan)


def _age_seconds(now: dt.datetime, then: dt.datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        then = then.replace(tzinfo=dt.UTC)
    return max(0.0, (now - then).total_seconds())
