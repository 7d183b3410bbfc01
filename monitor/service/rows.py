"""JSON views of stored rows: alerts, turns and conversation summaries, as the API, the web
UI and the exports show them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from monitor.service.db import Alert, Turn


def alert_json(a: Alert) -> dict[str, Any]:
    return {
        "alert_id": a.id,
        "turn_id": a.turn_id,
        "conversation_id": a.conversation_id,
        "pipeline": a.pipeline,
        "detector": a.detector,
        "kind": a.kind,
        "severity": a.severity,
        "suppressed": a.suppressed,
        "score": a.score,
        "summary": a.summary,
        "created_at": utc_iso(a.created_at),
        "evidence": a.evidence,
        "status": a.status,
        "verdict": a.verdict,
        "assignee": a.assignee,
        "version": a.version,
        "updated_at": utc_iso(a.updated_at) if a.updated_at is not None else None,
    }


def turn_json(t: Turn) -> dict[str, Any]:
    return {
        "turn_id": t.id,
        "conversation_id": t.conversation_id,
        "created_at": utc_iso(t.created_at),
        "pipeline": t.pipeline,
        "messages": t.messages,
        "metadata": t.meta,
        "n_tokens": t.n_tokens,
        "dropped_tokens": t.dropped,
        "sae_fingerprint": t.sae_fingerprint,  # the SAE its stored features were read with
    }


def conversation_json(row: Any) -> dict[str, Any]:
    return {
        "conversation_id": row.conversation_id,
        "turns": int(row.turns),
        "alerts": int(row.alerts),
        "model": row.model,
        "first_at": utc_iso(row.first_at),
        "last_at": utc_iso(row.last_at),
    }


def utc_iso(value: Any) -> str:
    """A stored time as ISO 8601 in UTC with its offset. SQLite keeps no offset (its times come
    back naive, aggregates as text); every time the service writes is UTC."""
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat()
