"""The alert sinks, behind one small interface: the Kafka outbox (``kafka.py``) and each
configured webhook (``webhook.py``).

A sink does one round at a time (``round``: how many alerts it sent or retired) and never waits on
another sink; the dispatcher runs each in a loop of its own. Rows are claimed with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several service instances can share the work.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

BATCH = 100  # rows a sink claims per round


class Sink(Protocol):
    name: str  # in the dispatcher's loop name, as /readyz reports it
    idle_s: float  # the wait after a round that sent nothing

    def round(self) -> int:
        """One round: how many alerts it sent or retired (0: wait ``idle_s`` before the next)."""

    def close(self) -> None: ...


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
