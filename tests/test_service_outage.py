"""The service through a real PostgreSQL outage (its own cluster, stopped and started with
pg_ctl): metrics still served, background loops unready while failing then resumed, a failing
export aborted so the client sees an error."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from samples import PLAIN, WEBHOOK_SECRET, turn_row
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.localservices import Postgres, ThreadedServer
from monitor.service import export
from monitor.service.app import create_app
from monitor.service.db import Turn, make_engine, upgrade
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Postgres]:
    pg = Postgres()
    pg.start()
    yield pg
    pg.close()


@pytest.fixture
def outage(cluster: Postgres) -> Iterator[Postgres]:
    """The cluster, started again after the test whatever happened."""
    yield cluster
    cluster.start()


def settings(cluster: Postgres, **over: Any) -> ServiceSettings:
    return ServiceSettings(
        database_url=cluster.url,
        batch_wait_ms=20,
        dispatch_interval_s=0.1,
        retention_interval_s=0,
        **over,
    )


def key(url: str, tenant: str, role: str) -> dict[str, str]:
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as session:
        k = create_key(session, tenant, role)
        session.commit()
    engine.dispose()
    return {"Authorization": f"Bearer {k}"}


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_metrics_are_served_while_the_database_is_down(outage: Postgres) -> None:
    read = key(outage.url, f"t-{uuid.uuid4().hex[:8]}", "read")
    with TestClient(
        create_app(
            settings(
                outage,
                webhooks=[
                    {"name": "ops", "url": "http://127.0.0.1:9/hook", "secrets": [WEBHOOK_SECRET]}
                ],
            ),
            [],
        )
    ) as c:
        assert c.get("/metrics").status_code == 200
        outage.stop()
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        assert "safety_monitor_database_up 0.0" in r.text
        assert "safety_monitor_outbox_backlog NaN" in r.text
        assert 'safety_monitor_webhook_deliveries{state="pending",webhook="ops"} NaN' in r.text
        assert "process_cpu_seconds_total" in r.text or not Path("/proc").is_dir()
        refused = c.get("/v1/alerts", headers=read)  # what needs the database says so
        assert refused.status_code == 503 and "database" in refused.json()["detail"]
        outage.start()
        wait_for(
            lambda: "safety_monitor_database_up 1.0" in c.get("/metrics").text,
            30,
            "the gauges came back with the database",
        )


def test_batch_ingest_resumes_after_a_database_outage(
    outage: Postgres, monitored: Monitored
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    ingest = key(outage.url, tenant, "ingest")

    def stored() -> int:
        engine = make_engine(outage.url)
        try:
            with Session(engine) as s:
                return int(
                    s.scalar(select(func.count()).select_from(Turn).where(Turn.tenant == tenant))
                    or 0
                )
        finally:
            engine.dispose()

    def post_batch(name: str) -> None:
        turns = [{"conversation_id": name, "messages": PLAIN}]
        r = c.post("/v1/turns/batch", json={"turns": turns}, headers=ingest)
        assert r.status_code == 202, r.text

    with TestClient(create_app(settings(outage), [monitored])) as c:
        post_batch("before")
        wait_for(lambda: stored() == 1, 120, "the first batch was evaluated")
        outage.stop()
        time.sleep(2.0)  # a short outage: the drainer and the dispatcher both fail meanwhile
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        background = ready.json()["checks"]["background"]
        assert "pending" in background and "OperationalError" in background, background
        outage.start()
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, "ready again")
        assert c.get("/readyz").json()["checks"]["background"] == "ok"
        post_batch("after")
        wait_for(lambda: stored() == 2, 120, "batch ingest evaluates again after the outage")


def test_a_failing_export_aborts_the_stream(
    outage: Postgres, monitored: Monitored, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    read = key(outage.url, tenant, "read")
    # Rows large enough that the reply outgrows the sockets' buffers: the server is still
    # reading pages when the database stops.
    big = [{"role": "user", "content": "lorem ipsum " * 20_000}]
    engine = make_engine(outage.url)
    with Session(engine) as session:
        for i in range(120):
            session.add(turn_row(tenant, f"c{i}", messages=big))
        session.commit()
    engine.dispose()
    monkeypatch.setattr(export, "EXPORT_PAGE", 2)
    with ThreadedServer(create_app(settings(outage), [monitored])) as server:
        url = f"{server.url}/v1/export/turns"
        for fmt in ("jsonl", "csv"):
            with httpx.stream("GET", url, params={"format": fmt}, headers=read, timeout=60) as r:
                assert r.status_code == 200
                chunks = r.iter_bytes()
                first = next(chunks)
                assert first
                time.sleep(1.0)  # the server fills the buffers and waits on the socket
                outage.stop()
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete"):
                    for _ in chunks:
                        pass
            outage.start()
    # With the database back, the same export is whole.
    with ThreadedServer(create_app(settings(outage), [monitored])) as server:
        body = httpx.get(f"{server.url}/v1/export/turns", headers=read, timeout=120).text
    assert len(re.findall(r'"conversation_id": "c\d+"', body)) == 120
