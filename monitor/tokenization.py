"""Turn a text or a conversation into token ids, each with the role it belongs to.

Conversations go through the model's chat template. Roles come from character offsets: a token
that overlaps a message's content carries that message's role; template structure between
messages (turn markers, a default system prompt the template adds) is marked ``TEMPLATE``.

Context policy: an input longer than ``max_tokens`` (the pipeline's ``max_input_tokens``; the
pipeline reads what is kept in windows of its own) keeps its most recent tokens (the end of the
conversation, where the response is); a leading BOS token is kept as well, because models treat it
as an attention sink and their activations shift without it. The number of tokens cut is
reported with the result, never silently dropped; the service refuses such an input instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import ValidationError

from monitor.messages import Message, Role

log = logging.getLogger(__name__)

# For models that ship no chat template: plain labelled turns, readable by any tokenizer.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
)


class InputError(ValueError):
    """An input the pipeline cannot take, with what was wrong."""


@dataclass(frozen=True)
class TokenizedInput:
    """Token ids of one input after the context policy, with their roles and display strings."""

    ids: list[int]
    roles: list[Role]
    tokens: list[str]
    dropped: int  # tokens cut from the front by the context policy

    def __len__(self) -> int:
        return len(self.ids)


Conversation = Sequence[Message | Mapping[str, Any]]
PipelineInput = str | Conversation


class InputTokenizer:
    """Tokenizes texts and conversations for one model under one context limit."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        if max_tokens < 2:
            raise ValueError("max_tokens must be at least 2")
        self._tok = tokenizer
        self.max_tokens = max_tokens
        self._special = set(tokenizer.all_special_ids)
        if not tokenizer.chat_template:
            log.warning("model has no chat template; using a plain 'Role: content' layout")

    def tokenize(self, item: PipelineInput) -> TokenizedInput:
        """Tokenize a text (marked user) or a list of messages (through the chat template)."""
        if isinstance(item, str):
            return self._tokenize_text(item)
        if isinstance(item, Sequence) and not isinstance(item, bytes | bytearray):
            return self._tokenize_conversation(parse_messages(cast(Conversation, item)))
        raise InputError(
            f"an input must be a text (str) or a list of messages, not {type(item).__name__}"
        )

    def _tokenize_text(self, text: str) -> TokenizedInput:
        if not text:
            return TokenizedInput([], [], [], 0)
        enc = self._tok(text, add_special_tokens=True, return_offsets_mapping=True)
        roles = [Role.TEMPLATE if i in self._special else Role.USER for i in enc["input_ids"]]
        return self._finish(text, enc["input_ids"], enc["offset_mapping"], roles)

    def _tokenize_conversation(self, messages: list[Message]) -> TokenizedInput:
        rendered, spans = self._render(messages)
        enc = self._tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        roles = _roles_from_offsets(enc["offset_mapping"], spans)
        return self._finish(rendered, enc["input_ids"], enc["offset_mapping"], roles)

    def _render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int, Role]]]:
        """Render the chat template and locate each message's content in the result.

        Each content is first rendered as a unique sentinel, so a content that also appears in
        the template's own text ("user", "assistant") cannot be mistaken for it. Templates that
        rewrite content (trimming, say) fall back to an in-order search.
        """
        template = self._tok.chat_template or FALLBACK_CHAT_TEMPLATE
        rendered = self._apply(template, messages)
        sentinels = [f"\x00{i}\x00" for i in range(len(messages))]
        skeleton = self._apply(
            template,
            [Message(role=m.role, content=s) for m, s in zip(messages, sentinels, strict=True)],
        )
        parts = skeleton.split("\x00")
        # a faithful template leaves: text, index, text, index, ..., text
        if len(parts) == 2 * len(messages) + 1:
            out, spans = [], []
            for k, piece in enumerate(parts):
                if k % 2 == 0:
                    out.append(piece)
                    continue
                message = messages[int(piece)]
                start = sum(len(x) for x in out)
                out.append(message.content)
                if message.content:
                    spans.append((start, start + len(message.content), message.token_role))
            if "".join(out) == rendered:
                return rendered, spans
        return rendered, _content_spans(rendered, messages)

    def _apply(self, template: str, messages: list[Message]) -> str:
        text = self._tok.apply_chat_template(
            [m.model_dump() for m in messages], chat_template=template, tokenize=False
        )
        assert isinstance(text, str)
        return text

    def _finish(
        self,
        source: str,
        ids: list[int],
        offsets: list[tuple[int, int]],
        roles: list[Role],
    ) -> TokenizedInput:
        keep = list(range(len(ids)))
        dropped = 0
        if len(ids) > self.max_tokens:
            bos = self._tok.bos_token_id
            head = [0] if bos is not None and ids[0] == bos else []
            tail = keep[len(ids) - (self.max_tokens - len(head)) :]
            dropped = len(ids) - len(head) - len(tail)
            keep = head + tail
        pieces = self._tok.convert_ids_to_tokens([ids[i] for i in keep])
        tokens = [
            source[offsets[i][0] : offsets[i][1]] if offsets[i][1] > offsets[i][0] else piece
            for i, piece in zip(keep, pieces, strict=True)
        ]
        return TokenizedInput([ids[i] for i in keep], [roles[i] for i in keep], tokens, dropped)


def parse_messages(items: Conversation) -> list[Message]:
    """Validate a list of messages; InputError names the message and field that is wrong."""
    if len(items) == 0:
        raise InputError("a conversation needs at least one message")
    messages = []
    for i, item in enumerate(items):
        if isinstance(item, Message):
            messages.append(item)
            continue
        try:
            messages.append(Message.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"messages[{i}].{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InputError(problems) from exc
    return messages


def _content_spans(rendered: str, messages: list[Message]) -> list[tuple[int, int, Role]]:
    """Character span of each message's content inside the rendered template, in order."""
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if not message.content.strip():
            continue  # nothing of it to find; its turn markers stay TEMPLATE
        for needle in _renderings(message.content):
            start = rendered.find(needle, cursor)
            if start >= 0:
                break
        else:
            raise InputError(
                f"the model's chat template rewrote messages[{i}]'s content, so its tokens "
                "cannot be attributed to a role"
            )
        cursor = start + len(needle)
        spans.append((start, cursor, message.token_role))
    return spans


def _renderings(content: str) -> tuple[str, ...]:
    """How chat templates put a content into their text: as it is, trimmed, or as the body of a
    JSON string (``| tojson``, transformers' filter: no ASCII or HTML escaping; Llama 3's
    template renders tool results so)."""
    as_json = json.dumps(content, ensure_ascii=False)[1:-1]
    trimmed_json = json.dumps(content.strip(), ensure_ascii=False)[1:-1]
    return content, content.strip(), as_json, trimmed_json


def _roles_from_offsets(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int, Role]]
) -> list[Role]:
    roles = []
    j = 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        role = Role.TEMPLATE
        if j < len(spans):
            s_start, s_end, s_role = spans[j]
            if start < s_end and end > s_start:
                role = s_role
        roles.append(role)
    return roles
