"""The Slack sink: an incoming-webhook message per alert, ``text`` (notifications, clients
without blocks) and Block Kit ``blocks``: a header, the summary with detector, severity,
tenant, score, pipeline and conversation as fields, the top features, a button to the audit UI
(when ``public_url`` is set) and the alert id and time.

Slack answers 200 ``ok``; its limits (header 150 characters, section text 3,000, a field 2,000,
ten fields, a button's label 75) are kept by cutting.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.sink_settings import SlackConfig
from monitor.service.sinks import HttpRequest, audit_link, json_request, top_features
from monitor.service.sinks.delivery import DeliverySink

ICON = {"critical": ":red_circle:", "high": ":large_orange_circle:", "medium": ":warning:"}


def _esc(text: str) -> str:
    """Text for Slack's mrkdwn: ``&``, ``<`` and ``>`` escaped (as Slack asks), so a label or
    summary can make no link or mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message(payload: dict[str, Any], public_url: str | None) -> dict[str, Any]:
    """The incoming-webhook message of one alert (an ``AlertPayload``)."""
    p = payload
    severity, detector = str(p["severity"]), str(p["detector"])
    link = audit_link(public_url, p["conversation_id"])
    title = f"{severity.upper()}: {detector}"
    if p["kind"] == "escalation":
        title += " (escalation)"
    fields = [
        ("Detector", f"`{_esc(detector)}`"),
        ("Severity", severity),
        ("Tenant", _esc(p["tenant"])),
        ("Score", f"{p['score']:.3g}"),
        ("Pipeline", _esc(p["pipeline"])),
        ("Conversation", _esc(p["conversation_id"])),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(title, 150)}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _cut(_esc(p["summary"]) or detector, 3000)},
            "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{name}*\n{value}", 2000)}
                for name, value in fields
            ],
        },
    ]
    features = top_features(p)
    if features:
        lines = "\n".join(f"• {_esc(f)}" for f in features)
        text = _cut(f"*Top features*\n{lines}", 3000)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in the audit UI"},
                        "url": link,
                        "action_id": "open_audit_ui",
                    }
                ],
            }
        )
    blocks.append(
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": f"alert `{p['alert_id']}` · {p['created_at']}"}
            ],
        }
    )
    text = f"{ICON.get(severity, ':information_source:')} [{severity}] {detector} ({p['tenant']})"
    text = _esc(f"{text}: {p['summary']}")
    if link:
        text += f" <{link}|audit UI>"
    return {"text": _cut(text, 3000), "blocks": blocks}


class SlackMessage:
    def __init__(self, config: SlackConfig, public_url: str | None) -> None:
        self.config, self.public_url = config, public_url

    def request(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        return json_request(self.config.url, message(payload, self.public_url))


class SlackSink(DeliverySink):
    """Due deliveries of one Slack incoming webhook (``DeliverySink``)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
        config: SlackConfig,
        stop: threading.Event,
    ) -> None:
        renderer = SlackMessage(config, settings.public_url)
        super().__init__(sessions, settings, metrics, "slack", config.name, renderer, stop)
