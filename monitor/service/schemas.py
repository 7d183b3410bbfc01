"""Request and response bodies of the turn API and the Kafka traffic topic; what they accept is
what the database can hold."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from monitor.service.storable import StorableStr, storable_json

# A body refused before any field can be named: not JSON at all, or over the size limit.
BODY_REFUSED: dict[int | str, dict[str, Any]] = {
    400: {"description": "body is not parsable JSON"},
    413: {"description": "body too large"},
}


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: StorableStr = Field(max_length=200_000)


class TurnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: StorableStr = Field(min_length=1, max_length=256)
    messages: list[MessageIn] = Field(min_length=1, max_length=200)
    model: StorableStr | None = Field(default=None, description="Configured pipeline name.")
    metadata: Annotated[dict[str, Any], AfterValidator(storable_json)] = Field(default_factory=dict)


class TrafficTurn(TurnIn):
    """A message of the Kafka traffic topic: the body of ``POST /v1/turns``, plus the tenant
    (the HTTP API takes it from the key) and an optional id of the turn at its producer."""

    tenant: StorableStr = Field(default="default", min_length=1, max_length=64)
    turn_id: StorableStr | None = Field(default=None, min_length=1, max_length=256)

    def idempotency_key(self) -> str:
        """``turn_id``, else a hash of the content: a redelivered message is stored once."""
        if self.turn_id:
            return self.turn_id
        doc = json.dumps(self.model_dump(exclude={"turn_id"}), sort_keys=True)
        return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


class TurnBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    turns: list[TurnIn] = Field(min_length=1)


class VerdictOut(BaseModel):
    detector: str
    score: float
    fired: bool
    severity: str


class TurnOut(BaseModel):
    turn_id: str
    conversation_id: str = Field(description="As stored: redacted when it held personal data.")
    verdicts: list[VerdictOut]
    alert_ids: list[str]
    n_tokens: int = Field(description="Tokens the detectors read.")
    dropped_tokens: int = Field(
        description="Tokens cut from the front of a turn longer than the model's window "
        "(MAX_TOKENS), which no detector read; 0 when the turn was read whole."
    )
