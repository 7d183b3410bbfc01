"""The Alertmanager sink: each alert POSTed to ``{url}/api/v2/alerts`` (a list of one postable
alert; Alertmanager answers 200), so grouping, silences, inhibition and routing to receivers
are Alertmanager's own.

Alertmanager tells alerts apart by their labels: ``alertname`` (``SafetyMonitor_<detector>``),
``detector``, ``severity``, ``tenant``, ``pipeline``, ``kind`` and ``conversation_id``, so
repeated alerts of a detector in one conversation are one Alertmanager alert (as they are one
PagerDuty incident), and other conversations' are others. It resolves an alert ``ends_after_s``
after it was sent (``endsAt``): alerts have no lifecycle here yet, nothing resolves them sooner.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sink_settings import AlertmanagerConfig
from monitor.service.sinks import HttpRequest, audit_link, json_request, top_features
from monitor.service.sinks.delivery import DeliverySink

ALERTNAME_PREFIX = "SafetyMonitor_"


def _rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def postable_alert(
    payload: dict[str, Any], ends_at: dt.datetime, public_url: str | None
) -> dict[str, Any]:
    """The postable alert (Alertmanager API v2) of one alert (an ``AlertPayload``)."""
    p = payload
    features = top_features(p)
    annotations = {
        "summary": p["summary"] or f"{p['detector']} fired",
        "description": "; ".join(features),
        "alert_id": p["alert_id"],
        "turn_id": p["turn_id"],
        "score": f"{p['score']:.6g}",
    }
    alert: dict[str, Any] = {
        "labels": {
            "alertname": ALERTNAME_PREFIX + p["detector"],
            "detector": p["detector"],
            "severity": p["severity"],
            "tenant": p["tenant"],
            "pipeline": p["pipeline"],
            "kind": p["kind"],
            "conversation_id": p["conversation_id"],
        },
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": _rfc3339(dt.datetime.fromisoformat(p["created_at"])),
        "endsAt": _rfc3339(ends_at),
    }
    link = audit_link(public_url, p["conversation_id"])
    if link:
        alert["generatorURL"] = link
    return alert


class PostableAlert:
    def __init__(self, config: AlertmanagerConfig, public_url: str | None) -> None:
        self.config, self.public_url = config, public_url

    def request(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        # From the attempt, not the alert: one sent late (Alertmanager was down) still fires.
        ends_at = now + dt.timedelta(seconds=self.config.ends_after_s)
        alert = postable_alert(payload, ends_at, self.public_url)
        return json_request(f"{self.config.url}/api/v2/alerts", [alert])


class AlertmanagerSink(DeliverySink):
    """Due deliveries of one Alertmanager (``DeliverySink``)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        config: AlertmanagerConfig,
        stop: threading.Event,
    ) -> None:
        renderer = PostableAlert(config, settings.public_url)
        super().__init__(sessions, settings, metrics, "alertmanager", config.name, renderer, stop)
