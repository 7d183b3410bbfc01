"""``safety-monitor serve-model``: an OpenAI-compatible server for a built-in model (demos, a
steering backend, an upstream for the guard proxy).

``POST /v1/chat/completions`` (streamed or not) and ``GET /v1/models``. Fields of the OpenAI API
this server does not use (``top_p``, ``user``, ``logit_bias``, ``stop``, ...) are accepted and
ignored. Unlike OpenAI's, ``temperature`` defaults to 0: greedy decoding, the same answer every
time; above 0 the model samples (``seed``, default 0, makes that repeatable). One extra field,
``steering``, clamps SAE features while the answer is generated (see ``monitor.steering``)::

    "steering": {"clamp": {"6168": "0", "1727": "2x", "42": 3.5}, "on_prompt": false}

Each key is a feature index, each value ``VALUE`` of ``FEATURE=VALUE``. A request's steering
replaces the server's defaults (``serve-model --clamp``; ``{"clamp": {}}`` turns them off); a
request without it gets them. The answer lists the clamps applied under ``steering.clamp`` (in
the first chunk when streamed). One generation runs at a time; others wait their turn.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from monitor.generation import Generated, Generator
from monitor.messages import Message
from monitor.openai_format import openai_error
from monitor.steering import Clamp, Steerer, SteeringError, parse_clamp

log = logging.getLogger(__name__)

MAX_TOKENS = 2048
DEFAULT_TOKENS = 128
OWNER = "safety-monitor"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A request message: ``developer`` is read as ``system``; content parts are text only."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (an assistant's may lack it)")
        return self

    def message(self) -> Message:
        content = self.content or ""
        text = content if isinstance(content, str) else "\n".join(p.text for p in content)
        return Message(role="system" if self.role == "developer" else self.role, content=text)


class SteeringIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clamp: dict[str, StrictStr | StrictInt | StrictFloat] = Field(
        default_factory=dict,
        description='Feature index → VALUE of FEATURE=VALUE: "0", 4.5, "2x" (atlas multiple).',
    )
    on_prompt: bool = Field(False, description="Clamp on the prompt's positions too.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description=f"Default {DEFAULT_TOKENS}; wins over max_tokens."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0: greedy.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Default 0.")
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    steering: SteeringIn | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_TOKENS


def _invalid(loc: list[str], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": "value_error"}])


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    """422 in FastAPI's form (``detail``) and the OpenAI one (``error``, its first problem)."""
    assert isinstance(exc, RequestValidationError)
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    body: dict[str, Any] = {"detail": detail}
    if detail:
        loc, msg = detail[0]["loc"], detail[0]["msg"]
        where = [] if detail[0]["type"] == "json_invalid" else [str(p) for p in loc[1:]]
        param = ".".join(where) or None
        body |= openai_error(f"{param}: {msg}" if param else msg, "invalid_value", param)
    return JSONResponse(body, status_code=422)


def _sse(doc: dict[str, Any] | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


def create_model_app(gen: Generator, defaults: list[Clamp], steering: bool = True) -> FastAPI:
    """The OpenAI-compatible routes for ``gen``: requests steer with their ``steering`` field
    (422 when ``steering`` is off) and get ``defaults`` without one."""
    if defaults and not steering:
        raise ValueError("default clamps on a server that refuses steering")
    gen.steerer(defaults)  # SteeringError now rather than on every request
    app = FastAPI(title=f"safety-monitor model server: {gen.name}", description=__doc__)
    app.add_exception_handler(RequestValidationError, _unprocessable)
    started = int(time.time())
    context = getattr(getattr(gen.model, "config", None), "max_position_embeddings", None)

    def steer(body: ChatRequest) -> tuple[Steerer | None, list[Clamp]]:
        if body.steering is None:
            return gen.steerer(defaults), defaults
        if not steering:
            raise _invalid(
                ["body", "steering"],
                "steering is disabled on this server (serve-model --no-steering)",
            )
        clamps = []
        for key, value in body.steering.clamp.items():
            try:
                clamp = parse_clamp(f"{key}={value}")
                gen.steerer([clamp])  # this one alone: an unknown feature, no atlas, no SAE
            except SteeringError as exc:
                raise _invalid(["body", "steering", "clamp", key], str(exc)) from None
            clamps.append(clamp)
        try:
            return gen.steerer(clamps, prompt=body.steering.on_prompt), clamps
        except SteeringError as exc:  # together: one feature twice
            raise _invalid(["body", "steering", "clamp"], str(exc)) from None

    def prompt_tokens(messages: list[Message]) -> int:
        try:
            return int(gen.prompt_ids(messages).shape[1])
        except TemplateError as exc:
            raise _invalid(["body", "messages"], f"the chat template refused them: {exc}") from None

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model served."""
        model = {"id": gen.name, "object": "model", "created": started, "owned_by": OWNER}
        return {"object": "list", "data": [model]}

    @app.post(
        "/v1/chat/completions",
        responses={
            400: {"description": "the prompt and max_tokens exceed the model's context"},
            404: {"description": "not this server's model (error.code model_not_found)"},
        },
    )
    async def chat_completions(body: ChatRequest) -> Response:
        """A chat completion (``stream``: as server-sent events), steered as the request's
        ``steering`` or the server's defaults say."""
        if body.model != gen.name:
            message = f"The model {body.model!r} does not exist; this server has {gen.name!r}"
            return JSONResponse(openai_error(message, "model_not_found", "model"), status_code=404)
        steerer, clamps = steer(body)
        messages = [m.message() for m in body.messages]
        new_tokens = body.new_tokens()
        used = await run_in_threadpool(prompt_tokens, messages)
        if context is not None and used + new_tokens > context:
            message = f"{used} prompt tokens + {new_tokens} new exceed {gen.name}'s {context}"
            return JSONResponse(openai_error(message, "context_length_exceeded", "messages"), 400)
        kw: dict[str, Any] = {
            "max_new_tokens": new_tokens,
            "seed": body.seed or 0,
            "temperature": body.temperature or 0.0,
            "steerer": steerer,
        }
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": gen.name,
        }
        echo = {"clamp": [str(c) for c in clamps]}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _events(gen, messages, kw, head, echo, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        out: Generated = await run_in_threadpool(lambda: gen.generate(messages, **kw))
        answer = {"role": "assistant", "content": out.text}
        choice = {"index": 0, "message": answer, "finish_reason": out.finish_reason}
        completion = {**head, "object": "chat.completion", "choices": [choice]}
        return JSONResponse({**completion, "usage": _usage(out), "steering": echo})

    return app


def _usage(out: Generated) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.new_tokens,
        "total_tokens": out.prompt_tokens + out.new_tokens,
    }


async def _events(
    gen: Generator,
    messages: list[Message],
    kw: dict[str, Any],
    head: dict[str, Any],
    echo: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    """The answer as chunks: the role (with the steering applied), the text as it comes, the
    finish reason, the usage when asked, ``[DONE]``. A client gone stops the generation."""
    stop = threading.Event()
    done: list[Generated] = []
    pieces = gen.stream(messages, stop=stop, done=done, **kw)
    chunk = {**head, "object": "chat.completion.chunk"}

    def delta(content: dict[str, str], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": content, "finish_reason": finish}
        return _sse({**chunk, "choices": [choice], **extra})

    ended = False  # the text has all come, or the generation failed
    sent = 0
    try:
        yield delta({"role": "assistant", "content": ""}, steering=echo)
        async for piece in iterate_in_threadpool(pieces):
            if piece:
                sent += 1
                yield delta({"content": piece})
        ended = True
    except Exception:
        ended = True
        log.exception("%s: the generation failed", head["id"])
        yield _sse(openai_error("the generation failed", None, type="server_error"))
        return
    finally:
        if not ended:  # cancelled: the client is gone
            stop.set()
            log.info("%s: the client left after %d chunks; generation stopped", head["id"], sent)
    out = done[0]
    yield delta({}, out.finish_reason)
    if include_usage:
        yield _sse({**chunk, "choices": [], "usage": _usage(out)})
    yield _sse("[DONE]")
