"""The Kafka worker's HTTP port (``safety-monitor worker --port P``) on a real broker and
PostgreSQL: ``/healthz``; ``/readyz`` 200 while it consumes, 503 before it holds partitions and
while the database is down; ``/metrics`` with the turns it stored, its messages by outcome and
the lag of each partition (the turns it holds back during an outage included); a turn it
ingested on the service-health dashboard through a real Prometheus; and the deploy files that
open, probe and scrape the port."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from samples import PLAIN, SCAM
from test_dashboards import ALL, PIPELINE, SCRAPE_S, _Prometheus, _wait, expand_promql
from test_worker import count_turns, produce, turn
from typer.testing import CliRunner

from monitor.bench_faults_worker import _worker_command
from monitor.cli import app as cli
from monitor.dashboards import build_all
from monitor.localservices import Broker, Postgres, ThreadedServer, free_port
from monitor.service.db import make_engine, upgrade
from monitor.service.runtime import Runtime
from monitor.service.settings import ServiceSettings
from monitor.service.worker import Worker
from monitor.service.worker_api import worker_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WORKER_PORT = 8001  # the port the deploy files give the worker


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` in an exposition: sorted labels -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def lag(text: str) -> dict[str, float]:
    """Partition -> lag from the worker's exposition."""
    got = samples(text, "safety_monitor_worker_consumer_lag")
    return {dict(labels)["partition"]: value for labels, value in got.items()}


def traffic(tenant: str, conversation: str, messages: list[dict[str, str]]) -> bytes:
    return json.dumps(
        {"tenant": tenant, "conversation_id": conversation, "messages": messages}
    ).encode()


# --- the deploy files ---------------------------------------------------------------------


def test_deploy_files_open_probe_and_scrape_the_worker_port() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    worker = compose["sidecar-worker"]
    command = worker["command"]
    assert command == ["worker", "--host", "0.0.0.0", "--port", str(WORKER_PORT)]
    assert CliRunner().invoke(cli, [*command, "--help"]).exit_code == 0
    assert "ports" not in worker, "scaled workers publish no host port"
    check = " ".join(worker["healthcheck"]["test"])
    assert f"http://127.0.0.1:{WORKER_PORT}/readyz" in check
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "safety-monitor-worker"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["sidecar-worker"]
    assert job["dns_sd_configs"][0]["port"] == WORKER_PORT

    (doc,) = [
        d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "30-worker-deployment.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    pod = doc["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["worker", "--host", "0.0.0.0", "--port", str(WORKER_PORT)]
    (port,) = container["ports"]
    assert port["containerPort"] == WORKER_PORT
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(WORKER_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {k: p["path"] for k, p in probes.items()} == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert all(p["port"] == port["name"] for p in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "the model loads first"


# --- the real worker ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_worker_command_serves_probes_metrics_and_the_dashboard(
    pg_url: str, broker: Broker, tmp_path: Path
) -> None:
    """``safety-monitor worker --port P`` as deployed: probes, its /metrics, and the turns it
    ingests on the service-health dashboard's panels through a real Prometheus."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "SAFETY_MONITOR_DATABASE_URL": pg_url,
        "SAFETY_MONITOR_KAFKA_BOOTSTRAP": broker.bootstrap,
        "SAFETY_MONITOR_WORKER_GROUP": f"g-{tenant}",
        "SAFETY_MONITOR_WORKER_SESSION_TIMEOUT_MS": "2000",
        "SAFETY_MONITOR_WEBHOOKS": "[]",
    }
    engine = make_engine(pg_url)
    upgrade(engine)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*_worker_command(), "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    prom: _Prometheus | None = None

    def answers(path: str, status: int) -> Callable[[], bool]:
        def check() -> bool:
            assert proc.poll() is None, f"the worker exited: {log_path.read_text()[-3000:]}"
            try:
                return http.get(path).status_code == status
            except httpx.HTTPError:
                return False

        return check

    try:
        started = time.time()
        prom = _Prometheus(tmp_path, f"127.0.0.1:{port}")
        p = prom
        _wait("the worker's /healthz (the model loads first)", answers("/healthz", 200), 300)
        assert http.get("/healthz").json() == {"status": "ok"}
        _wait("the worker's /readyz (partitions assigned)", answers("/readyz", 200), 120)
        ready = http.get("/readyz").json()
        assert ready["ready"] is True and ready["checks"]["background"] == "ok", ready

        # Warm-up: the turn series exist and are scraped once before the measured traffic.
        produce(broker.bootstrap, [traffic(tenant, "w0", SCAM)])
        _wait(
            "Prometheus to see the first turn",
            lambda: p.value("sum(safety_monitor_turns_total)") == 1,
            120,
        )
        produce(
            broker.bootstrap,
            [
                traffic(tenant, "c1", SCAM),
                traffic(tenant, "c2", PLAIN),
                traffic(tenant, "c3", PLAIN),
            ],
        )
        _wait("the worker to store the turns", lambda: count_turns(engine, tenant) == 4, 180)

        # Its own /metrics: the turns, the messages, and no lag once all are handled.
        def caught_up() -> bool:
            return set(lag(http.get("/metrics").text).values()) == {0.0}

        _wait("the lag gauges to read 0", caught_up, 30)
        text = http.get("/metrics").text
        assert samples(text, "safety_monitor_turns_total") == {(("pipeline", PIPELINE),): 4.0}
        messages = samples(text, "safety_monitor_worker_messages_total")
        assert messages == {(("outcome", "stored"),): 4.0}, messages
        assert lag(text), "a lag gauge for each partition the worker holds"
        assert samples(text, "safety_monitor_database_up") == {(): 1.0}
        assert samples(text, "safety_monitor_alerts_total"), "the scam turn alerted"

        # Through Prometheus, the dashboard's queries as Grafana sends them.
        def scraped() -> bool:
            return (
                p.value("sum(safety_monitor_turns_total)") == 4
                and p.value('sum(safety_monitor_worker_messages_total{outcome="stored"})') == 4
                and p.value("max(safety_monitor_worker_consumer_lag)") == 0
            )

        _wait("Prometheus to scrape the final counts", scraped, 30)
        time.sleep(2 * SCRAPE_S)  # one more sample after the last change, for the rates
        now = time.time()
        window = math.ceil(now - started) + 5
        rate_window = max(window + SCRAPE_S, 4 * SCRAPE_S)
        doc = build_all()["service-health.json"]
        panels = {panel["title"]: panel for panel in doc["panels"]}
        sel: dict[str, str | list[str]] = {"pipeline": ALL, "detector": ALL}

        def one(title: str, **labels: str) -> float:
            expr = expand_promql(panels[title]["targets"][0]["expr"], doc, sel, f"{window}s", 1.0)
            rows = [r for r in p.query(expr, at=now) if labels.items() <= r["metric"].items()]
            assert len(rows) == 1, (title, labels, expr, rows)
            return float(rows[0]["value"][1])

        turns_rate = one("Turns / s")
        assert 0.8 * 3 <= turns_rate * rate_window <= 1.5 * 3, turns_rate
        assert one("Turns per second by model", pipeline=PIPELINE) == turns_rate
        assert one("Tokens / s") > 0
        assert one("Alerts per minute by detector", detector="scam_email") > 0
        assert one("Worker messages per minute", outcome="stored") > 0
        for partition in lag(text):
            assert one("Consumer lag by partition", partition=partition) == 0
        assert one("Resident memory") > 50e6, "the worker's process panels show it too"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        assert "worker stopped: 4 turns stored, 0 dead-lettered" in log_path.read_text()
    finally:
        http.close()
        if prom is not None:
            prom.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        engine.dispose()


@pytest.mark.slow
@pytest.mark.integration
def test_readyz_and_lag_follow_a_database_outage(monitored: Any, broker: Broker) -> None:
    """The worker's app over a worker in this process, PostgreSQL stopped while turns arrive:
    /readyz is 503 before the worker polls, 200 while it consumes, 503 (database unreachable,
    the consumer holding its partitions) during the outage, while /metrics counts the held
    turns as lag; 200 and no lag once the database is back and the turns are stored."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    cluster = Postgres()
    cluster.start()
    server: ThreadedServer | None = None
    try:
        settings = ServiceSettings(
            database_url=cluster.url,
            kafka_bootstrap=broker.bootstrap,
            worker_session_timeout_ms=2000,
        )
        engine = make_engine(cluster.url)
        upgrade(engine)
        runtime = Runtime(settings, [monitored])
        w = Worker(runtime)
        w.lag_interval_s = 0.5
        server = ThreadedServer(worker_app(runtime)).start(timeout=60)
        http = httpx.Client(base_url=server.url, timeout=10)

        def readyz() -> tuple[int, dict[str, Any]]:
            r = http.get("/readyz")
            body: dict[str, Any] = r.json()
            return r.status_code, body

        def metrics() -> str:
            return http.get("/metrics").text

        status, body = readyz()
        assert status == 503 and "consumer: starting" in body["checks"]["background"], body
        assert http.get("/healthz").status_code == 200
        assert http.get("/docs").status_code == 404, "the worker serves no API"

        t = threading.Thread(target=w.run)
        t.start()
        try:
            produce(broker.bootstrap, [turn(tenant, 0)])
            _wait("the first turn", lambda: count_turns(engine, tenant) == 1, 120)
            _wait("/readyz 200", lambda: readyz()[0] == 200, 60)
            _wait("no lag", lambda: set(lag(metrics()).values()) == {0.0}, 30)

            cluster.stop()
            produce(broker.bootstrap, [turn(tenant, i) for i in range(1, 4)])
            _wait("the worker to hold the turns", lambda: w.waiting_for_database, 120)
            status, body = readyz()
            assert status == 503, body
            assert body["checks"]["database"].startswith("unreachable"), body
            assert "consumer: holding its partitions" in body["checks"]["background"], body
            _wait("the held turns counted as lag", lambda: sum(lag(metrics()).values()) == 3, 30)
            text = metrics()
            errors = samples(text, "safety_monitor_worker_errors_total")
            assert errors.get((("reason", "database"),), 0) >= 1, errors
            assert samples(text, "safety_monitor_database_up") == {(): 0.0}
            assert t.is_alive(), "the worker rides out the outage"

            cluster.start()
            _wait("the held turns stored", lambda: count_turns(engine, tenant) == 4, 120)
            _wait("/readyz 200 again", lambda: readyz()[0] == 200, 60)
            _wait("no lag again", lambda: set(lag(metrics()).values()) == {0.0}, 30)
            messages = samples(metrics(), "safety_monitor_worker_messages_total")
            assert messages == {(("outcome", "stored"),): 4.0}, messages
        finally:
            w.stop()
            t.join(timeout=60)
        status, body = readyz()
        assert status == 503 and "consumer: stopped" in body["checks"]["background"], body
        http.close()
        runtime.close()
        engine.dispose()
    finally:
        if server is not None:
            server.stop()
        cluster.close()


def test_worker_metrics_are_labelled_so_the_api_exposes_no_samples_of_them() -> None:
    """The worker's metrics live on the shared registry; the API (which never sets them)
    exposes their help and type only, so its scrapes add no worker series."""
    from prometheus_client import generate_latest

    from monitor.service.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    for name in (
        "safety_monitor_worker_messages_total",
        "safety_monitor_worker_errors_total",
        "safety_monitor_worker_consumer_lag",
    ):
        assert f"# TYPE {re.sub('_total$', '', name)}" in text, name
        assert not samples(text, name), name
    m = Metrics()
    m.observe_lag("llm.traffic", {0: 5, 1: 0})
    m.observe_lag("llm.traffic", {1: 2})  # partition 0 went to another worker
    assert lag(generate_latest(m.registry).decode()) == {"1": 2.0}
