"""What is stored of a turn once redacted: the detectors saw the real text, storage does not.

The conversation id and metadata keys are identifiers: a finding in them is replaced and a
digest of the original appended (``Redactor.redact_identifier``), so that distinct ids stay
distinct and a lookup by the original id finds the stored one (``stored_conversation_id``).
Metadata values are redacted as text, numbers included: an integer card number is as much a
card number as its digits in a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from monitor.service.redaction import Redactor

if TYPE_CHECKING:
    from monitor.messages import Message
    from monitor.pipeline import EncodedInput
    from monitor.service.settings import ServiceSettings

ID_LENGTH = 256  # the conversation id column


@lru_cache(maxsize=8)
def redactor(kinds: tuple[str, ...]) -> Redactor:
    return Redactor(kinds)


def stored_conversation_id(conversation_id: str, kinds: Sequence[str]) -> str:
    """The id a conversation is stored under (the same id when redaction finds nothing)."""
    if not kinds:
        return conversation_id
    return redactor(tuple(kinds)).redact_identifier(conversation_id, ID_LENGTH)


def stored_metadata_keys(metadata: dict[str, str], kinds: Sequence[str]) -> dict[str, str]:
    """A metadata filter with its field names as stored (values are compared as stored)."""
    if not kinds:
        return metadata
    r = redactor(tuple(kinds))
    return {r.redact_identifier(k): v for k, v in metadata.items()}


def redact_json(value: Any, r: Redactor) -> Any:
    """Nested metadata with its keys, strings and integral numbers redacted."""
    if isinstance(value, str):
        return r.redact(value)
    if isinstance(value, dict):
        return {
            (r.redact_identifier(k) if isinstance(k, str) else k): redact_json(v, r)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_json(v, r) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        digits = str(int(value))
        redacted = r.redact(digits)
        return value if redacted == digits else redacted  # a number that reads as a card: text
    return value


@dataclass(frozen=True)
class Redacted:
    """A turn as stored: redacted messages, metadata, conversation id and per-token text."""

    conversation_id: str
    messages: list[dict[str, Any]]
    metadata: dict[str, Any]
    tokens: list[str]
    positions: frozenset[int]  # token positions whose text was (partly) redacted

    @classmethod
    def of(
        cls,
        conversation_id: str,
        messages: list[Message],
        metadata: dict[str, Any],
        encoded: EncodedInput,
        settings: ServiceSettings,
    ) -> Redacted:
        raw = [m.model_dump() for m in messages]
        tokens = list(encoded.tokens)
        if not settings.redact:
            return cls(conversation_id, raw, metadata, tokens, frozenset())
        r = redactor(tuple(settings.redact))
        redacted = r.redact_tokens(tokens)
        changed = frozenset(
            i for i, (a, b) in enumerate(zip(tokens, redacted, strict=True)) if a != b
        )
        return cls(
            r.redact_identifier(conversation_id, ID_LENGTH),
            r.redact_messages(raw),
            redact_json(metadata, r),
            redacted,
            changed,
        )

    def evidence(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Evidence with the token ids of redacted positions removed (an id is its text)."""
        if not self.positions or not doc.get("tokens"):
            return doc
        tokens = [
            {**t, "token_id": None, "redacted": True} if t["position"] in self.positions else t
            for t in doc["tokens"]
        ]
        return {**doc, "tokens": tokens}
