"""Prometheus metrics of the service, on one registry per app (so tests can run several).

Names follow Prometheus conventions (``_total``, ``_seconds``, base units); labels are bounded
sets (pipeline, detector, severity, outcome), never a conversation or tenant id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from detectors.engine import Verdict
    from monitor.service.core import Recorded

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
        self.outbox_backlog = Gauge(
            "safety_monitor_outbox_backlog", "Alerts in the outbox not yet published.", registry=r
        )

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

    def observe_batch(self, pipeline: str, turns: int, tokens: int, seconds: float) -> None:
        self.batch_seconds.labels(pipeline).observe(seconds)
        self.batch_turns.labels(pipeline).observe(turns)
        self.tokens.labels(pipeline).inc(tokens)
