"""Request and response bodies of the turn API and the Kafka traffic topic; what they accept is
what the database can hold."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from monitor.messages import Message
from monitor.service.storable import StorableStr, storable_json

# What any route behind an API key may answer besides its own outcomes.
AUTH_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, invalid or revoked API key"},
    403: {"description": "this key's role may not do this"},
    503: {"description": "the database is unavailable; retry later"},
}

# A body refused before any field can be named: not JSON at all, or over the size limit.
BODY_REFUSED: dict[int | str, dict[str, Any]] = {
    400: {"description": "body is not parsable JSON"},
    413: {"description": "body too large, or a turn longer than max_input_tokens"},
}


MAX_CONTENT = 200_000  # characters of one message's text

# Where a message's text comes from, by its OpenAI role: "developer" is the newer name of
# "system", "function" the older one of "tool".
_MONITORED_AS = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


class ContentPart(BaseModel):
    """One part of a message's content, as the OpenAI chat format lists them. Text and refusal
    parts are read; the others (images, audio, files) are counted as unread, not refused, so
    that the turn's text is still monitored."""

    model_config = ConfigDict(extra="allow")
    type: StorableStr = Field(min_length=1, max_length=64)
    text: StorableStr | None = Field(default=None, max_length=MAX_CONTENT)
    refusal: StorableStr | None = Field(default=None, max_length=MAX_CONTENT)

    @model_validator(mode="after")
    def _has_its_text(self) -> ContentPart:
        if self.type in ("text", "refusal") and getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs a {self.type!r} field")
        return self

    @property
    def readable(self) -> str | None:
        return {"text": self.text, "refusal": self.refusal}.get(self.type)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StorableStr = Field(min_length=1, max_length=256)
    arguments: StorableStr = Field(default="", max_length=MAX_CONTENT)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StorableStr | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


def _content_kind(value: Any) -> str:
    return "parts" if isinstance(value, list) else "text"


# A text or a list of parts; the tag names which one an error is about ("content.text").
Content = Annotated[
    Annotated[Annotated[StorableStr, Field(max_length=MAX_CONTENT)], Tag("text")]
    | Annotated[list[ContentPart], Field(max_length=1000), Tag("parts")],
    Discriminator(_content_kind),
]


class MessageIn(BaseModel):
    """A chat message: ``{role, content}``, or any message of the OpenAI chat format (a
    ``developer`` or ``tool`` role, content as a list of parts, an assistant's ``tool_calls``
    or ``refusal``). What a tool returned is monitored under the ``tool`` role; the calls an
    assistant makes are its own text and are monitored under its role."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content | None = None
    name: StorableStr | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: StorableStr | None = Field(default=None, max_length=256)
    refusal: StorableStr | None = Field(default=None, max_length=MAX_CONTENT)

    @model_validator(mode="after")
    def _says_something(self) -> MessageIn:
        if self.content is None and not self.tool_calls and self.refusal is None:
            raise ValueError("a message needs content, tool_calls or a refusal")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message can carry tool_calls")
        return self

    @property
    def unread_parts(self) -> int:
        """Content parts no detector can read (images, audio, files)."""
        if not isinstance(self.content, list):
            return 0
        return sum(part.readable is None for part in self.content)

    def monitored(self) -> Message:
        """The message as the detectors read it: its text under the role it is monitored as."""
        if isinstance(self.content, list):
            texts = [t for t in (part.readable for part in self.content) if t is not None]
        else:
            texts = [self.content] if self.content is not None else []
        if self.refusal is not None:
            texts.append(self.refusal)
        for call in self.tool_calls or []:
            texts.append(f"{call.function.name}({call.function.arguments})")
        return Message(role=_MONITORED_AS[self.role], content="\n".join(texts))  # type: ignore[arg-type]


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
    duplicate: bool = Field(
        default=False,
        description="This Idempotency-Key was stored before: the ids are the first turn's.",
    )
    unread_parts: int = Field(
        default=0,
        description="Content parts no detector read (images, audio, files): only text is "
        "monitored.",
    )
    windows: int = Field(
        default=1,
        description="Forward passes the turn was read in: a turn longer than the model's "
        "window (MAX_TOKENS) is read whole, in overlapping windows.",
    )
    dropped_tokens: int = Field(
        default=0,
        description="Tokens no detector read; 0, since a turn longer than MAX_INPUT_TOKENS is "
        "refused (413) rather than cut.",
    )
