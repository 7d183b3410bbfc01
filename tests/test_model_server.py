"""The built-in model server (``serve-model``) through the official OpenAI SDK: the real
SmolLM2 with its shipped SAE under uvicorn, answers streamed and not, steered by the request or
the server's defaults, its refusals naming the field."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from monitor.config import Settings
from monitor.generation import Generated, Generator
from monitor.localservices import ThreadedServer
from monitor.messages import Message
from monitor.model_server import create_model_app
from monitor.steering import parse_clamp

pytestmark = pytest.mark.slow

ASK: list[Any] = [{"role": "user", "content": "Say hello."}]
TOKENS = 12


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator.from_settings(Settings())


@pytest.fixture(scope="module")
def urls(generator: Generator) -> Iterator[dict[str, str]]:
    """Three servers of the one model: plain, with a default clamp, refusing steering."""
    apps = {
        "plain": create_model_app(generator, []),
        "defaults": create_model_app(generator, [parse_clamp("6168=2x")]),
        "fixed": create_model_app(generator, [], steering=False),
    }
    servers = {name: ThreadedServer(app).start() for name, app in apps.items()}
    yield {name: s.url for name, s in servers.items()}
    for s in servers.values():
        s.stop()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(urls: dict[str, str]) -> openai.OpenAI:
    return sdk(urls["plain"])


def ask(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=kw.pop("messages", ASK), max_tokens=kw.pop("max_tokens", TOKENS), **kw
    )


def test_models_lists_the_one_model(client: openai.OpenAI, generator: Generator) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [generator.name] == ["smollm2-135m-instruct"]
    assert models[0].owned_by == "safety-monitor" and models[0].created > 0


def test_an_answer_streamed_is_the_answer_whole(
    client: openai.OpenAI, generator: Generator
) -> None:
    whole = ask(client, generator.name)
    text = whole.choices[0].message.content
    assert text and text.strip()
    assert whole.id.startswith("chatcmpl-") and whole.model == generator.name
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.choices[0].message.role == "assistant"
    usage = whole.usage
    assert usage is not None and usage.prompt_tokens > 5
    assert 0 < usage.completion_tokens <= TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert whole.model_extra["steering"] == {"clamp": []}

    chunks = list(ask(client, generator.name, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["steering"] == {"clamp": []}
    *answer, last, tally = chunks
    assert "".join(c.choices[0].delta.content or "" for c in answer) == text
    assert len(answer) > 2  # the text came in pieces
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in answer)
    assert tally.choices == [] and tally.usage == usage

    # Without include_usage: no usage chunk; the raw events end with [DONE].
    body = {"model": generator.name, "messages": ASK, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{client.base_url}chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    docs = [json.loads(e[6:]) for e in events[:-1]]
    assert docs[-1]["choices"][0]["finish_reason"] == "length"
    assert all(d["choices"] and "usage" not in d for d in docs)


def test_roles_and_content_parts_read_as_openai_means_them(
    client: openai.OpenAI, generator: Generator
) -> None:
    plain = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Say hello.\nThen stop."},
    ]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You answer in French."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Say hello."},
                {"type": "text", "text": "Then stop."},
            ],
        },
    ]
    a = ask(client, generator.name, messages=plain, max_tokens=8)
    b = ask(client, generator.name, messages=parts, max_tokens=8, top_p=0.5, user="u1")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    read = [Message(role=m["role"], content=m["content"]) for m in plain]
    assert a.usage.prompt_tokens == generator.prompt_ids(read).shape[1]


def test_a_clamp_changes_the_answer_and_is_echoed(
    client: openai.OpenAI, generator: Generator
) -> None:
    plain = ask(client, generator.name).choices[0].message.content
    steered = ask(client, generator.name, extra_body={"steering": {"clamp": {"6168": "2x"}}})
    assert steered.choices[0].message.content != plain
    assert steered.model_extra["steering"] == {"clamp": ["6168=2x"]}
    # Numbers too, and on the prompt: the same grammar as --clamp.
    numbers = {"clamp": {"6168": 0, "42": 3.5, "7": "1e-3"}, "on_prompt": True}
    echoed = ask(client, generator.name, max_tokens=2, extra_body={"steering": numbers})
    assert echoed.model_extra["steering"] == {"clamp": ["6168=0", "42=3.5", "7=0.001"]}


def test_server_defaults_apply_unless_the_request_steers(
    client: openai.OpenAI, urls: dict[str, str], generator: Generator
) -> None:
    plain = ask(client, generator.name).choices[0].message.content
    steered = ask(client, generator.name, extra_body={"steering": {"clamp": {"6168": "2x"}}})
    defaults = sdk(urls["defaults"])
    by_default = ask(defaults, generator.name)
    assert by_default.choices[0].message.content == steered.choices[0].message.content != plain
    assert by_default.model_extra["steering"] == {"clamp": ["6168=2x"]}
    streamed = list(ask(defaults, generator.name, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        by_default.choices[0].message.content
    )
    off = ask(defaults, generator.name, extra_body={"steering": {"clamp": {}}})
    assert off.choices[0].message.content == plain
    assert off.model_extra["steering"] == {"clamp": []}


def refused(client: openai.OpenAI, model: str, **kw: Any) -> dict[str, Any]:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        ask(client, model, **kw)
    body: dict[str, Any] = info.value.response.json()
    assert body["error"]["type"] == "invalid_request_error"
    return body


@pytest.mark.parametrize(
    ("steering", "loc", "says"),
    [
        ({"clamp": {"6168": "abc"}}, ["body", "steering", "clamp", "6168"], "FEATURE=VALUE"),
        ({"clamp": {"x1": 2}}, ["body", "steering", "clamp", "x1"], "FEATURE=VALUE"),
        ({"clamp": {"99999": "1"}}, ["body", "steering", "clamp", "99999"], "unknown feature"),
        ({"clamp": {"6168": "1", "06168": "2"}}, ["body", "steering", "clamp"], "twice"),
        ({"clamp": {"6168": True}}, ["body", "steering", "clamp", "6168"], "valid"),
        ({"clamps": {"6168": "1"}}, ["body", "steering", "clamps"], "Extra inputs"),
    ],
)
def test_bad_clamps_are_refused_naming_the_clamp(
    client: openai.OpenAI, generator: Generator, steering: Any, loc: list[str], says: str
) -> None:
    body = refused(client, generator.name, extra_body={"steering": steering})
    assert body["detail"][0]["loc"][: len(loc)] == loc
    assert says in body["detail"][0]["msg"] and says in body["error"]["message"]
    assert body["error"]["param"].startswith(".".join(loc[1:]))


def test_other_refusals_name_the_field(
    client: openai.OpenAI, urls: dict[str, str], generator: Generator
) -> None:
    name = generator.name
    fixed = refused(sdk(urls["fixed"]), name, extra_body={"steering": {"clamp": {"6168": "0"}}})
    assert fixed["detail"][0]["loc"] == ["body", "steering"]
    assert "steering is disabled on this server" in fixed["detail"][0]["msg"]
    assert ask(sdk(urls["fixed"]), name, max_tokens=1).model_extra["steering"] == {"clamp": []}
    n = refused(client, name, n=2)
    assert n["detail"][0]["loc"] == ["body", "n"] and "only n=1" in n["detail"][0]["msg"]
    assert n["error"]["param"] == "n"
    for kw, loc in [
        ({"max_tokens": 0}, ["body", "max_tokens"]),
        ({"max_completion_tokens": 4096}, ["body", "max_completion_tokens"]),
        ({"temperature": 3}, ["body", "temperature"]),
        ({"messages": []}, ["body", "messages"]),
        ({"messages": [{"role": "robot", "content": "hi"}]}, ["body", "messages", 0, "role"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            ["body", "messages", 0, "content"],
        ),
        ({"messages": [{"role": "user"}]}, ["body", "messages", 0]),
    ]:
        detail = refused(client, name, **kw)["detail"]
        assert detail[0]["loc"][: len(loc)] == loc, (kw, detail)
    raw = httpx.post(
        f"{client.base_url}chat/completions",
        content=b'{"model": "x",',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 422 and raw.json()["detail"][0]["type"] == "json_invalid"


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "gpt-4o")
    error = info.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "smollm2-135m-instruct" in error["message"]


def test_stopping_a_stream_ends_the_generation(generator: Generator) -> None:
    ask_long = [Message(role="user", content="Write a long story about a dragon.")]
    stop = threading.Event()
    done: list[Generated] = []
    pieces = generator.stream(ask_long, max_new_tokens=200, stop=stop, done=done)
    first = next(pieces)
    stop.set()
    text = first + "".join(pieces)
    assert len(done) == 1 and done[0].new_tokens < 12 and done[0].text == text
    # Closing it early stops it too, and frees the model.
    closed = threading.Event()
    pieces = generator.stream(ask_long, max_new_tokens=200, stop=closed)
    next(pieces)
    pieces.close()
    assert closed.is_set()
    assert generator.lock.acquire(timeout=30)
    generator.lock.release()


def test_a_client_leaving_mid_stream_stops_the_generation(
    client: openai.OpenAI, generator: Generator, caplog: pytest.LogCaptureFixture
) -> None:
    """Greedy, this story never ends (it repeats itself to max_tokens: minutes on a CPU); the
    client leaving after its first words frees the model at once."""
    caplog.set_level(logging.INFO, logger="monitor.model_server")
    body = {
        "model": generator.name,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 2048,
        "stream": True,
    }
    with httpx.stream("POST", f"{client.base_url}chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert '"role": "assistant"' in next(lines)
        assert '"content"' in next(line for line in lines if line)
    deadline = time.monotonic() + 30
    while "the client left" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "the client left after" in caplog.text
    assert generator.lock.acquire(timeout=20)
    generator.lock.release()
    assert ask(client, generator.name, max_tokens=2).usage.completion_tokens == 2
