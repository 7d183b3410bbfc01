"""The PagerDuty sink: an Events API v2 ``trigger`` event per alert, POSTed to
``https://events.pagerduty.com/v2/enqueue`` (or the configured ``url``), which answers 202.

The dedup key is ``<tenant>/<conversation_id>/<detector>``: further alerts of a detector in a
conversation add to the open incident instead of opening another. When an alert is resolved in
triage, a ``resolve`` event with the same key follows (a delivery row of its own, retried like
the trigger), which resolves that incident.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sink_settings import PagerDutyConfig
from monitor.service.sinks import HttpRequest, audit_link, json_request, top_features
from monitor.service.sinks.delivery import DeliverySink

# Ours to PagerDuty's (critical, error, warning, info).
SEVERITY = {
    "critical": "critical",
    "high": "error",
    "medium": "warning",
    "low": "info",
    "info": "info",
}
SUMMARY_MAX, DEDUP_KEY_MAX = 1024, 255  # PagerDuty's limits


def dedup_key(payload: dict[str, Any]) -> str:
    """``tenant/conversation/detector``; past 255 characters, its first 190 and a digest of all
    of it (still one key per conversation and detector)."""
    key = f"{payload['tenant']}/{payload['conversation_id']}/{payload['detector']}"
    if len(key) <= DEDUP_KEY_MAX:
        return key
    return key[:190] + "#" + hashlib.sha256(key.encode()).hexdigest()


def event(payload: dict[str, Any], routing_key: str, public_url: str | None) -> dict[str, Any]:
    """The Events API v2 trigger event of one alert (an ``AlertPayload``)."""
    p = payload
    summary = f"[{p['severity']}] {p['detector']} ({p['tenant']}): {p['summary'] or p['kind']}"
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1] + "…"
    link = audit_link(public_url, p["conversation_id"])
    doc: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(p),
        "client": "safety-monitor",
        "payload": {
            "summary": summary,
            "source": p["pipeline"],
            "severity": SEVERITY[p["severity"]],
            "timestamp": p["created_at"],
            "component": p["detector"],
            "group": p["tenant"],
            "class": p["kind"],
            "custom_details": {
                "alert_id": p["alert_id"],
                "conversation_id": p["conversation_id"],
                "turn_id": p["turn_id"],
                "score": p["score"],
                "severity": p["severity"],
                "top_features": top_features(p),
                "metadata": p.get("metadata", {}),
            },
        },
    }
    if link:
        doc["client_url"] = public_url
        doc["links"] = [{"href": link, "text": "The conversation in the audit UI"}]
    return doc


class PagerDutyEvent:
    def __init__(self, config: PagerDutyConfig, public_url: str | None) -> None:
        self.config, self.public_url = config, public_url

    def request(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        doc = event(payload, self.config.routing_key, self.public_url)
        return json_request(self.config.url, doc)

    def resolve(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        doc = {
            "routing_key": self.config.routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key(payload),
        }
        return json_request(self.config.url, doc)


class PagerDutySink(DeliverySink):
    """Due deliveries of one PagerDuty integration (``DeliverySink``)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        config: PagerDutyConfig,
        stop: threading.Event,
    ) -> None:
        renderer = PagerDutyEvent(config, settings.public_url)
        super().__init__(sessions, settings, metrics, "pagerduty", config.name, renderer, stop)
