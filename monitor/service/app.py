"""The HTTP API (FastAPI): ingest turns, read alerts and conversations, health and metrics."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations,
# which name dependencies built inside create_app.

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from monitor.logs import RequestIdMiddleware, bind
from monitor.service.audit_api import audit_router
from monitor.service.background import drain_pending, prune_periodically
from monitor.service.deliveries_api import deliveries_router
from monitor.service.health import DB_UNAVAILABLE
from monitor.service.keys import Principal, authenticate
from monitor.service.limits import BodyLimit
from monitor.service.monitored import Monitored, load_monitored
from monitor.service.ops_api import ops_router
from monitor.service.runtime import Runtime
from monitor.service.schemas_api import schemas_router
from monitor.service.settings import ServiceSettings
from monitor.service.silences_api import silences_router
from monitor.service.storable import check_parameters
from monitor.service.triage_api import triage_router
from monitor.service.turns_api import turns_router
from monitor.service.ui import ui_router
from monitor.service.ui_silences import ui_silences_router
from monitor.service.ui_triage import ui_triage_router

log = logging.getLogger(__name__)


class State(Runtime):
    """The shared runtime, and what only the API runs: the batch queue's drain and retention."""

    def __init__(self, settings: ServiceSettings, monitored: list[Monitored]):
        super().__init__(settings, monitored)
        self.pending_event = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}  # background loops running here
        self.guard: Any = None  # guard_proxy.Guard: the proxy's upstream client, in guard mode


class AsciiJSONResponse(JSONResponse):
    """JSON with everything outside ASCII escaped: a validation error echoes its input, which
    may hold a lone surrogate that UTF-8 cannot encode (or NaN, which JSON cannot: encode the
    content with ``_finite`` first)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def create_app(
    settings: ServiceSettings,
    monitored: list[Monitored] | None = None,
    tracer_provider: object | None = None,
) -> FastAPI:
    """The API; pipelines load at start unless given (tests share loaded ones). Guard mode's
    spans go to ``tracer_provider`` when given, else where ``guard.otel`` says."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = monitored
        if loaded is None:
            loaded = [load_monitored(p, settings) for p in settings.resolved_pipelines()]
        state = State(settings, loaded)
        await asyncio.to_thread(state.upgrade)
        if not settings.kafka_bootstrap:
            log.warning(
                "Kafka publishing is off (SAFETY_MONITOR_KAFKA_BOOTSTRAP is not set): "
                "alerts are stored and kept in the outbox"
            )
        state.ingest.start_batchers()
        state.dispatcher.start()
        if settings.guard_upstream:
            from monitor.service.guard_proxy import Guard  # OpenTelemetry: only in guard mode

            state.guard = Guard(settings, state.ingest, tracer_provider)
            log.info("guard mode: /v1/chat/completions proxied to %s", settings.guard_upstream)
        loop = asyncio.get_running_loop()
        state.tasks["pending"] = loop.create_task(drain_pending(state))
        state.tasks["retention"] = loop.create_task(prune_periodically(state))
        app.state.monitor = state
        log.info(
            "database %s; pipelines: %s",
            state.engine.url.render_as_string(),
            ", ".join(state.monitored),
        )
        try:
            yield
        finally:
            for task in state.tasks.values():
                task.cancel()
                # A loop that died was reported by /readyz already; shutting down goes on.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if state.guard is not None:
                await state.guard.aclose()
            await state.ingest.stop_batchers()
            await asyncio.to_thread(state.close)

    app = FastAPI(
        title="safety-monitor",
        version="0.1.0",
        description="Safety monitoring sidecar: SAE features of live LLM traffic, detectors, "
        "alerts.",
        lifespan=lifespan,
        # Query and path parameters the database cannot hold are refused on every route.
        dependencies=[Depends(check_parameters)],
    )

    def too_large() -> None:
        state = getattr(app.state, "monitor", None)
        if state is not None:
            state.metrics.rejected.labels("too_large").inc()

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_reject=too_large)
    # Added last, so outside BodyLimit: a 413 carries the request id too.
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={float: _finite})
        return AsciiJSONResponse({"detail": errors}, status_code=422)

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning(
            "%s %s: database unavailable (%s)", request.method, request.url.path, type(exc).__name__
        )
        return JSONResponse(
            {"detail": "the database is unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    for error in DB_UNAVAILABLE:
        app.add_exception_handler(error, database_unavailable)

    # HTTPBearer declares the bearer scheme in /openapi.json (and on each route behind a key);
    # auto_error off: the 401 says what was wrong in this service's words.
    bearer = HTTPBearer(auto_error=False, description="An API key: safety-monitor keys create")

    def principal(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or not credentials.credentials.strip():
            raise HTTPException(
                401,
                "missing API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        found = principal_of(request, credentials.credentials.strip())
        if found is None:
            raise HTTPException(
                401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
            )
        return found

    def role(needed: str) -> Callable[[Principal], Principal]:
        def check(p: Annotated[Principal, Depends(principal)]) -> Principal:
            if not p.may(needed):
                raise HTTPException(
                    403, f"this key's role ({p.role}) may not do this; it needs {needed}"
                )
            return p

        return check

    app.include_router(turns_router(role, settings))
    app.include_router(deliveries_router(role))
    app.include_router(ops_router())
    app.include_router(schemas_router())
    app.include_router(audit_router(role, settings.redact))
    app.include_router(triage_router(role, settings.redact))
    app.include_router(silences_router(role))
    app.include_router(ui_router(settings, principal_of))
    app.include_router(ui_triage_router(settings, principal_of))
    app.include_router(ui_silences_router(principal_of))
    if settings.guard_upstream:
        from monitor.service.guard_api import guard_router

        app.include_router(guard_router(role))
    return app


def principal_of(request: Request, key: str) -> Principal | None:
    """The tenant and role of a live key, or None."""
    with _state(request).sessions() as session:
        found = authenticate(session, key)
    if found is not None:
        bind(tenant=found.tenant)  # the request's log lines name the tenant from here on
    return found


def _state(request: Request) -> State:
    state: State = request.app.state.monitor
    return state
