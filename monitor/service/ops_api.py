"""Operations endpoints: liveness, readiness, Prometheus metrics."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

import asyncio
import logging
import socket

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from monitor.service.db import Outbox
from monitor.service.runtime import state_of

log = logging.getLogger(__name__)


def ops_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "not ready: the checks say why"}})
    def readyz(request: Request) -> JSONResponse:
        """Ready: pipelines loaded, database reachable, background loops running and not
        failing (broker: once publishing is on)."""
        state = state_of(request)
        checks: dict[str, str] = {"pipelines": "ok" if state.monitored else "none loaded"}
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready; say which
            checks["database"] = f"unreachable: {type(exc).__name__}"
        problems = [f"{name}: {why}" for name, why in sorted(state.loops.failing().items())]
        problems += [f"{name}: stopped" for name, task in state.tasks.items() if _died(task)]
        checks["background"] = "; ".join(problems) or "ok"
        checks["kafka"] = _broker_check(state.settings.kafka_bootstrap)
        ok = all(checks[c] == "ok" for c in ("pipelines", "database", "background"))
        # A broker outage leaves the service ready: turns are still evaluated and stored, and
        # their alerts wait in the outbox. Taking the pod out of rotation would stop monitoring.
        degraded = checks["kafka"] not in ("ok", "off")
        return JSONResponse(
            {"ready": ok, "degraded": degraded, "checks": checks}, status_code=200 if ok else 503
        )

    plain = {"text/plain": {"schema": {"type": "string"}}}

    @router.get("/metrics", response_class=Response, responses={200: {"content": plain}})
    def metrics(request: Request) -> Response:
        """Prometheus exposition; the outbox, webhook-delivery and pending-turn gauges are read
        from the database on each scrape (NaN, with ``safety_monitor_database_up 0``, when it
        cannot be read: the process's own metrics are still worth scraping)."""
        state = state_of(request)
        hooks = [t.name for t in state.settings.delivery_targets()]  # webhooks and sinks
        try:
            with state.sessions() as session:
                backlog, oldest = session.execute(
                    select(func.count(), func.min(Outbox.created_at)).where(
                        Outbox.published_at.is_(None)
                    )
                ).one()
                state.metrics.observe_outbox(backlog or 0, oldest)
                state.metrics.refresh_queues(session, hooks)
                state.metrics.refresh_triage(session)
            state.metrics.database_up.set(1)
        except SQLAlchemyError as exc:
            log.warning("metrics: database gauges unreadable (%s)", type(exc).__name__)
            state.metrics.database_unreadable(hooks)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _died(task: "asyncio.Task[None]") -> bool:
    """A loop that ended other than by finishing its job (retention off returns at once)."""
    return task.done() and (task.cancelled() or task.exception() is not None)


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
