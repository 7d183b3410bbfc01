"""The audit API's response shapes, declared so that ``/openapi.json`` types them (and FastAPI
checks each answer against them). The row JSON itself is built in ``rows.py`` and ``views.py``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Links(BaseModel):
    conversation: str = Field(description="The conversation in this API.")
    ui: str = Field(description="The conversation in the audit UI.")


class AlertOut(BaseModel):
    alert_id: str
    turn_id: str
    conversation_id: str
    pipeline: str
    detector: str
    kind: str = Field(description="rule, probe or escalation.")
    severity: str
    suppressed: int = Field(description="Later fires counted on this alert (cooldown).")
    score: float
    summary: str
    created_at: str = Field(description="ISO 8601, UTC, with its offset.")
    evidence: dict[str, Any] = Field(description="As in the alert contract (docs/alerts.md).")
    status: str = Field(description="Triage: open, acknowledged or resolved.")
    verdict: str | None = Field(
        description="true_positive, false_positive or unsure; null: not judged yet."
    )
    assignee: str | None
    version: int = Field(description="Grows with each triage change; a PATCH sends the one read.")
    updated_at: str | None = Field(description="The last triage change (null: none yet).")


class ListedAlert(AlertOut):
    links: Links


class NoteOut(BaseModel):
    id: int
    author: str = Field(description="The key's name, else its prefix.")
    text: str
    created_at: str


class HistoryOut(BaseModel):
    author: str
    changed_at: str
    field: str = Field(description="status, verdict or assignee.")
    from_: str | None = Field(alias="from")
    to: str | None
    version: int = Field(description="The alert's version this change made.")


class AlertDetail(ListedAlert):
    notes: list[NoteOut] = Field(description="Oldest first; append-only.")
    history: list[HistoryOut] = Field(description="Every triage change, oldest first.")


class TriageOut(BaseModel):
    matched: int = Field(description="Alerts the call selected.")
    changed: int = Field(description="Of those, alerts a field of which changed.")
    alerts: list[dict[str, Any]] = Field(description="Each selected alert: alert_id, version.")


class SilenceOut(BaseModel):
    id: int
    tenant: str | None = Field(description="The tenant whose fires it withholds; null: every one.")
    all_tenants: bool = Field(
        description="Every tenant's fires (the operator's: made and expired with the CLI)."
    )
    detector: str
    pipeline: str | None = Field(description="Only this pipeline's fires; null: every one.")
    features: str | None = Field(
        description="Only fires with an evidence feature matching: indices (6168), ranges "
        "(7000-7100), label globs (*praise*), comma-separated; null: every fire."
    )
    reason: str
    created_by: str
    starts_at: str
    ends_at: str
    created_at: str
    expired_by: str | None = Field(description="Who ended it early (null: nobody).")
    state: str = Field(description="pending (not started), active or expired.")
    fires: int = Field(
        description="Fires it withheld from alerting (stored, not alerted); of an all-tenant "
        "silence, the caller's tenant's only."
    )


class SilencesPage(BaseModel):
    silences: list[SilenceOut]


class AlertsPage(BaseModel):
    alerts: list[ListedAlert]
    next_offset: int | None = Field(description="The next page's offset; null on the last.")
    counts: dict[str, dict[str, int]] | None = Field(
        default=None, description="Facets (with counts=true): per field, value → alerts."
    )


class ConversationSummary(BaseModel):
    conversation_id: str
    turns: int
    alerts: int
    model: str | None
    first_at: str
    last_at: str
    links: Links


class ConversationsPage(BaseModel):
    conversations: list[ConversationSummary]
    next_offset: int | None


class VerdictView(BaseModel):
    detector: str
    kind: str
    score: float
    fired: bool
    severity: str
    evidence: dict[str, Any]


class Shade(BaseModel):
    name: str
    title: str
    note: str = ""


class TokenView(BaseModel):
    token: str
    role: str
    shade: float = Field(ge=0, le=1)
    features: list[tuple[int, float]] = Field(description="Top features: (index, activation).")


class TurnView(BaseModel):
    turn_id: str
    created_at: str
    pipeline: str
    messages: list[dict[str, Any]]
    metadata: dict[str, Any]
    dropped_tokens: int
    sae_fingerprint: str | None = Field(
        description="The SAE its stored features were read with; null: unknown (stored before "
        "fingerprints were recorded)."
    )
    sae_loaded: str | None = Field(
        description="The SAE its pipeline has loaded now (null: the pipeline is not loaded). "
        "Where it differs from sae_fingerprint, shading and per-token features are read as the "
        "loaded SAE's and may not match (db reencode re-reads stored turns)."
    )
    alert_ids: list[str]
    alerts: list[AlertOut]
    verdicts: list[VerdictView]
    shade: Shade | None
    tokens: list[TokenView]


class ConversationView(BaseModel):
    conversation_id: str
    turns: list[TurnView]
