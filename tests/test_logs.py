"""Structured logs: the real command line as a subprocess, its stderr a pipe (as under a
container runtime or systemd), every line one JSON object; text when asked."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from samples import start_serve, wait_ready

from monitor.localservices import free_port
from monitor.logs import JsonFormatter, request_id_from

CLI = str(Path(sys.executable).parent / "safety-monitor")
SENTINEL = "zebra-sentinel-quokka"  # turn text that must appear in no log line


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SAFETY_MONITOR_LOG_FORMAT"}
    return {**env, "SAFETY_MONITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}", **extra}


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of stderr as a JSON object with the four fields every line has."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    docs = []
    for line in lines:
        doc = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(doc, dict), line
        assert {"ts", "level", "logger", "message"} <= doc.keys(), line
        ts = dt.datetime.fromisoformat(doc["ts"])
        assert ts.utcoffset() == dt.timedelta(0), line
        docs.append(doc)
    return docs


def test_a_command_logs_json_lines_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    proc = subprocess.run(
        [CLI, "db", "upgrade"],
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    docs = json_lines(proc.stderr)
    assert any(d["logger"].startswith("alembic") and d["level"] == "INFO" for d in docs)
    assert all("request_id" not in d for d in docs)  # no request, no request fields


def test_text_when_asked_and_an_unknown_format_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [CLI, "db", "upgrade"],
        env=env_for(tmp_path, SAFETY_MONITOR_LOG_FORMAT="text"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(not line.lstrip().startswith("{") for line in lines)
    assert any(line.startswith("INFO ") for line in lines)
    bad = subprocess.run(
        [CLI, "db", "upgrade"],
        env=env_for(tmp_path, SAFETY_MONITOR_LOG_FORMAT="yaml"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2
    assert "SAFETY_MONITOR_LOG_FORMAT must be one of auto, json, text" in bad.stderr


def test_json_formatter_exception_and_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "monitor.x", logging.ERROR, __file__, 1, "two\nlines %s", ("é",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    doc = json.loads(line)
    assert doc["message"] == "two\nlines é" and doc["level"] == "ERROR"
    assert doc["logger"] == "monitor.x" and "RuntimeError: boom" in doc["exc"]


def test_request_ids_are_sanitised_and_bounded() -> None:
    assert request_id_from(b"abc-123_x.y:z") == "abc-123_x.y:z"
    assert request_id_from(b'a b"\r\n<c>') == "abc"
    assert len(request_id_from(b"x" * 10_000)) == 128
    made = request_id_from(None)
    assert len(made) == 32 and made != request_id_from(b"")
    assert len(request_id_from(b"\xff ")) == 32  # nothing usable left: a new one


@pytest.mark.slow
def test_serve_logs_json_with_request_tenant_and_turn(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    made = subprocess.run(
        [CLI, "keys", "create", "--tenant", "acme", "--role", "admin", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    key = json.loads(made.stdout)["key"]
    auth = {"Authorization": f"Bearer {key}"}
    port = free_port()
    server, base = start_serve(CLI, env, port, stderr=subprocess.PIPE)
    try:
        wait_ready(server, base)
        turn = {"conversation_id": "c1", "messages": [{"role": "user", "content": SENTINEL}]}
        r = httpx.post(
            f"{base}/v1/turns",
            json=turn,
            timeout=60,
            headers={**auth, "X-Request-Id": "req-42 <script>"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "req-42script"
        turn_id = r.json()["turn_id"]
        searched = httpx.get(
            f"{base}/v1/conversations", params={"q": SENTINEL}, headers=auth, timeout=30
        )
        assert searched.status_code == 200, searched.text
        made_id = searched.headers["x-request-id"]
        assert len(made_id) == 32
        refused = httpx.get(f"{base}/v1/alerts", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401 and refused.headers["x-request-id"]
    finally:
        server.terminate()
        stderr = server.communicate(timeout=30)[1]
    assert SENTINEL not in stderr  # neither the turn's text nor the search's
    docs = json_lines(stderr)
    assert any(d["logger"] == "uvicorn.error" for d in docs)  # uvicorn's own lines too
    assert any(d["level"] == "WARNING" and "Kafka publishing is off" in d["message"] for d in docs)
    access = {d.get("request_id"): d for d in docs if d["logger"] == "uvicorn.access"}
    posted = access["req-42script"]
    assert posted["method"] == "POST" and posted["path"] == "/v1/turns"
    assert posted["status"] == 200 and "POST /v1/turns" in posted["message"]
    assert posted["tenant"] == "acme" and posted["turn_id"] == turn_id
    search = access[made_id]
    assert search["path"] == "/v1/conversations" and "?" not in search["message"]
    assert search["tenant"] == "acme" and "turn_id" not in search
    denied = access[refused.headers["x-request-id"]]
    assert denied["status"] == 401 and "tenant" not in denied
