"""Guard mode's proxy: requests to the upstream (httpx, streamed), the answer relayed chunk by
chunk as it arrives, scored on the way where an abort policy asks, and every exchange recorded
through the one ingest path.

The relay reads the upstream's server-sent events line by line (httpx's ``aiter_lines``) and
forwards each event as received; only ``data:`` lines are parsed, to follow the answer. It is
written here rather than with an SSE library because the bytes must go on unchanged and a
parser that re-serialises events would not guarantee that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from prometheus_client import Counter

from monitor.service.guard import Exchange
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
        registry = ingest.metrics.registry
        self.exchanges = Counter(
            "safety_monitor_guard_exchanges_total",
            "Proxied chat completions, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.actions = Counter(
            "safety_monitor_guard_actions_total",
            "Guard decisions: block or abort, done or (shadow) only recorded.",
            ["action", "detector", "shadow"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "safety_monitor_guard_upstream_errors_total",
            "Upstream calls that failed (unreachable, broken off).",
            registry=registry,
        )
        self.unrecorded = Counter(
            "safety_monitor_guard_unrecorded_total",
            "Proxied exchanges that could not be recorded (the database refused or was down).",
            registry=registry,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def url(self, path: str) -> str:
        return f"{self.upstream}/{path}"

    async def open_stream(self, raw: bytes) -> httpx.Response:
        """The upstream's streamed response (its status read, its body not yet)."""
        request = self.client.build_request(
            "POST", self.url("chat/completions"), content=raw, headers=_JSON
        )
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self.upstream_errors.inc()
            raise UpstreamError(_unreachable(self.upstream, exc)) from None

    async def complete(self, raw: bytes) -> httpx.Response:
        try:
            return await self.client.post(self.url("chat/completions"), content=raw, headers=_JSON)
        except httpx.HTTPError as exc:
            self.upstream_errors.inc()
            raise UpstreamError(_unreachable(self.upstream, exc)) from None

    async def models(self) -> httpx.Response:
        try:
            return await self.client.get(self.url("models"))
        except httpx.HTTPError as exc:
            self.upstream_errors.inc()
            raise UpstreamError(_unreachable(self.upstream, exc)) from None

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
            self.unrecorded.inc()
            log.exception("guard: turn %s could not be recorded", exchange.turn_id)
        self.exchanges.labels(exchange.outcome).inc()
        for d in exchange.decisions:
            self.actions.labels(d.action, d.detector, str(d.shadow).lower()).inc()
        self.telemetry.record(exchange, verdicts, started_ns)

    async def relay(
        self, exchange: Exchange, response: httpx.Response, started_ns: int
    ) -> AsyncIterator[bytes]:
        """The upstream's stream, forwarded event by event; scored every ``abort_every_tokens``
        when an abort or shadow policy applies (a scoring still running when the next window
        is due is awaited, so an abort takes effect within one window), and once more before
        the finish; recorded however it ends (a client that goes away included)."""
        scoring = exchange.scores("abort")
        every = self.config.abort_every_tokens
        pending: asyncio.Task[Read] | None = None
        last: Read | None = None
        scored_at = 0
        ended = False
        try:
            async for event in _events(response):
                chunk = _chunk(event)
                if chunk is None:  # no chunk (a comment, [DONE]): forwarded as received
                    yield event
                    ended = ended or b"data: [DONE]" in event
                    continue
                before = len(exchange.answer)
                exchange.observe_chunk(chunk)
                if scoring:
                    finishing = bool(exchange.finish_reasons)
                    due = exchange.tokens - scored_at >= every
                    if pending is not None and (pending.done() or due or finishing):
                        last = await pending
                        pending = None
                        if exchange.decide("abort", last.scored.verdicts):
                            yield _content_filter_end(exchange, before)
                            ended = True
                            return
                    if finishing:  # the whole answer, scored before the client sees its end
                        last = await self.score(exchange.turn())
                        if exchange.decide("abort", last.scored.verdicts):
                            yield _content_filter_end(exchange, before)
                            ended = True
                            return
                    elif due:
                        scored_at = exchange.tokens
                        pending = asyncio.create_task(self.score(exchange.turn()))
                yield event
            ended = True
        except httpx.HTTPError as exc:
            self.upstream_errors.inc()
            log.warning("guard: the upstream broke off turn %s: %s", exchange.turn_id, exc)
            exchange.outcome = "upstream_failed"
            ended = True
        finally:
            # Shielded: after a client disconnect every await here would be cancelled again.
            with anyio.CancelScope(shield=True):
                if pending is not None:
                    pending.cancel()
                await response.aclose()
                if not ended:
                    exchange.outcome = "disconnected"
                await self.record(exchange, last, started_ns)


_JSON = {"Content-Type": "application/json"}


def _unreachable(upstream: str, exc: httpx.HTTPError) -> str:
    return f"the upstream {upstream} did not answer: {type(exc).__name__}: {exc}".rstrip(": ")


async def _events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The stream's server-sent events, each as received with its blank line: one send to
    the client per event, not per line."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        lines.append(line)
        if not line:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


def _chunk(event: bytes) -> dict[str, object] | None:
    """The JSON chunk an event's ``data:`` line carries, if any."""
    for line in event.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _content_filter_end(exchange: Exchange, delivered: int) -> bytes:
    """The chunk that ends an aborted stream, then ``[DONE]``; the answer's chunks after the
    first ``delivered`` were not sent."""
    exchange.tokens -= len(exchange.answer) - delivered
    del exchange.answer[delivered:]
    exchange.outcome = "aborted"
    exchange.finish_reasons = ["content_filter"]
    chunk = {
        "id": exchange.response_id or f"chatcmpl-{exchange.turn_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": exchange.response_model or exchange.request_model or "",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}],
    }
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


def _from(turn: TurnRequest, start: int) -> TurnRequest:
    """The turn without its first ``start`` messages (noted in the metadata)."""
    if start <= 0:
        return turn
    meta = {**turn.metadata, "guard_dropped_messages": start}
    return dataclasses.replace(turn, messages=turn.messages[start:], metadata=meta)
