"""The published alert contract: the payload every sink sends (Kafka, webhooks), as code.

``AlertPayload`` is what ``alerting.Alerts`` builds each alert's outbox payload from, so the JSON
Schema served at ``GET /v1/schemas/alert`` and the AsyncAPI document of the Kafka topics
(``GET /v1/schemas/asyncapi``) are generated from the same model the messages are made with.

Versioning: ``schema_version`` changes when a field is removed, renamed or changes meaning;
added optional fields keep it. Consumers should ignore fields they do not know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from detectors.rules import Severity

if TYPE_CHECKING:
    from monitor.service.db import Alert

SCHEMA_VERSION: Final = 1
SCHEMA_ID = f"https://safety-monitor.dev/schemas/alert/v{SCHEMA_VERSION}.json"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureEvidence(_Doc):
    """One SAE feature (or probe input) that counted towards the verdict."""

    index: int = Field(description="Feature index in the pipeline's SAE dictionary.")
    label: str
    value: float = Field(description="Aggregated value: activation, count, share or input.")
    cutoff: float = Field(description="What the value is compared with, or the probe weight.")


class TokenEvidence(_Doc):
    """A token where a feature the detector reads was active."""

    position: int = Field(ge=0, description="Token index within the turn.")
    token_id: int | None = Field(description="Vocabulary id; null where the token was redacted.")
    feature: int
    activation: float
    redacted: bool = Field(default=False, description="The token was redacted before storage.")


class DetectorEvidence(_Doc):
    """Why a rule or probe fired: its strongest features and the tokens they fired on."""

    features: list[FeatureEvidence]
    tokens: list[TokenEvidence]


class EscalationEvidence(_Doc):
    """Why an escalation alert was raised: a tenant's fires of a detector within a window."""

    fires: int = Field(ge=1)
    window_seconds: int = Field(ge=1)


class AlertPayload(_Doc):
    """An alert as sinks send it: the Kafka message value and the webhook body (JSON)."""

    model_config = ConfigDict(
        extra="forbid",
        title="Alert",
        json_schema_extra={
            "$id": SCHEMA_ID,
            "$schema": "https://json-schema.org/draft/2020-12/schema",
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    alert_id: str = Field(description="Unique; the Kafka header alert_id and webhook-id too.")
    tenant: str
    conversation_id: str = Field(description="As stored: redacted where it held personal data.")
    turn_id: str
    pipeline: str = Field(description="The configured pipeline (model, layer, SAE, catalog).")
    detector: str
    kind: Literal["rule", "probe", "escalation"]
    severity: Severity
    score: float = Field(description="A rule fires at score >= 1; a probe's is a probability.")
    summary: str
    created_at: AwareDatetime = Field(description="When the alert was made, UTC.")
    evidence: DetectorEvidence | EscalationEvidence
    metadata: dict[str, Any] = Field(description="The turn's metadata, redacted as stored.")


def alert_payload(alert: Alert, metadata: dict[str, Any]) -> dict[str, Any]:
    """The JSON payload of a stored alert (with its turn's stored ``metadata``), validated
    against the contract: a field outside it fails here, in the recording transaction, rather
    than at a consumer."""
    return AlertPayload.model_validate(
        {
            "alert_id": alert.id,
            "tenant": alert.tenant,
            "conversation_id": alert.conversation_id,
            "turn_id": alert.turn_id,
            "pipeline": alert.pipeline,
            "detector": alert.detector,
            "kind": alert.kind,
            "severity": alert.severity,
            "score": round(alert.score, 6),
            "summary": alert.summary,
            "created_at": alert.created_at,
            "evidence": alert.evidence,
            "metadata": metadata,
        }
    ).model_dump(mode="json")


def alert_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the alert payload."""
    return AlertPayload.model_json_schema(mode="serialization")


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 description of the Kafka topics the service reads and writes, with the
    default topic names (``SAFETY_MONITOR_ALERTS_TOPIC`` and ``..._TRAFFIC_TOPIC`` rename them)."""
    from monitor.service.schemas import TrafficTurn

    alert = alert_schema()
    defs = alert.pop("$defs", {})
    turn = TrafficTurn.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(turn.pop("$defs", {}))
    alert_ref = _rebased(alert)
    components = {name: _rebased(s) for name, s in defs.items()}
    components["Alert"], components["TrafficTurn"] = alert_ref, turn
    string = {"type": "string"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "safety-monitor Kafka topics",
            "version": str(SCHEMA_VERSION),
            "description": "Alerts out (at least once: de-duplicate by alert_id), turns in.",
        },
        "channels": {
            "alerts": {
                "address": "safety.alerts",
                "messages": {"alert": {"$ref": "#/components/messages/alert"}},
            },
            "traffic": {
                "address": "llm.traffic",
                "messages": {"turn": {"$ref": "#/components/messages/turn"}},
            },
            "traffic_dlq": {
                "address": "llm.traffic.dlq",
                "messages": {"dead": {"$ref": "#/components/messages/dead"}},
            },
        },
        "operations": {
            "publishAlerts": {"action": "send", "channel": {"$ref": "#/channels/alerts"}},
            "consumeTraffic": {"action": "receive", "channel": {"$ref": "#/channels/traffic"}},
            "deadLetter": {"action": "send", "channel": {"$ref": "#/channels/traffic_dlq"}},
        },
        "components": {
            "schemas": components,
            "messages": {
                "alert": {
                    "contentType": "application/json",
                    "summary": "An alert; the key is the conversation id.",
                    "headers": {"type": "object", "properties": {"alert_id": string}},
                    "payload": {"$ref": "#/components/schemas/Alert"},
                },
                "turn": {
                    "contentType": "application/json",
                    "summary": "A turn to monitor; a message that does not validate is "
                    "dead-lettered.",
                    "payload": {"$ref": "#/components/schemas/TrafficTurn"},
                },
                "dead": {
                    "summary": "The refused message as it came (key and value), with why.",
                    "headers": {
                        "type": "object",
                        "properties": {"error": string, "source": string},
                    },
                    "payload": {"description": "The original message value, unchanged."},
                },
            },
        },
    }


def _rebased(schema: Any) -> Any:
    """A schema with its ``#/$defs/X`` references pointing at ``#/components/schemas/X``."""
    if isinstance(schema, dict):
        return {
            k: (
                v.replace("#/$defs/", "#/components/schemas/")
                if k == "$ref" and isinstance(v, str)
                else _rebased(v)
            )
            for k, v in schema.items()
            if k not in ("$id", "$schema")
        }
    if isinstance(schema, list):
        return [_rebased(v) for v in schema]
    return schema
