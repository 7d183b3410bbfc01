"""The HTTP API (FastAPI): ingest turns, read alerts and conversations, health and metrics."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations,
# which name dependencies built inside create_app.

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select

from monitor.service.audit_api import audit_router
from monitor.service.background import drain_pending, prune_periodically
from monitor.service.batcher import Batcher
from monitor.service.db import Alert, PendingTurn, WebhookDelivery
from monitor.service.health import DB_UNAVAILABLE
from monitor.service.ingest import TurnRequest, TurnTooLongError, UnknownPipelineError
from monitor.service.keys import Principal, authenticate
from monitor.service.limits import BodyLimit
from monitor.service.monitored import Monitored, load_monitored
from monitor.service.ops_api import ops_router
from monitor.service.runtime import Runtime
from monitor.service.schemas import (
    AUTH_REFUSED,
    BODY_REFUSED,
    TurnBatchIn,
    TurnIn,
    TurnOut,
    VerdictOut,
)
from monitor.service.settings import ServiceSettings
from monitor.service.storable import check_parameters
from monitor.service.ui import ui_router

log = logging.getLogger(__name__)


class State(Runtime):
    """The shared runtime, and what only the API runs: the batch queue's drain and retention."""

    def __init__(self, settings: ServiceSettings, monitored: list[Monitored]):
        super().__init__(settings, monitored)
        self.pending_event = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}  # background loops running here


class AsciiJSONResponse(JSONResponse):
    """JSON with everything outside ASCII escaped: a validation error echoes its input, which
    may hold a lone surrogate that UTF-8 cannot encode (or NaN, which JSON cannot: encode the
    content with ``_finite`` first)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode()  # fmt: skip


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def create_app(settings: ServiceSettings, monitored: list[Monitored] | None = None) -> FastAPI:
    """The API; pipelines load at start unless given (tests share loaded ones)."""

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
        for m in state.monitored.values():
            m.batcher = Batcher(m, settings, state.metrics)
            m.batcher.start()
        state.dispatcher.start()
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
            for m in state.monitored.values():
                if m.batcher is not None:
                    await m.batcher.stop()
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

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={float: _finite})
        return AsciiJSONResponse({"detail": errors}, status_code=422)

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: database unavailable (%s)", request.method, request.url.path,
                    type(exc).__name__)  # fmt: skip
        return JSONResponse({"detail": "the database is unavailable; retry later"},
                            status_code=503, headers={"Retry-After": "5"})  # fmt: skip

    for error in DB_UNAVAILABLE:
        app.add_exception_handler(error, database_unavailable)

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise HTTPException(
                401,
                "missing API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        found = principal_of(request, key.strip())
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

    @app.post(
        "/v1/turns",
        response_model=TurnOut,
        tags=["turns"],
        responses={**AUTH_REFUSED, **BODY_REFUSED, 404: {"description": "unknown pipeline"}},
    )
    async def post_turn(
        body: TurnIn,
        request: Request,
        who: Annotated[Principal, Depends(role("ingest"))],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                min_length=1,
                max_length=200,
                description="A retry with the same key (per tenant) is stored once and answered "
                "with the first one's turn and alert ids (duplicate: true).",
            ),
        ] = None,
    ) -> TurnOut:
        """Evaluate one turn synchronously; fired rules become alerts (stored, then sent)."""
        state = _state(request)
        started = time.perf_counter()
        source_id = f"http:{idempotency_key}" if idempotency_key is not None else None
        try:
            done = await state.ingest.submit(TurnRequest.of(body, who.tenant, source_id=source_id))
        except UnknownPipelineError as exc:
            state.metrics.rejected.labels("unknown_pipeline").inc()
            raise HTTPException(404, str(exc)) from None
        except TurnTooLongError as exc:
            state.metrics.rejected.labels("too_long").inc()
            raise HTTPException(413, str(exc)) from None
        state.metrics.request_seconds.labels(done.pipeline).observe(time.perf_counter() - started)
        return TurnOut(
            turn_id=done.turn_id,
            conversation_id=done.conversation_id,
            verdicts=[
                VerdictOut(
                    detector=v.detector, score=round(v.score, 6), fired=v.fired, severity=v.severity
                )
                for v in done.verdicts
            ],
            alert_ids=done.alert_ids,
            n_tokens=done.n_tokens,
            dropped_tokens=done.dropped_tokens,
            windows=done.windows,
            unread_parts=done.unread_parts,
            duplicate=done.duplicate,
        )

    @app.post("/v1/turns/batch", status_code=202, tags=["turns"],
              responses={**AUTH_REFUSED, **BODY_REFUSED,
                         404: {"description": "unknown pipeline"}})  # fmt: skip
    def post_turn_batch(
        body: TurnBatchIn, request: Request, who: Annotated[Principal, Depends(role("ingest"))]
    ) -> dict[str, list[str]]:
        """Accept up to ``MAX_BATCH_TURNS`` turns for evaluation; they are stored durably first,
        evaluated in the background, and appear under their turn ids when done."""
        state = _state(request)
        if len(body.turns) > settings.max_batch_turns:
            problem = {"loc": ["body", "turns"], "type": "too_long",
                       "msg": f"at most {settings.max_batch_turns} turns"}  # fmt: skip
            raise HTTPException(422, [problem])
        for i, t in enumerate(body.turns):
            try:
                state.ingest.check(TurnRequest.of(t, who.tenant))
            except UnknownPipelineError as exc:
                raise HTTPException(404, str(exc)) from None
            except TurnTooLongError as exc:
                state.metrics.rejected.labels("too_long").inc()
                raise HTTPException(413, f"turns[{i}]: {exc}") from None
        ids = [str(uuid.uuid4()) for _ in body.turns]
        with state.sessions() as session:
            for turn_id, t in zip(ids, body.turns, strict=True):
                session.add(PendingTurn(id=turn_id, tenant=who.tenant,
                                        body=t.model_dump(mode="json")))  # fmt: skip
            session.commit()
        state.pending_event.set()
        return {"turn_ids": ids}

    @app.get("/v1/webhooks/deliveries", tags=["alerts"], responses=AUTH_REFUSED)
    def get_deliveries(
        request: Request,
        who: Annotated[Principal, Depends(role("read"))],
        status: Literal["pending", "delivered", "dead"] | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        """Webhook deliveries of this tenant's alerts: pending, delivered or dead-lettered."""
        q = (
            select(WebhookDelivery)
            .join(Alert, Alert.id == WebhookDelivery.alert_id)
            .where(Alert.tenant == who.tenant)
        )
        if status == "delivered":
            q = q.where(WebhookDelivery.delivered_at.is_not(None))
        elif status == "dead":
            q = q.where(WebhookDelivery.dead_at.is_not(None))
        elif status == "pending":
            q = q.where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.dead_at.is_(None))
        q = q.order_by(WebhookDelivery.id.desc()).limit(limit)
        with _state(request).sessions() as session:
            rows = session.scalars(q).all()
        return {"deliveries": [{
            "alert_id": d.alert_id, "webhook": d.webhook, "attempts": d.attempts,
            "status": "delivered" if d.delivered_at else "dead" if d.dead_at else "pending",
            "last_status": d.last_status, "last_error": d.last_error,
            "next_attempt_at": d.next_attempt_at.isoformat(),
        } for d in rows]}  # fmt: skip

    app.include_router(ops_router())
    app.include_router(audit_router(role, settings.redact))
    app.include_router(ui_router(settings, principal_of))
    return app


def principal_of(request: Request, key: str) -> Principal | None:
    """The tenant and role of a live key, or None."""
    with _state(request).sessions() as session:
        return authenticate(session, key)


def _state(request: Request) -> State:
    state: State = request.app.state.monitor
    return state
