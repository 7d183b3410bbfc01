"""The runtime every way in shares, built once per process: settings, metrics, the database,
the configured pipelines, the ingest path, the alert dispatcher and the readiness of the
background loops.

The API (``app.State`` extends it with what only the API runs), the Kafka worker and the guard
proxy each hold one; none of them builds its own sessions, metrics or ingest path.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from monitor.service.db import make_engine, upgrade
from monitor.service.dispatch import Dispatcher
from monitor.service.health import Loops
from monitor.service.ingest import Ingest
from monitor.service.metrics import Metrics
from monitor.service.monitored import Monitored, load_monitored
from monitor.service.settings import ServiceSettings


def state_of(request: Request) -> Any:
    """The API's state (a ``Runtime``) from a request: the routers cannot import the app that
    includes them."""
    return request.app.state.monitor


class SettingsError(ValueError):
    """Settings that parse but do not fit what was loaded (a filter naming no detector)."""


def check_sink_filters(settings: ServiceSettings, monitored: list[Monitored]) -> None:
    """Refuse a sink filter that names a detector no loaded pipeline has: it would silently
    never match (a typo, or a detector renamed)."""
    known = {d for m in monitored for d in m.summaries}
    targets = [
        *((f"webhooks[{i}]", t) for i, t in enumerate(settings.webhooks)),
        *((f"sinks[{i}]", t) for i, t in enumerate(settings.sinks)),
    ]
    for where, target in targets:
        unknown = sorted(set(target.detectors) - known)
        if unknown:
            raise SettingsError(
                f"{where} ({target.name}).detectors: unknown detector {unknown[0]!r}; "
                f"the pipelines have: {', '.join(sorted(known))}"
            )


def check_guard(settings: ServiceSettings, monitored: list[Monitored]) -> None:
    """Refuse guard policies naming no loaded detector, and a guard pipeline not configured."""
    known = {d for m in monitored for d in m.summaries}
    unknown = sorted(settings.guard.detectors_named() - known)
    if unknown:
        raise SettingsError(
            f"guard.policies: unknown detector {unknown[0]!r}; the pipelines have: "
            + ", ".join(sorted(known))
        )
    names = [m.config.name for m in monitored]
    if settings.guard.pipeline is not None and settings.guard.pipeline not in names:
        raise SettingsError(
            f"guard.pipeline: no pipeline named {settings.guard.pipeline!r}; configured: "
            + ", ".join(names)
        )


class Runtime:
    def __init__(self, settings: ServiceSettings, monitored: list[Monitored]) -> None:
        check_sink_filters(settings, monitored)
        check_guard(settings, monitored)
        self.settings = settings
        self.metrics = Metrics()
        self.engine = make_engine(settings.resolved_database_url())
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self.monitored = {m.config.name: m for m in monitored}
        self.ingest = Ingest(self.monitored, self.sessions, settings, self.metrics)
        self.loops = Loops()  # background loops failing now (readiness)
        self.dispatcher = Dispatcher(self.sessions, settings, self.metrics, self.loops)

    @classmethod
    def load(cls, settings: ServiceSettings) -> Runtime:
        """A runtime with the configured pipelines loaded (model, SAE, catalog each)."""
        return cls(settings, [load_monitored(p, settings) for p in settings.resolved_pipelines()])

    def upgrade(self) -> None:
        """Bring the database schema up to date (SQLAlchemyError when it cannot)."""
        upgrade(self.engine)

    def close(self) -> None:
        """Stop the dispatcher (if started) and release the database connections."""
        self.dispatcher.stop()
        self.engine.dispose()
