"""What guard mode exports on ``/metrics`` (registered on the service's registry when an upstream
is set): proxied exchanges by outcome, block/abort decisions, and what went wrong on the way.
The service-health dashboard's "Guard mode" row reads them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class GuardMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.exchanges = Counter(
            "safety_monitor_guard_exchanges_total",
            "Proxied chat completions, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.actions = Counter(
            "safety_monitor_guard_actions_total",
            "Guard decisions: block or abort, done or (shadow) only recorded.",
            ["action", "detector", "shadow"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "safety_monitor_guard_upstream_errors_total",
            "Upstream calls that failed (unreachable, broken off).",
            registry=registry,
        )
        self.scoring_failures = Counter(
            "safety_monitor_guard_scoring_failures_total",
            "Proxied exchanges the guard could not score (let through unscored).",
            registry=registry,
        )
        self.unrecorded = Counter(
            "safety_monitor_guard_unrecorded_total",
            "Proxied exchanges that could not be recorded (the database refused or was down).",
            registry=registry,
        )
