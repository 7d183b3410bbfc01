"""Guard mode's proxy: requests to the upstream (httpx, streamed), the answer relayed chunk by
chunk as it arrives, scored on the way where an abort policy asks, and every exchange recorded
through the one ingest path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from monitor.openai_format import openai_error
from monitor.service.guard import Exchange
from monitor.service.guard_metrics import GuardMetrics
from monitor.service.guard_sse import chunk_of, content_filter_end, events
from monitor.service.ingest import Ingest, Ingested, Scored, TurnRequest, TurnTooLongError
from monitor.service.settings import ServiceSettings
from monitor.service.telemetry import GuardTelemetry, provider_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Read:
    """A turn as scored (its first messages dropped when it was too long), and the scoring."""

    turn: TurnRequest
    scored: Scored


class UpstreamError(Exception):
    """The upstream could not be reached or broke off: 502, nothing recorded as an answer."""


class Guard:
    """What the proxy routes share: the upstream client, telemetry and the guard's metrics."""

    def __init__(
        self,
        settings: ServiceSettings,
        ingest: Ingest,
        tracer_provider: object | None = None,
    ) -> None:
        assert settings.guard_upstream, "the guard runs only with an upstream"
        self.settings = settings
        self.config = settings.guard
        self.upstream = settings.guard_upstream
        self.ingest = ingest
        headers = {}
        if settings.guard_upstream_key is not None:
            headers["Authorization"] = f"Bearer {settings.guard_upstream_key.get_secret_value()}"
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.config.timeout_s, connect=10.0)
        )
        provider = tracer_provider or provider_from(self.config.otel)
        self.telemetry = GuardTelemetry(provider)  # type: ignore[arg-type]
        self.metrics = GuardMetrics(ingest.metrics.registry)

    async def aclose(self) -> None:
        await self.client.aclose()

    def url(self, path: str) -> str:
        return f"{self.upstream}/{path}"

    async def _send(
        self, method: str, path: str, raw: bytes | None = None, stream: bool = False
    ) -> httpx.Response:
        """One upstream call (``stream``: its status read, its body not yet); UpstreamError,
        counted, when the upstream does not answer."""
        headers = _JSON if raw is not None else None
        request = self.client.build_request(method, self.url(path), content=raw, headers=headers)
        try:
            return await self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.inc()
            raise UpstreamError(_unreachable(self.upstream, exc)) from None

    async def open_stream(self, raw: bytes) -> httpx.Response:
        return await self._send("POST", "chat/completions", raw, stream=True)

    async def complete(self, raw: bytes) -> httpx.Response:
        return await self._send("POST", "chat/completions", raw)

    async def models(self) -> httpx.Response:
        return await self._send("GET", "models")

    async def score(self, turn: TurnRequest) -> Read:
        """The turn scored; when longer than the pipeline reads, its latest messages that fit
        (a guard scores what it can rather than refuse an exchange already under way)."""
        for start in range(len(turn.messages)):
            read = _from(turn, start)
            try:
                return Read(read, await self.ingest.score(read))
            except TurnTooLongError:
                if start == len(turn.messages) - 1:
                    raise
        raise AssertionError("a turn has messages")

    async def record(self, exchange: Exchange, last: Read | None, started_ns: int) -> None:
        """Store the exchange (re-using ``last`` when it read this very answer), count it and
        close its span. A failure is logged and counted: the client has its answer."""
        turn = exchange.turn()
        verdicts = []
        try:
            if last is None or last.turn.messages != turn.messages[-len(last.turn.messages) :]:
                last = await self.score(turn)
            dropped = len(turn.messages) - len(last.turn.messages)
            done: Ingested = await self.ingest.record_scored(_from(turn, dropped), last.scored)
            verdicts = done.verdicts
        except Exception:
            self.metrics.unrecorded.inc()
            log.exception("guard: turn %s could not be recorded", exchange.turn_id)
        self.metrics.exchanges.labels(exchange.outcome).inc()
        for d in exchange.decisions:
            self.metrics.actions.labels(d.action, d.detector, str(d.shadow).lower()).inc()
        self.telemetry.record(exchange, verdicts, started_ns)

    async def score_or_none(self, turn: TurnRequest) -> Read | None:
        """``score``, or None when scoring fails (logged and counted): the guard then lets the
        answer through unscored rather than break a stream the client is reading."""
        try:
            return await self.score(turn)
        except Exception:
            self.metrics.scoring_failures.inc()
            log.exception("guard: turn %s could not be scored; passed unscored", turn.turn_id)
            return None

    async def abandon(self, exchange: Exchange, response: httpx.Response, started_ns: int) -> None:
        """A stream whose client left before the relay began: the upstream request closed, the
        exchange recorded as disconnected."""
        await response.aclose()
        exchange.outcome = "disconnected"
        await self.record(exchange, None, started_ns)

    async def relay(
        self, exchange: Exchange, response: httpx.Response, started_ns: int
    ) -> AsyncIterator[bytes]:
        """The upstream's stream, forwarded event by event; scored every ``abort_every_tokens``
        when an abort or shadow policy applies, and once more before the finish; recorded
        however it ends (a client that goes away included). A scoring still running when the
        next window is due is awaited: an abort comes at most one window after the scoring
        that fires started, so at most two windows after the text that made it fire."""
        exchange.relaying = True
        scoring = exchange.scores("abort")
        every = self.config.abort_every_tokens
        pending: asyncio.Task[Read | None] | None = None
        last: Read | None = None
        scored_at = 0
        ended = final = False
        try:
            async for event in events(response):
                chunk = chunk_of(event)
                if chunk is None:  # no chunk (a comment, [DONE]): forwarded as received
                    yield event
                    ended = ended or b"data: [DONE]" in event
                    continue
                before = len(exchange.answer)
                exchange.observe_chunk(chunk)
                if scoring:
                    finishing = bool(exchange.finish_reasons) and not final
                    due = exchange.tokens - scored_at >= every and not final
                    if pending is not None and (pending.done() or due or finishing):
                        read, pending = await pending, None
                        last = read or last
                        if read is not None and exchange.decide("abort", read.scored.verdicts):
                            yield content_filter_end(exchange, before)
                            ended = True
                            return
                    if finishing:  # the whole answer, scored once before the client sees its end
                        final = True
                        read = await self.score_or_none(exchange.turn())
                        last = read or last
                        if read is not None and exchange.decide("abort", read.scored.verdicts):
                            yield content_filter_end(exchange, before)
                            ended = True
                            return
                    elif due:
                        scored_at = exchange.tokens
                        pending = asyncio.create_task(self.score_or_none(exchange.turn()))
                yield event
            ended = True
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.inc()
            log.warning("guard: the upstream broke off turn %s: %s", exchange.turn_id, exc)
            exchange.outcome = "upstream_failed"
            ended = True
            message = _unreachable(self.upstream, exc).replace("did not answer", "broke off")
            error = openai_error(message, "upstream_unavailable")
            yield f"data: {json.dumps(error)}\n\n".encode()  # the SDKs raise on it
        finally:
            # Shielded: after a client disconnect every await here would be cancelled again.
            with anyio.CancelScope(shield=True):
                if pending is not None:
                    pending.cancel()
                await response.aclose()
                if not ended:
                    exchange.outcome = "disconnected"
                await self.record(exchange, last, started_ns)


class RelayResponse(StreamingResponse):
    """The relay as a response that always ends the exchange: a client that leaves before the
    relay has begun (Starlette then never starts it) still closes the upstream request and
    leaves a recorded turn, and a relay left suspended at a send is closed, not left to the
    garbage collector."""

    def __init__(
        self,
        guard: Guard,
        exchange: Exchange,
        response: httpx.Response,
        started_ns: int,
        headers: dict[str, str],
    ) -> None:
        self._relay = guard.relay(exchange, response, started_ns)
        self._ending = (guard, exchange, response, started_ns)
        media = response.headers.get("content-type", "text/event-stream")
        super().__init__(self._relay, media_type=media, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._relay.aclose()  # type: ignore[attr-defined]
                guard, exchange, response, started_ns = self._ending
                if not exchange.relaying:
                    await guard.abandon(exchange, response, started_ns)


_JSON = {"Content-Type": "application/json"}


def _unreachable(upstream: str, exc: httpx.HTTPError) -> str:
    return f"the upstream {upstream} did not answer: {type(exc).__name__}: {exc}".rstrip(": ")


def _from(turn: TurnRequest, start: int) -> TurnRequest:
    """The turn without its first ``start`` messages (noted in the metadata)."""
    if start <= 0:
        return turn
    meta = {**turn.metadata, "guard_dropped_messages": start}
    return dataclasses.replace(turn, messages=turn.messages[start:], metadata=meta)
