"""The Kafka worker's HTTP port (``safety-monitor worker --port P``): the API's operations
endpoints over the worker's runtime.

``/healthz`` answers while the process runs; ``/metrics`` is the runtime's registry, with the
database-backed gauges (outbox, webhook deliveries, pending turns) read on each scrape as the
API does; ``/readyz`` is 200 once the pipelines are loaded, the database answers and every
background loop is ready: the alert dispatcher's loops and the consumer (``worker.LOOP``),
which is ready while partitions are assigned to it and it polls. 503 otherwise, with
``checks`` saying why. Nothing else is served (no API routes, no docs).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

import asyncio
from typing import Any

from fastapi import FastAPI

from monitor.service.ops_api import ops_router
from monitor.service.runtime import Runtime


class _OpsState:
    """The runtime as the operations routes read it (``app.state.monitor``). The API's asyncio
    loops (``tasks``: batch drain, retention) do not run in a worker."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


def worker_app(runtime: Runtime) -> FastAPI:
    """The worker's ASGI app: ``/healthz``, ``/readyz`` and ``/metrics`` of ``runtime``."""
    app = FastAPI(title="safety-monitor worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.monitor = _OpsState(runtime)
    app.include_router(ops_router())
    return app
