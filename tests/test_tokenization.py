"""Roles follow the chat template; the context policy keeps the end; bad inputs are refused."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.messages import Role
from monitor.models import LoadedModel
from monitor.tokenization import InputError, InputTokenizer

pytestmark = pytest.mark.slow

CONVERSATION = [
    {"role": "system", "content": "You answer questions about invoices."},
    {"role": "user", "content": "Is invoice 4417 paid?"},
    {"role": "assistant", "content": "Yes, it was paid on 3 March."},
]


def _text_of(tokenized: Any, role: Role) -> str:
    return "".join(t for t, r in zip(tokenized.tokens, tokenized.roles, strict=True) if r == role)


def test_each_message_tokens_carry_its_role(full_model: LoadedModel):
    tokenized = InputTokenizer(full_model.tokenizer, 512).tokenize(CONVERSATION)
    for message in CONVERSATION:
        role = Role[message["role"].upper()]
        assert _text_of(tokenized, role).strip() == message["content"]
    template = _text_of(tokenized, Role.TEMPLATE)
    assert template, "turn markers belong to the template, not to a message"
    for message in CONVERSATION:
        assert message["content"] not in template


def test_smollm_turn_markers_and_default_system_prompt_are_template(
    full_models: dict[str, LoadedModel],
):
    tok = full_models["smollm2-135m-instruct"].tokenizer
    tokenized = InputTokenizer(tok, 512).tokenize([{"role": "user", "content": "Hello"}])
    pairs = list(zip(tokenized.tokens, tokenized.roles, strict=True))
    assert pairs[0] == ("<|im_start|>", Role.TEMPLATE)
    # SmolLM2's template adds its own system prompt when none is given: not a system message
    assert "helpful AI assistant" in _text_of(tokenized, Role.TEMPLATE)
    assert _text_of(tokenized, Role.SYSTEM) == ""
    assert _text_of(tokenized, Role.USER) == "Hello"


def test_gemma_template_maps_assistant_to_model_turns(full_models: dict[str, LoadedModel]):
    tok = full_models["gemma3-270m"].tokenizer
    tokenized = InputTokenizer(tok, 512).tokenize(CONVERSATION)
    assert tokenized.ids[0] == tok.bos_token_id
    assert tokenized.roles[0] == Role.TEMPLATE
    assert "<start_of_turn>model" in _text_of(tokenized, Role.TEMPLATE)


def test_content_equal_to_template_words_is_attributed_to_its_message(full_model: LoadedModel):
    """A message whose text also occurs in the template's markers ("user") is still found."""
    messages = [
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "assistant"},
    ]
    tokenized = InputTokenizer(full_model.tokenizer, 512).tokenize(messages)
    assert _text_of(tokenized, Role.USER).strip() == "user"
    assert _text_of(tokenized, Role.ASSISTANT).strip() == "assistant"


def test_plain_text_is_user_and_special_tokens_are_template(full_model: LoadedModel):
    tokenized = InputTokenizer(full_model.tokenizer, 512).tokenize("Plain text here.")
    assert _text_of(tokenized, Role.USER) == "Plain text here."
    special = set(full_model.tokenizer.all_special_ids)
    for tid, role in zip(tokenized.ids, tokenized.roles, strict=True):
        assert (role == Role.TEMPLATE) == (tid in special)


def test_empty_text_has_no_tokens(full_model: LoadedModel):
    tokenized = InputTokenizer(full_model.tokenizer, 512).tokenize("")
    assert (tokenized.ids, tokenized.roles, tokenized.dropped) == ([], [], 0)


def test_text_over_the_limit_keeps_the_most_recent_tokens(full_model: LoadedModel):
    tok = full_model.tokenizer
    text = " ".join(f"word{i}" for i in range(400))
    whole = InputTokenizer(tok, 100_000).tokenize(text)
    cut = InputTokenizer(tok, 64).tokenize(text)
    assert len(cut.ids) == 64
    assert cut.dropped == len(whole.ids) - 64
    if tok.bos_token_id is not None and whole.ids[0] == tok.bos_token_id:
        # the BOS attention sink stays in front of the most recent tokens
        assert cut.ids == [whole.ids[0], *whole.ids[-63:]]
    else:
        assert cut.ids == whole.ids[-64:]
    assert cut.tokens[-1] == whole.tokens[-1]


def test_conversation_over_the_limit_keeps_the_response(full_model: LoadedModel):
    long_user = "Please read this. " * 200
    messages = [
        {"role": "user", "content": long_user},
        {"role": "assistant", "content": "Done reading."},
    ]
    cut = InputTokenizer(full_model.tokenizer, 48).tokenize(messages)
    assert len(cut.ids) == 48
    assert cut.dropped > 0
    assert _text_of(cut, Role.ASSISTANT).strip() == "Done reading."


@pytest.mark.parametrize("bad", [42, None, b"bytes", {"role": "user"}, 3.5])
def test_non_text_input_is_refused(full_model: LoadedModel, bad: Any):
    with pytest.raises(InputError, match="a text \\(str\\) or a list of messages"):
        InputTokenizer(full_model.tokenizer, 512).tokenize(bad)


def test_malformed_messages_are_named(full_model: LoadedModel):
    tokenizer = InputTokenizer(full_model.tokenizer, 512)
    with pytest.raises(InputError, match=r"messages\[1\]\.role"):
        tokenizer.tokenize([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(InputError, match=r"messages\[0\]\.content"):
        tokenizer.tokenize([{"role": "user"}])
    with pytest.raises(InputError, match="at least one message"):
        tokenizer.tokenize([])
