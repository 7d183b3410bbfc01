"""Guard mode's routes: ``POST /v1/chat/completions`` and ``GET /v1/models`` of the OpenAI API,
proxied to ``guard_upstream``; mounted only when that is set.

Clients use their monitor API key (role ``ingest``) as the OpenAI ``api_key``: tenant and role
come from it, and it never goes upstream (``guard_upstream_key`` does, when set). The request
body is forwarded as received; only its ``messages`` are read, to monitor them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name dependencies built inside guard_router.

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from monitor.logs import bind
from monitor.openai_format import openai_error
from monitor.service.batcher import NotRunningError
from monitor.service.guard import (
    CONVERSATION_HEADER,
    TURN_HEADER,
    Exchange,
    GuardInputError,
    content_filter_error,
    conversation_id,
    read_messages,
)
from monitor.service.guard_proxy import Guard, Read, RelayResponse, UpstreamError
from monitor.service.ingest import TurnTooLongError
from monitor.service.keys import Principal
from monitor.service.runtime import state_of
from monitor.service.schemas import AUTH_REFUSED

GUARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_REFUSED,
    400: {"description": "blocked (error.code content_filter), or the upstream's own 400"},
    413: {"description": "the request is longer than the pipeline reads"},
    422: {"description": "the guard cannot read the request's messages"},
    502: {"description": "the upstream did not answer"},
    503: {"description": "the service is stopping; a request to block-check was not forwarded"},
}


def _guard(request: Request) -> Guard:
    guard: Guard = state_of(request).guard
    return guard


def _passed_through(upstream: Any) -> Response:
    """The upstream's own answer (an error, or anything not an OpenAI completion), as it came."""
    return Response(
        upstream.content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "application/json"),
    )


def _bad_gateway(message: str) -> JSONResponse:
    return JSONResponse(openai_error(message, "upstream_unavailable"), status_code=502)


def guard_router(role: Callable[[str], Callable[..., Principal]]) -> APIRouter:
    router = APIRouter(tags=["guard"])

    @router.get("/v1/models", responses=GUARD_RESPONSES)
    async def models(
        request: Request, who: Annotated[Principal, Depends(role("ingest"))]
    ) -> Response:
        """The upstream's models, as it lists them."""
        try:
            return _passed_through(await _guard(request).models())
        except UpstreamError as exc:
            return _bad_gateway(str(exc))

    @router.post("/v1/chat/completions", responses=GUARD_RESPONSES)
    async def chat_completions(
        request: Request,
        who: Annotated[Principal, Depends(role("ingest"))],
        x_conversation_id: Annotated[
            str | None,
            Header(
                alias=CONVERSATION_HEADER,
                description="The conversation this call belongs to; default: the request's "
                "user plus a hash of its first messages.",
            ),
        ] = None,
    ) -> Response:
        """An OpenAI chat completion (streamed or not) through the guard: forwarded upstream,
        monitored as a turn (its id in ``X-Turn-Id``), blocked or aborted where a detector's
        policy says so."""
        started_ns = time.time_ns()
        guard = _guard(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
            messages = read_messages(body)
        except json.JSONDecodeError as exc:
            problem = {"loc": ["body"], "type": "json_invalid", "msg": f"not JSON: {exc}"}
            return _unreadable(GuardInputError([problem]))
        except GuardInputError as exc:
            return _unreadable(exc)
        monitored = [m.monitored() for m in messages]
        exchange = Exchange(
            tenant=who.tenant,
            conversation_id=conversation_id(x_conversation_id, body, monitored),
            messages=monitored,
            policies=guard.config.policies_for(who.tenant),
            turn_id=str(uuid.uuid4()),
            pipeline=guard.config.pipeline,
            request_model=body.get("model") if isinstance(body.get("model"), str) else None,
            unread_parts=sum(m.unread_parts for m in messages),
        )
        bind(turn_id=exchange.turn_id)
        ids = {TURN_HEADER: exchange.turn_id}
        if exchange.scores("block"):
            try:
                asked = await guard.score(exchange.turn(answer=False))
            except TurnTooLongError as exc:
                return JSONResponse(openai_error(str(exc), "context_length_exceeded"), 413)
            except NotRunningError as exc:  # shutting down: not forwarded unscored
                error = openai_error(f"{exc}; retry", "service_unavailable", type="server_error")
                return JSONResponse(error, 503, headers=ids)
            decision = exchange.decide("block", asked.scored.verdicts)
            if decision is not None:
                exchange.outcome = "blocked"
                await guard.record(exchange, asked, started_ns)
                error = content_filter_error(decision, exchange.turn_id)
                return JSONResponse(error, status_code=400, headers=ids)
            exchange.decide("steer", asked.scored.verdicts)
        raw = _steered(raw, body, exchange, guard.config.steer_clamps, guard.config.steer_on_prompt)
        try:
            if body.get("stream") is True:
                upstream = await guard.open_stream(raw)
                if upstream.status_code != 200:
                    await upstream.aread()
                    await upstream.aclose()
                    return _passed_through(upstream)
                headers = {**ids, "Cache-Control": "no-cache"}
                return RelayResponse(guard, exchange, upstream, started_ns, headers)
            upstream = await guard.complete(raw)
        except UpstreamError as exc:
            return _bad_gateway(str(exc))
        try:
            completion = upstream.json()
        except ValueError:
            completion = None
        if upstream.status_code != 200:
            return _passed_through(upstream)
        if not isinstance(completion, dict):  # a 200 the guard cannot read is not sent on
            return _bad_gateway(f"the upstream {guard.upstream} answered 200 with no completion")
        exchange.observe_completion(completion)
        read: Read | None = None
        if exchange.scores("abort"):
            read = await guard.score_or_none(exchange.turn())
            if read is not None and exchange.decide("abort", read.scored.verdicts):
                _withhold(completion, exchange)
        await guard.record(exchange, read, started_ns)
        return JSONResponse(completion, headers=ids)

    return router


def _steered(
    raw: bytes,
    body: dict[str, Any],
    exchange: Exchange,
    clamps: dict[str, dict[str, str]],
    on_prompt: bool,
) -> bytes:
    """The body to forward: as received, or, where steer policies fired, with their clamps as
    its ``steering`` field (the only case in which the guard changes a request)."""
    fired = [d.detector for d in exchange.decisions if d.action == "steer"]
    if not fired:
        if "steering" not in body:
            return raw
        # Steering is the guard's to decide: a client's own steering field does not go on.
        return json.dumps({k: v for k, v in body.items() if k != "steering"}).encode()
    merged: dict[str, str] = {}
    for detector in fired:
        merged.update(clamps[detector])
    steering = {"clamp": merged, "on_prompt": on_prompt}
    return json.dumps({**body, "steering": steering}).encode()


def _withhold(completion: dict[str, Any], exchange: Exchange) -> None:
    """A whole answer an abort policy stopped: its content is not sent (it is recorded, for
    the audit, with the outcome ``aborted``)."""
    exchange.outcome = "aborted"
    exchange.finish_reasons = ["content_filter"]
    for choice in completion.get("choices") or []:
        if isinstance(choice, dict):
            choice["finish_reason"] = "content_filter"
            if isinstance(choice.get("message"), dict):
                choice["message"]["content"] = None
                choice["message"].pop("tool_calls", None)


def _unreadable(exc: GuardInputError) -> JSONResponse:
    """422 in this service's form (``detail``) and the OpenAI one (``error``) at once."""
    body = {"detail": exc.errors, **openai_error(str(exc), "invalid_messages", param="messages")}
    return JSONResponse(body, status_code=422)
