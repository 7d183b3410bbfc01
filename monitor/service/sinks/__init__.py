"""The alert sinks, behind one small interface: the Kafka outbox (``kafka.py``), each
configured webhook (``webhook.py``), Slack (``slack.py``), PagerDuty (``pagerduty.py``) and
Alertmanager (``alertmanager.py``).

A sink does one round at a time (``round``: how many alerts it sent or retired) and never waits on
another sink; the dispatcher runs each in a loop of its own. Rows are claimed with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several service instances can share the work.

Every sink but Kafka is an HTTP receiver with a row per alert in the delivery table, sent by one
loop (``delivery.DeliverySink``: claim, lease, POST, record, back off, dead-letter); what differs
is only how an alert's payload becomes a request (a ``Renderer``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

BATCH = 100  # rows a sink claims per round


class Sink(Protocol):
    name: str  # in the dispatcher's loop name, as /readyz reports it
    idle_s: float  # the wait after a round that sent nothing

    def round(self) -> int:
        """One round: how many alerts it sent or retired (0: wait ``idle_s`` before the next)."""

    def close(self) -> None: ...


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    """One delivery attempt: a POST of ``body`` to ``url``."""

    url: str
    headers: dict[str, str]
    body: bytes


class Renderer(Protocol):
    """How one kind of receiver is sent an alert."""

    def request(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        """The request of an attempt at ``now`` to deliver ``payload`` (an ``AlertPayload``)."""


@runtime_checkable
class Resolver(Renderer, Protocol):
    """A receiver that is also told when an alert is resolved (PagerDuty's incidents)."""

    def resolve(self, alert_id: str, payload: dict[str, Any], now: dt.datetime) -> HttpRequest:
        """The request that resolves what ``request`` opened for this alert."""


def json_request(url: str, document: Any) -> HttpRequest:
    """A JSON POST (``application/json``) of ``document``."""
    return HttpRequest(
        url,
        {"Content-Type": "application/json", "User-Agent": "safety-monitor"},
        json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(),
    )


def audit_link(public_url: str | None, conversation_id: str) -> str | None:
    """The audit UI's page of the conversation (None without ``public_url``). The id is quoted
    whole: stored ids may hold ``/``, ``#`` and brackets (``[EMAIL]#…``)."""
    if not public_url:
        return None
    return f"{public_url}/ui/conversations/{quote(conversation_id, safe='')}"


def top_features(payload: dict[str, Any], n: int = 5) -> list[str]:
    """The evidence's strongest features (the detector lists them strongest first), one line
    each: ``#6168 label: 7.1 (cut-off 3.9)``, a probe's ``(weight 0.8)``; an escalation's
    evidence: ``N fires within S s``."""
    evidence = payload.get("evidence") or {}
    if "fires" in evidence:
        return [f"{evidence['fires']} fires within {evidence['window_seconds']} s"]
    against = "weight" if payload.get("kind") == "probe" else "cut-off"
    return [
        f"#{f['index']} {f['label']}: {f['value']:.3g} ({against} {f['cutoff']:.3g})"
        for f in evidence.get("features", [])[:n]
    ]
