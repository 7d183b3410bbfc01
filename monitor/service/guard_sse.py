"""The server-sent events of a streamed chat completion, as guard mode relays them.

The upstream's stream is read line by line (httpx's ``aiter_lines``) and forwarded event by
event as received; only ``data:`` lines are parsed, to follow the answer. Written here rather
than with an SSE library because the bytes must go on unchanged, and a parser that
re-serialises events would not guarantee that.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx

from monitor.service.guard import Exchange


async def events(response: httpx.Response) -> AsyncIterator[bytes]:
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


def chunk_of(event: bytes) -> dict[str, object] | None:
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


def content_filter_end(exchange: Exchange, delivered: int) -> bytes:
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
