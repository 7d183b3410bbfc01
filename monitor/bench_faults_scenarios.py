"""The scenarios of ``bench --faults`` over HTTP (broker, postgres, webhook); the worker's is in
``monitor.bench_faults_worker``. What each does and measures: ``monitor.bench_faults``."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.bench_faults import (
    DISPATCH_INTERVAL_S,
    SECRET,
    FaultBenchOptions,
    Receiver,
    Tap,
    measure,
    wait_until,
)
from monitor.bench_service import _texts
from monitor.localservices import Broker, Postgres, ThreadedServer
from monitor.service.app import create_app
from monitor.service.db import Alert, Outbox, make_engine, upgrade, utcnow
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings, WebhookConfig

RETRY_S = 0.25  # a client's pause before it retries a turn


def run_scenario(
    name: str, monitored: Monitored, cluster: Postgres, opts: FaultBenchOptions
) -> dict[str, Any]:
    """One scenario on its own broker and tenant; PostgreSQL is running again afterwards."""
    from monitor.bench_faults_worker import worker_scenario

    deadline = time.monotonic() + opts.timeout_s
    engine = make_engine(cluster.url)
    upgrade(engine)
    broker = Broker()
    broker.start()
    receiver = Receiver() if name == "webhook" else None
    settings = ServiceSettings(
        database_url=cluster.url,
        kafka_bootstrap=broker.bootstrap,
        dispatch_interval_s=DISPATCH_INTERVAL_S,
        webhooks=[]
        if receiver is None
        else [WebhookConfig(name="bench", url=receiver.url, secrets=[SECRET])],
        retention_interval_s=0,
    )
    tap = Tap(broker.bootstrap, settings.alerts_topic)
    tenant = f"faults-{name}-{uuid.uuid4().hex[:6]}"
    run = Run(name, tenant, engine, broker, tap, cluster, settings, opts, deadline)
    try:
        return worker_scenario(run) if name == "worker" else _http(run, monitored, receiver)
    finally:
        if receiver is not None:
            receiver.down()
        tap.close()
        broker.stop()
        cluster.start()
        engine.dispose()


@dataclass
class Run:
    """A scenario's services, tenant and deadline, and what it reports beyond the counts."""

    name: str
    tenant: str
    engine: Engine
    broker: Broker
    tap: Tap
    cluster: Postgres
    settings: ServiceSettings
    opts: FaultBenchOptions
    deadline: float
    extra: dict[str, Any] = field(default_factory=dict)

    def pause(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def result(
        self, recovered: Callable[[], bool], counts: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Wait (from now: the fault is healed) until ``recovered``; the report."""
        healed = time.monotonic()
        done = wait_until(recovered, self.deadline)
        recovery_s = round(time.monotonic() - healed, 2) if done else None
        time.sleep(1.0)  # late copies (at-least-once re-sends) are counted too
        report = {"name": self.name, **counts(), "recovery_s": recovery_s, "timed_out": not done}
        return {**report, **self.extra}


class HttpLoad:
    """Turns sent to ``POST /v1/turns`` by ``clients`` threads, each retried every ``RETRY_S``
    (5xx, transport errors) with its Idempotency-Key until answered 200 or ``deadline``."""

    def __init__(self, url: str, key: str, run: Run) -> None:
        self.url, self.tag, self.deadline = url, run.tenant, run.deadline
        self.conversations = _texts(run.opts.turns)
        self.auth = {"Authorization": f"Bearer {key}"}
        self.acked: set[str] = set()  # source ids of the turns answered 200
        self.errors: Counter[str] = Counter()  # what the clients got instead, by status
        self._lock = threading.Lock()
        clients = run.opts.clients
        self._client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=clients))
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._send, i) for i in range(run.opts.turns)]

    def _send(self, i: int) -> None:
        source = f"{self.tag}-{i}"
        body = {"conversation_id": source, "messages": self.conversations[i]}
        headers = {**self.auth, "Idempotency-Key": source}
        while time.monotonic() < self.deadline:
            try:
                r = self._client.post(self.url, json=body, headers=headers)
                error = None if r.status_code == 200 else str(r.status_code)
            except httpx.TransportError as exc:
                r, error = None, type(exc).__name__
            with self._lock:
                if error is None:
                    self.acked.add(f"http:{source}")
                    return
                self.errors[error] += 1
            if r is not None and r.status_code < 500:
                return  # refused: a retry would be refused too
            time.sleep(RETRY_S)

    def finished(self) -> bool:
        return all(f.done() for f in self._futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


def _http(run: Run, monitored: Monitored, receiver: Receiver | None) -> dict[str, Any]:
    """Half the load answered, the fault for ``down_s`` (and, where clients do not wait on the
    faulty part, until the load is done), healed, then until recovered."""
    server = ThreadedServer(create_app(run.settings, [monitored])).start()
    with Session(run.engine) as session:
        key = create_key(session, run.tenant, "ingest")
        session.commit()
    load = HttpLoad(f"{server.url}/v1/turns", key, run)
    killed: dt.datetime | None = None
    try:
        wait_until(lambda: 2 * len(load.acked) >= run.opts.turns, run.deadline)
        if run.name == "broker":
            killed = _kill_broker(run)
        elif run.name == "postgres":
            run.cluster.stop("fast")
        elif receiver is not None:
            receiver.down()
        down = time.monotonic()
        run.pause(run.opts.down_s)
        if run.name != "postgres":  # clients do not wait on the broker or the receiver
            wait_until(load.finished, run.deadline)  # the fault outlasts the load: a backlog
        run.extra["outage_s"] = round(time.monotonic() - down, 2)
        if run.name == "broker":
            run.broker.start()
        elif run.name == "postgres":
            run.cluster.start()
        elif receiver is not None:
            receiver.up()

        def counts() -> dict[str, Any]:
            delivered = None if receiver is None else list(receiver.delivered)
            m = measure(run.engine, run.tenant, set(load.acked), list(run.tap.seen), delivered)
            if killed is not None:
                m["lost_in_broker"] = _lost_in_broker(run, killed)
            m["http_errors"] = dict(load.errors)
            return m

        def recovered() -> bool:
            m = counts()
            published = m["alerts_published"] + m.get("lost_in_broker", 0)
            everything = m["stored"] == m["acknowledged"] == run.opts.turns
            return load.finished() and everything and published == m["alerts"]

        return run.result(recovered, counts)
    finally:
        load.close()
        server.stop()


def _outbox(run: Run) -> dict[str, dt.datetime | None]:
    """The tenant's outbox: alert id -> when it was marked published (None: not yet)."""
    query = (
        select(Outbox.alert_id, Outbox.published_at)
        .join(Alert, Alert.id == Outbox.alert_id)
        .where(Alert.tenant == run.tenant)
    )
    with Session(run.engine) as session:
        return {a: t for a, t in session.execute(query)}


def _kill_broker(run: Run) -> dt.datetime:
    """SIGKILL the broker between two publications: once every alert so far is published and
    read back by the topic reader (what it had not read would die with Tansu's in-memory log,
    an artefact of the test broker). The reader starts over on the next broker."""

    def quiet() -> bool:
        outbox = _outbox(run)
        return None not in outbox.values() and set(outbox) <= set(run.tap.seen)

    wait_until(quiet, min(run.deadline, time.monotonic() + 5), every=0.01)
    killed = utcnow()
    assert run.broker.proc is not None
    run.broker.proc.kill()
    run.broker.proc.wait()
    run.broker.proc = None
    run.tap.restart()
    return killed


def _lost_in_broker(run: Run, killed: dt.datetime) -> int:
    acked = {a for a, t in _outbox(run).items() if t is not None and t < killed}
    return len(acked - set(run.tap.seen))
