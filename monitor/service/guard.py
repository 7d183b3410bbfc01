"""Guard mode's exchange: one proxied chat completion as a monitored turn, and what the tenant's
detector policies decide about it (``guard_settings`` lists them).

An exchange is the request's messages plus the answer as it reached the client. It becomes one
``TurnRequest`` for the one ingest path, with what the guard did in its metadata under
``guard``: the outcome (completed, blocked, aborted, disconnected), the request's model and
every decision, the shadowed ones included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from detectors.engine import Verdict
from monitor.messages import Message
from monitor.openai_format import openai_error
from monitor.service.guard_settings import Policy
from monitor.service.ingest import TurnRequest
from monitor.service.schemas import MessageIn

Stage = Literal["block", "abort", "steer"]
Outcome = Literal["completed", "blocked", "aborted", "disconnected", "upstream_failed"]
# The policies each stage acts on: the request is scored once for block and steer.
_ACTING: dict[str, tuple[str, ...]] = {
    "block": ("block", "shadow"),
    "steer": ("steer",),
    "abort": ("abort", "shadow"),
}
CONVERSATION_HEADER = "X-Conversation-Id"
TURN_HEADER = "X-Turn-Id"


class ProxiedMessage(MessageIn):
    """A request message as the guard reads it: the turn API's message, with the fields it
    does not read (``audio``, ``prefix``, ...) ignored rather than refused: they go upstream
    untouched."""

    model_config = ConfigDict(extra="ignore")


_MESSAGES = TypeAdapter(list[ProxiedMessage])


class GuardInputError(ValueError):
    """The guard cannot read the request's messages: 422 with these field errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"] if errors else "unreadable request")
        self.errors = errors


def read_messages(body: Any) -> list[ProxiedMessage]:
    """The request's ``messages``, or GuardInputError naming what is wrong (``body.messages...``).
    The rest of the body is the upstream's to judge."""
    if not isinstance(body, dict):
        raise GuardInputError(
            [{"loc": ["body"], "type": "dict_type", "msg": "the body must be a JSON object"}]
        )
    if "messages" not in body:
        raise GuardInputError([{"loc": ["body", "messages"], "type": "missing", "msg": "required"}])
    try:
        messages = _MESSAGES.validate_python(body["messages"])
    except ValidationError as exc:
        raise GuardInputError(
            [
                {"loc": ["body", "messages", *e["loc"]], "type": e["type"], "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from None
    if not messages:
        raise GuardInputError(
            [{"loc": ["body", "messages"], "type": "too_short", "msg": "at least one message"}]
        )
    # What decides how the answer comes back is checked here, not left to the upstream: a
    # lenient upstream streaming on "stream": 1, or n answers of which one is read, would send
    # the client answers the guard never saw.
    stream, n = body.get("stream"), body.get("n")
    if not (stream is None or isinstance(stream, bool)):  # 1 == True: compare types
        raise GuardInputError(
            [{"loc": ["body", "stream"], "type": "bool_type", "msg": "must be true or false"}]
        )
    if not (n is None or (type(n) is int and n == 1)):
        raise GuardInputError(
            [
                {
                    "loc": ["body", "n"],
                    "type": "value_error",
                    "msg": "the guard reads one answer: n must be 1",
                }
            ]
        )
    return messages


def conversation_id(header: str | None, body: dict[str, Any], messages: list[Message]) -> str:
    """The client's ``X-Conversation-Id``; else the request's ``user`` plus a hash of the
    messages up to the first user message, which every later request of the same chat repeats."""
    if header and header.strip():
        return header.strip()[:256]
    opening: list[dict[str, str]] = []
    for m in messages:
        opening.append({"role": m.role, "content": m.content})
        if m.role == "user":
            break
    digest = hashlib.sha256(json.dumps(opening, sort_keys=True).encode()).hexdigest()[:24]
    user = body.get("user")
    prefix = user.strip()[:128] if isinstance(user, str) and user.strip() else "chat"
    return f"{prefix}:{digest}"


@dataclass(frozen=True)
class Decision:
    """A detector fired under a policy that acts: what was (or, shadowed, would have been) done,
    and after how many streamed answer tokens (0: on the request)."""

    detector: str
    action: Stage
    at_tokens: int
    score: float
    shadow: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "action": self.action,
            "at_tokens": self.at_tokens,
            "score": round(self.score, 6),
            "shadow": self.shadow,
        }


@dataclass
class Exchange:
    """One proxied call, from the request to the last byte the client got."""

    tenant: str
    conversation_id: str
    messages: list[Message]
    policies: dict[str, Policy]
    turn_id: str
    pipeline: str | None = None
    request_model: str | None = None
    unread_parts: int = 0
    answer: list[str] = field(default_factory=list)  # per streamed chunk: its text, tool calls'
    tokens: int = 0  # streamed chunks with content (or, whole, 0 until the answer is read)
    call_starts: list[int] = field(default_factory=list)  # chunks where a tool call begins
    decisions: list[Decision] = field(default_factory=list)
    outcome: Outcome = "completed"
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    relaying: bool = False  # a streamed answer's relay has begun (it records the exchange)

    def scores(self, stage: Literal["block", "abort"]) -> bool:
        """Whether any policy needs the exchange scored at this stage (the request, for block
        and steer; the answer, for abort)."""
        acting = _ACTING[stage] + (_ACTING["steer"] if stage == "block" else ())
        return any(p in acting for p in self.policies.values())

    def decide(self, stage: Stage, verdicts: list[Verdict]) -> Decision | None:
        """Record the fires that act at this stage (shadowed ones once per detector and
        stage); the first enforced one, if any, is what the guard does now."""
        enforced: Decision | None = None
        seen = {(d.detector, d.action) for d in self.decisions}
        for v in verdicts:
            policy = self.policies.get(v.detector)
            if not v.fired or policy not in _ACTING[stage] or (v.detector, stage) in seen:
                continue
            decision = Decision(v.detector, stage, self.tokens, v.score, policy == "shadow")
            self.decisions.append(decision)
            if not decision.shadow and enforced is None:
                enforced = decision
        return enforced

    def turn(self, *, answer: bool = True) -> TurnRequest:
        """The exchange as a turn: the messages, then the answer as delivered (when any)."""
        text = "".join(self.answer)
        if any(i < len(self.answer) for i in self.call_starts):
            text += ")"  # the last tool call's arguments, as MessageIn.monitored writes a call
        messages = [*self.messages]
        if answer and text:
            messages.append(Message(role="assistant", content=text))
        meta: dict[str, Any] = {
            "outcome": self.outcome,
            "decisions": [d.to_json() for d in self.decisions],
        }
        if self.request_model:
            meta["model"] = self.request_model
        if self.finish_reasons:
            meta["finish_reasons"] = self.finish_reasons
        return TurnRequest(
            self.tenant,
            self.conversation_id,
            messages,
            {"guard": meta},
            pipeline=self.pipeline,
            turn_id=self.turn_id,
            unread_parts=self.unread_parts,
        )

    def observe_chunk(self, chunk: dict[str, Any]) -> str:
        """Take a streamed chunk's id, model, usage and finish reasons; its text delta."""
        self.response_id = self.response_id or _str(chunk.get("id"))
        self.response_model = self.response_model or _str(chunk.get("model"))
        self._take_usage(chunk.get("usage"))
        text = ""
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the first choice is the one monitored (n > 1 is rare)
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                text += content
            # Tool calls stream as {index, function: {name, arguments}} pieces: the name once,
            # then fragments of the arguments; read as "name(arguments)", the assistant's text.
            for call in (delta.get("tool_calls") if isinstance(delta, dict) else None) or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    continue
                if isinstance(name := function.get("name"), str) and name:
                    opened = bool(self.call_starts)
                    begun = bool(self.answer) or bool(text)
                    text += (")" if opened else "") + ("\n" if begun else "") + name + "("
                    self.call_starts.append(len(self.answer))
                if isinstance(arguments := function.get("arguments"), str):
                    text += arguments
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reasons.append(reason)
        if text:
            self.answer.append(text)
            self.tokens += 1
        return text

    def observe_completion(self, body: dict[str, Any]) -> None:
        """Take a whole (non-streamed) completion's answer, ids, usage and finish reasons."""
        self.response_id = _str(body.get("id"))
        self.response_model = _str(body.get("model"))
        self._take_usage(body.get("usage"))
        for choice in body.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            message = choice.get("message") or {}
            if isinstance(message, dict):
                self.answer = [t for t in [_answer_text(message)] if t]
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reasons = [reason]

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(key), int):
                    self.usage[key] = usage[key]


def _answer_text(message: dict[str, Any]) -> str:
    """A whole answer's text as the detectors read it: its content, refusal and tool calls
    (``name(arguments)``), one per line, as ``MessageIn.monitored`` writes a request's."""
    texts = [t for t in (message.get("content"), message.get("refusal")) if isinstance(t, str)]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            arguments = function.get("arguments")
            texts.append(f"{function['name']}({arguments if isinstance(arguments, str) else ''})")
    return "\n".join(texts)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def content_filter_error(decision: Decision, turn_id: str) -> dict[str, Any]:
    """The 400 a blocked request gets (Azure OpenAI's convention: ``code: content_filter``)."""
    return openai_error(
        f"the request was blocked by the safety monitor: detector {decision.detector} fired "
        f"(turn {turn_id})",
        "content_filter",
        param="messages",
        detector=decision.detector,
        turn_id=turn_id,
    )
