"""The service as an operator runs it: `db upgrade`, `keys create`, `serve` as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from samples import start_serve, wait_ready

from monitor.localservices import free_port

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "safety-monitor")


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SAFETY_MONITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "COLUMNS": "200",
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_db_upgrade_and_keys(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    proc = run(env, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert "schema is current" in proc.stdout
    assert run(env, "db", "upgrade").returncode == 0  # idempotent
    proc = run(env, "keys", "create", "--tenant", "acme", "--role", "read", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["key"].startswith("smk_") and doc["tenant"] == "acme" and doc["role"] == "read"
    bad = run(env, "keys", "create", "--tenant", "acme", "--role", "boss")
    assert bad.returncode == 2 and "role must be one of ingest, read, triage, admin" in bad.stderr
    listed = json.loads(run(env, "keys", "list", "--json").stdout)
    assert [(k["prefix"], k["revoked_at"]) for k in listed] == [(doc["key"][:10], None)]
    assert run(env, "keys", "revoke", doc["key"]).returncode == 0
    assert json.loads(run(env, "keys", "list", "--json").stdout)[0]["revoked_at"] is not None
    again = run(env, "keys", "revoke", doc["key"])
    assert again.returncode == 2 and "no live key" in again.stderr
    broken = {**env, "SAFETY_MONITOR_MAX_BODY_BYTES": "12"}
    proc = run(broken, "db", "upgrade")
    assert proc.returncode == 2 and "max_body_bytes" in proc.stderr


def test_serve_answers_on_loopback(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    key = json.loads(
        run(env, "keys", "create", "--tenant", "t", "--role", "admin", "--json").stdout
    )["key"]
    port = free_port()
    server, base = start_serve(CLI, env, port, stderr=subprocess.STDOUT)
    try:
        wait_ready(server, base)
        turn = {"conversation_id": "c1", "messages": [{"role": "user", "content": "Hello!"}]}
        r = httpx.post(
            f"{base}/v1/turns", json=turn, timeout=60, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200, r.text
        assert {v["detector"] for v in r.json()["verdicts"]} >= {"scam_email", "deception"}
        assert "safety_monitor_turns_total" in httpx.get(f"{base}/metrics").text
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "Kafka publishing is off" in output


def test_replay_once_prints_alerts_and_exits(tmp_path: Path) -> None:
    env = {**os.environ, "SAFETY_MONITOR_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    env.pop("SAFETY_MONITOR_DATABASE_URL", None)
    proc = subprocess.run(
        [CLI, "replay", "--once", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "alerts from 17 replayed turns" in proc.stdout
    assert "scam_email" in proc.stdout and "sycophancy" in proc.stdout
    assert (tmp_path / "monitor.db").is_file(), "embedded default: SQLite in the data dir"


def test_bench_service_reports_the_ratio(tmp_path: Path) -> None:
    env = {**os.environ, "SAFETY_MONITOR_DATA_DIR": str(tmp_path)}
    for name in ("SAFETY_MONITOR_DATABASE_URL", "SAFETY_MONITOR_KAFKA_BOOTSTRAP"):
        env.pop(name, None)
    proc = subprocess.run(
        [CLI, "bench", "--service", "--turns", "8", "--clients", "4", "--repeats", "1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["turns"] == 8 and doc["tokens"] > 0 and doc["database"] == "postgresql"
    assert 0 < doc["service_ratio"] < 2
    assert 0 < doc["latency_p50_s_half_load"] <= doc["latency_p99_s_half_load"]
