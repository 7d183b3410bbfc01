"""Log lines: one JSON object per line for a log aggregator, or rich text for a person.

``SAFETY_MONITOR_LOG_FORMAT`` chooses: ``json``, ``text`` (rich, as on a terminal) or ``auto``
(the default: text when stderr is a terminal, JSON otherwise). A JSON line has ``ts`` (ISO-8601,
UTC, with its offset), ``level``, ``logger`` and ``message``; ``exc`` with the traceback of an
exception; and, for lines written while the service handles an HTTP request, ``request_id``
and, once known, ``tenant`` (the API key's) and ``turn_id`` (the turn recorded). uvicorn's
access lines add ``method``, ``path`` and ``status``.

The request's fields live in a context variable: :class:`RequestIdMiddleware` sets it at the
start of each request, :func:`bind` adds to it (the key lookup, the turn API).

Nothing here writes message content: the access line's path is written without its query
string (the audit search's ``q`` is text of the messages).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG_FORMAT_VARIABLE = "SAFETY_MONITOR_LOG_FORMAT"
FORMATS = ("auto", "json", "text")
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_MAX_CHARS = 128
_REQUEST_ID_REFUSED = re.compile(r"[^A-Za-z0-9_.:-]")
_ACCESS_FIELDS = ("method", "path", "status")


@dataclass
class LogContext:
    """What the log lines of one request carry. One object per request, changed in place: a
    sync dependency that FastAPI runs in a worker thread (with a copy of the context variables)
    changes the same object the request's other lines read."""

    request_id: str | None = None
    tenant: str | None = None
    turn_id: str | None = None


_context: ContextVar[LogContext | None] = ContextVar("safety_monitor_log_context", default=None)


def current_context() -> LogContext | None:
    """The context of the request being handled here, or None."""
    return _context.get()


def bind(*, tenant: str | None = None, turn_id: str | None = None) -> None:
    """Add what became known to the current request's log context (outside a request: nothing,
    so a background loop's lines never carry a request's fields)."""
    ctx = _context.get()
    if ctx is None:
        return
    if tenant is not None:
        ctx.tenant = tenant
    if turn_id is not None:
        ctx.turn_id = turn_id


def request_id_from(raw: bytes | None) -> str:
    """The client's request id, made safe for logs and headers (letters, digits, ``_.:-``, at
    most 128 characters), or a new one (32 hex digits) when it gave none or nothing is left."""
    if raw:
        kept = _REQUEST_ID_REFUSED.sub("", raw[:1024].decode("latin-1"))[:REQUEST_ID_MAX_CHARS]
        if kept:
            return kept
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """An ASGI middleware: each HTTP request gets an id (``X-Request-Id`` from the client,
    sanitised, or a new one), echoed on the response and carried by every log line written
    while the request is handled, uvicorn's access line included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.lower().encode()
        given = next((v for k, v in scope.get("headers") or [] if k.lower() == header), None)
        request_id = request_id_from(given)
        echoed = (header, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or [] if k.lower() != header]
                message = {**message, "headers": [*headers, echoed]}
            await send(message)

        token = _context.set(LogContext(request_id=request_id))
        await self.app(scope, receive, send_with_id)
        # Reset only on success: after an unhandled exception the server's 500 and its error
        # line come after this returns, and should carry the id too (each request runs in a
        # task of its own, so the value ends with it).
        _context.reset(token)


class AccessFields(logging.Filter):
    """uvicorn's access lines: the path without its query string (which may hold message
    text, such as the audit search's ``q``), and method, path and status as fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            path = str(path).split("?", 1)[0]
            record.args = (client, method, path, version, status)
            record.__dict__.update(method=method, path=path, status=status)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, ASCII only (nothing a terminal or an
    aggregator could misread: newlines and other characters are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = _context.get()
        if ctx is not None:
            for key in ("request_id", "tenant", "turn_id"):
                value = getattr(ctx, key)
                if value is not None:
                    doc[key] = value
        for key in _ACCESS_FIELDS:
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=True, default=str)


def chosen_format(value: str | None = None, stream: IO[str] | None = None) -> str:
    """``json`` or ``text``: ``value`` (default: the environment variable, then ``auto``), with
    ``auto`` resolved by whether ``stream`` (default: stderr) is a terminal. ValueError for
    anything else."""
    if value is None:
        value = os.environ.get(LOG_FORMAT_VARIABLE) or "auto"
    name = value.strip().lower()
    if name not in FORMATS:
        raise ValueError(
            f"{LOG_FORMAT_VARIABLE} must be one of {', '.join(FORMATS)}, not {value!r}"
        )
    if name == "auto":
        target = stream or sys.stderr
        return "text" if target.isatty() else "json"
    return name


def configure_logging(
    verbose: bool = False,
    value: str | None = None,
    console: Console | None = None,
    stream: IO[str] | None = None,
) -> str:
    """Set up the root logger for a command and return the format chosen (``json`` or
    ``text``; see :func:`chosen_format`). Text goes to ``console`` through rich; JSON to
    ``stream`` (default: stderr), with Python's warnings routed into it. Like
    ``logging.basicConfig``, it leaves a root logger that has handlers alone (a program that
    embeds the commands, pytest)."""
    fmt = chosen_format(value, stream)
    if logging.getLogger().handlers:
        return fmt
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)  # they would otherwise be plain text on stderr
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(AccessFields())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    return fmt
