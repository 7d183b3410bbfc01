"""Request and response bodies of the turn API; what they accept is what the database can hold."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from monitor.service.storable import StorableStr, storable_json


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
