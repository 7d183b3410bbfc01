"""The HTTP API (FastAPI): ingest turns, read alerts and conversations, health and metrics."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations,
# which name dependencies built inside create_app.

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from monitor.messages import Message
from monitor.service.audit import prune
from monitor.service.audit_api import audit_router
from monitor.service.core import Batcher, Monitored, load_monitored, record
from monitor.service.db import (
    Alert,
    Outbox,
    PendingTurn,
    WebhookDelivery,
    make_engine,
    upgrade,
    utcnow,
)
from monitor.service.dispatch import Dispatcher
from monitor.service.keys import Principal, authenticate
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.ui import ui_router

log = logging.getLogger(__name__)


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class TurnIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: str = Field(min_length=1, max_length=256)
    messages: list[MessageIn] = Field(min_length=1, max_length=200)
    model: str | None = Field(default=None, description="Configured pipeline name.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class TurnBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    turns: list[TurnIn] = Field(min_length=1)


class VerdictOut(BaseModel):
    detector: str
    score: float
    fired: bool
    severity: str


class TurnOut(BaseModel):
    turn_id: str
    conversation_id: str
    verdicts: list[VerdictOut]
    alert_ids: list[str]


class State:
    def __init__(self, settings: ServiceSettings, monitored: list[Monitored]):
        self.settings = settings
        self.metrics = Metrics()
        self.engine = make_engine(settings.resolved_database_url())
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self.monitored = {m.config.name: m for m in monitored}
        self.default = monitored[0].config.name if monitored else None
        self.dispatcher: Dispatcher
        self.pending_event = asyncio.Event()


def create_app(settings: ServiceSettings, monitored: list[Monitored] | None = None) -> FastAPI:
    """The API; pipelines load at start unless given (tests share loaded ones)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = monitored
        if loaded is None:
            loaded = [load_monitored(p, settings) for p in settings.resolved_pipelines()]
        state = State(settings, loaded)
        await asyncio.to_thread(upgrade, state.engine)
        if not settings.kafka_bootstrap:
            log.warning(
                "Kafka publishing is off (SAFETY_MONITOR_KAFKA_BOOTSTRAP is not set): "
                "alerts are stored and kept in the outbox"
            )
        for m in state.monitored.values():
            m.batcher = Batcher(m, settings, state.metrics)
            m.batcher.start()
        state.dispatcher = Dispatcher(state.sessions, settings, state.metrics)
        state.dispatcher.start()
        drainer = asyncio.get_running_loop().create_task(_drain_pending(state))
        pruner = asyncio.get_running_loop().create_task(_prune_periodically(state))
        app.state.monitor = state
        log.info(
            "database %s; pipelines: %s",
            state.engine.url.render_as_string(),
            ", ".join(state.monitored),
        )
        try:
            yield
        finally:
            for task in (drainer, pruner):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for m in state.monitored.values():
                if m.batcher is not None:
                    await m.batcher.stop()
            await asyncio.to_thread(state.dispatcher.stop)
            state.engine.dispose()

    app = FastAPI(
        title="safety-monitor",
        version="0.1.0",
        description="Safety monitoring sidecar: SAE features of live LLM traffic, detectors, "
        "alerts.",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        limit = settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            _state(request).metrics.rejected.labels("too_large").inc()
            return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
        return await call_next(request)

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

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """Ready: pipelines loaded, database reachable (broker: once publishing is on)."""
        state = _state(request)
        checks: dict[str, str] = {"pipelines": "ok" if state.monitored else "none loaded"}
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready; say which
            checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["kafka"] = _broker_check(settings.kafka_bootstrap)
        ok = checks["pipelines"] == "ok" and checks["database"] == "ok"
        # A broker outage leaves the service ready: turns are still evaluated and stored, and
        # their alerts wait in the outbox. Taking the pod out of rotation would stop monitoring.
        degraded = checks["kafka"] not in ("ok", "off")
        return JSONResponse(
            {"ready": ok, "degraded": degraded, "checks": checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics", tags=["health"])
    def metrics(request: Request) -> Response:
        """Prometheus exposition; the outbox, webhook-delivery and pending-turn gauges are read
        from the database on each scrape."""
        state = _state(request)
        with state.sessions() as session:
            backlog, oldest = session.execute(
                select(func.count(), func.min(Outbox.created_at)).where(
                    Outbox.published_at.is_(None)
                )
            ).one()
            state.metrics.observe_outbox(backlog or 0, oldest)
            state.metrics.refresh_queues(session, [w.name for w in settings.webhooks])
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/turns",
        response_model=TurnOut,
        tags=["turns"],
        responses={
            404: {"description": "unknown pipeline"},
            413: {"description": "body too large"},
        },
    )
    async def post_turn(
        body: TurnIn, request: Request, who: Annotated[Principal, Depends(role("ingest"))]
    ) -> TurnOut:
        """Evaluate one turn synchronously; fired rules become alerts (stored, then sent)."""
        state = _state(request)
        name = body.model or state.default
        monitored = state.monitored.get(name or "")
        if monitored is None or monitored.batcher is None:
            state.metrics.rejected.labels("unknown_pipeline").inc()
            raise HTTPException(
                404, f"no pipeline named {body.model!r}; configured: {', '.join(state.monitored)}"
            )
        started = time.perf_counter()
        messages = [Message(role=m.role, content=m.content) for m in body.messages]
        encoded, verdicts = await monitored.batcher.submit(messages)
        recorded = await asyncio.to_thread(
            record,
            state.sessions,
            tenant=who.tenant,
            conversation_id=body.conversation_id,
            messages=messages,
            metadata=body.metadata,
            monitored=monitored,
            encoded=encoded,
            verdicts=verdicts,
            settings=settings,
        )
        state.metrics.observe_turn(monitored.config.name, verdicts, recorded)
        state.metrics.request_seconds.labels(monitored.config.name).observe(
            time.perf_counter() - started
        )
        return TurnOut(
            turn_id=recorded.turn_id,
            conversation_id=body.conversation_id,
            verdicts=[
                VerdictOut(
                    detector=v.detector, score=round(v.score, 6), fired=v.fired, severity=v.severity
                )
                for v in verdicts
            ],
            alert_ids=recorded.alert_ids,
        )

    @app.post("/v1/turns/batch", status_code=202, tags=["turns"],
              responses={404: {"description": "unknown pipeline"}})  # fmt: skip
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
        for t in body.turns:
            if (t.model or state.default) not in state.monitored:
                raise HTTPException(404, f"no pipeline named {t.model!r}")
        ids = [str(uuid.uuid4()) for _ in body.turns]
        with state.sessions() as session:
            for turn_id, t in zip(ids, body.turns, strict=True):
                session.add(PendingTurn(id=turn_id, tenant=who.tenant,
                                        body=t.model_dump(mode="json")))  # fmt: skip
            session.commit()
        state.pending_event.set()
        return {"turn_ids": ids}

    @app.get("/v1/webhooks/deliveries", tags=["alerts"])
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

    app.include_router(audit_router(role))
    app.include_router(ui_router(settings, principal_of))
    return app


PENDING_LEASE_S = 300
PENDING_MAX_ATTEMPTS = 5


def _claim_pending(state: State, limit: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Lease due pending turns to this instance (SKIP LOCKED on PostgreSQL)."""
    now = utcnow()
    with state.sessions() as session:
        q = (
            select(PendingTurn)
            .where(PendingTurn.available_at <= now, PendingTurn.attempts < PENDING_MAX_ATTEMPTS)
            .order_by(PendingTurn.created_at)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        rows = session.scalars(q).all()
        out = []
        for r in rows:
            r.available_at = now + dt.timedelta(seconds=PENDING_LEASE_S)
            r.attempts += 1
            out.append((r.id, r.tenant, r.body))
        session.commit()
    return out


def _finish_pending(state: State, turn_id: str, error: str | None) -> None:
    with state.sessions() as session:
        row = session.get(PendingTurn, turn_id)
        if row is None:
            return
        if error is None:
            session.delete(row)
        else:
            row.last_error = error[:1000]
            row.available_at = utcnow() + dt.timedelta(seconds=2**row.attempts)
            log.error("pending turn %s failed (attempt %d): %s", turn_id, row.attempts, error)
        session.commit()


async def _drain_pending(state: State) -> None:
    """Evaluate accepted batch turns; they go through the same batcher as synchronous ones."""

    async def one(turn_id: str, tenant: str, body: dict[str, Any]) -> None:
        try:
            t = TurnIn.model_validate(body)
            monitored = state.monitored[t.model or state.default or ""]
            assert monitored.batcher is not None
            messages = [Message(role=m.role, content=m.content) for m in t.messages]
            encoded, verdicts = await monitored.batcher.submit(messages)
            recorded = await asyncio.to_thread(
                record, state.sessions, tenant=tenant, conversation_id=t.conversation_id,
                messages=messages, metadata=t.metadata, monitored=monitored, encoded=encoded,
                verdicts=verdicts, source_id=f"batch:{turn_id}", turn_id=turn_id,
                settings=state.settings,
            )  # fmt: skip
            state.metrics.observe_turn(monitored.config.name, verdicts, recorded)
            error = None
        except Exception as exc:  # stays pending, retried with backoff, then left for an operator
            error = f"{type(exc).__name__}: {exc}"
        await asyncio.to_thread(_finish_pending, state, turn_id, error)

    while True:
        rows = await asyncio.to_thread(_claim_pending, state, state.settings.max_batch_turns)
        if rows:
            await asyncio.gather(*(one(*r) for r in rows))
            continue
        state.pending_event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.pending_event.wait(), timeout=1.0)


async def _prune_periodically(state: State) -> None:
    """Retention: delete expired turns every ``retention_interval_s`` (0: never here)."""
    s = state.settings
    if not s.retention_interval_s or (s.retention_days is None and not s.tenant_retention_days):
        return
    while True:
        try:
            report = await asyncio.to_thread(
                prune, state.sessions, s.retention_days, s.tenant_retention_days
            )
            if report.total:
                log.info("retention: pruned %d turns (%s)", report.total, report.turns)
                state.metrics.pruned.inc(report.total)
        except Exception:  # a failed prune is retried next interval; the service carries on
            log.exception("retention prune failed")
        await asyncio.sleep(s.retention_interval_s)


def _broker_check(bootstrap: str | None) -> str:
    if not bootstrap:
        return "off"
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=1):
                return "ok"
        except (OSError, ValueError):
            continue
    return "unreachable"


def principal_of(request: Request, key: str) -> Principal | None:
    """The tenant and role of a live key, or None."""
    with _state(request).sessions() as session:
        return authenticate(session, key)


def _state(request: Request) -> State:
    state: State = request.app.state.monitor
    return state
