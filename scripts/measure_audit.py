"""Backtest, export and audit UI speed on a stored history (SQLite in a temporary folder).

Stores the bundled replay traffic REPS times through the batch API, then times a backtest of a
rule (scored from the stored features) against a dense probe (whose turns are re-encoded), and a
JSONL export of every turn. Then the audit UI's alert list on 1,000 open alerts (target: under
300 ms server time): those alerts are inserted as ``Alert`` rows (each on its own ``Turn``) with
the service's db models, not made through the API (1,000 firing turns through the model would
take minutes), into a fresh database of their own; a logged-in UI session (POST /ui/login, as
the tests do) then GETs ``/ui/alerts?status=open`` and the inbox (``&sort=severity``) RUNS times
each; the server time is the wall time around each in-process TestClient call (no network),
median reported. Last, the Triage bar's "apply to all matching" acknowledges every one of those
alerts in one POST (once: it changes them), timed the same way. ``ui --postgres`` runs the UI
part on a throwaway PostgreSQL cluster (``monitor.localservices.postgres``; ``DATABASE_URL``
when set) instead of SQLite. Prints JSON.

Usage: .venv/bin/python scripts/measure_audit.py [REPS]     (everything; loads the model)
       .venv/bin/python scripts/measure_audit.py ui [--postgres] [N] [RUNS]  (the UI only)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from monitor.service.app import create_app
from monitor.service.audit import AuditFilter
from monitor.service.backtest import backtest, candidate_from_catalog
from monitor.service.db import Alert, Turn, utcnow
from monitor.service.keys import create_key
from monitor.service.monitored import load_monitored
from monitor.service.settings import PipelineConfig, ServiceSettings

UI_TARGET_MS = 300.0
DETECTORS = ("scam_email", "deception", "prompt_injection", "scam_email_dense_probe")
SEVERITIES = ("info", "low", "medium", "high", "critical")


def ui_open_alerts(
    n_alerts: int = 1000, runs: int = 20, database_url: str | None = None
) -> dict[str, object]:
    """Median server time of the audit UI's alert list and inbox on ``n_alerts`` open alerts,
    then of one bulk acknowledgement of them all (a fresh SQLite file unless ``database_url``)."""
    import datetime as dt
    import re
    import uuid

    url = database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'ui.db'}"
    settings = ServiceSettings(database_url=url, retention_interval_s=0)
    app = create_app(settings, [])  # no pipeline: the list reads the database only
    with TestClient(app, base_url="https://testserver") as client:
        sessions = sessionmaker(client.app.state.monitor.engine)  # type: ignore[attr-defined]
        now = utcnow()
        with sessions() as session:
            key = create_key(session, "inbox", "triage")
            for i in range(n_alerts):
                at = now - dt.timedelta(seconds=30 * i)
                turn = Turn(
                    id=str(uuid.uuid4()),
                    tenant="inbox",
                    conversation_id=f"conv-{i // 3}",
                    pipeline="smollm2-135m-instruct",
                    created_at=at,
                    messages=[{"role": "user", "content": "Claim your prize now " * 20}],
                    search_text="claim your prize now",
                    meta={},
                    n_tokens=120,
                    dropped=0,
                )
                session.add(turn)
                session.flush()  # the turn before its alert (no ORM relationship orders them)
                features = [
                    {"index": 100 + j, "label": f"feature {j}", "value": 2.0, "cutoff": 1.0}
                    for j in range(5)
                ]
                tokens = [
                    {"position": p, "token_id": 1000 + p, "feature": 100, "activation": 1.5}
                    for p in range(20)
                ]
                session.add(
                    Alert(
                        id=str(uuid.uuid4()),
                        turn_id=turn.id,
                        tenant="inbox",
                        conversation_id=turn.conversation_id,
                        pipeline=turn.pipeline,
                        detector=DETECTORS[i % len(DETECTORS)],
                        kind="rule",
                        severity=SEVERITIES[i % len(SEVERITIES)],
                        score=1.5,
                        summary="scam_email fired: prize, money, urgency",
                        created_at=at,
                        evidence={"features": features, "tokens": tokens},
                    )
                )
            session.commit()
        r = client.post("/ui/login", data={"key": key}, follow_redirects=False)
        assert r.status_code == 303, r.text
        out: dict[str, object] = {
            "database": url.split(":", 1)[0],
            "open_alerts": n_alerts,
            "runs": runs,
            "target_ms": UI_TARGET_MS,
        }
        for name, path in (
            ("alerts_open", "/ui/alerts?status=open"),
            ("inbox", "/ui/alerts?status=open&sort=severity"),
        ):
            client.get(path).raise_for_status()  # warm: templates compiled, caches filled
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
            assert str(n_alerts) in r.text
            median_ms = statistics.median(times) * 1000
            out[name] = {
                "median_ms": round(median_ms, 1),
                "max_ms": round(max(times) * 1000, 1),
                "bytes": len(r.content),
                "under_target": median_ms < UI_TARGET_MS,
            }
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text)
        assert csrf is not None
        form = {"csrf": csrf.group(1), "scope": "filter", "filter": "status=open"}
        t0 = time.perf_counter()
        r = client.post(
            "/ui/alerts/triage",
            data={**form, "expect": n_alerts, "status": "acknowledged", "assign": "me"},
            follow_redirects=False,
        )
        took = time.perf_counter() - t0
        assert r.status_code == 303, r.text
        with sessions() as session:
            acked = session.scalar(
                select(func.count()).select_from(Alert).where(Alert.status == "acknowledged")
            )
        assert acked == n_alerts, acked
        out["bulk_acknowledge_all"] = {"alerts": n_alerts, "ms": round(took * 1000, 1)}
    return out


def main(reps: int) -> dict[str, object]:
    db = Path(tempfile.mkdtemp()) / "monitor.db"
    settings = ServiceSettings(database_url=f"sqlite:///{db}", retention_interval_s=0)
    monitored = load_monitored(PipelineConfig(name="smollm2-135m-instruct"), settings)
    text = (resources.files("monitor") / "data" / "traffic.jsonl").read_text()
    sample = [json.loads(line) for line in text.splitlines() if line.strip()]
    turns = [
        {**t, "conversation_id": f"{t['conversation_id']}-{i}"} for i in range(reps) for t in sample
    ]
    with TestClient(create_app(settings, [monitored])) as client:
        sessions = sessionmaker(client.app.state.monitor.engine)  # type: ignore[attr-defined]
        with sessions() as session:
            key = create_key(session, "measure", "admin")
            session.commit()
        headers = {"Authorization": f"Bearer {key}"}
        for lo in range(0, len(turns), 100):
            chunk = {"turns": turns[lo : lo + 100]}
            client.post("/v1/turns/batch", headers=headers, json=chunk).raise_for_status()
        deadline = time.monotonic() + 3600
        while True:
            with sessions() as session:
                stored = session.scalar(select(func.count()).select_from(Turn)) or 0
                tokens = session.scalar(select(func.sum(Turn.n_tokens))) or 0
            if stored >= len(turns):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the batch was not evaluated within an hour")
            time.sleep(1)
        out: dict[str, object] = {"turns": stored, "tokens": int(tokens)}
        for detector in ("scam_email", "scam_email_dense_probe"):
            candidate = candidate_from_catalog(monitored, detector)
            times, report = [], {}
            for _ in range(3):
                t0 = time.perf_counter()
                report = backtest(sessions, monitored, candidate, AuditFilter("measure"))
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            out[detector] = {
                "median_s": round(median, 3),
                "turns_per_s": round(stored / median, 1),
                **{k: report[k] for k in ("from_storage", "reencoded", "new", "current")},
            }
        t0 = time.perf_counter()
        r = client.get("/v1/export/turns", headers=headers)
        seconds = round(time.perf_counter() - t0, 3)
        out["export_turns_jsonl"] = {
            "seconds": seconds,
            "bytes": len(r.content),
            "rows": r.text.count("\n"),
        }
    out["ui_open_alerts"] = ui_open_alerts()
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["ui"]:
        numbers = [int(a) for a in args[1:] if a != "--postgres"]
        n_alerts, runs = [*numbers, 1000, 20][:2]
        if "--postgres" in args:
            from monitor.localservices import postgres

            with postgres() as pg_url:
                result = ui_open_alerts(n_alerts, runs, database_url=pg_url)
        else:
            result = ui_open_alerts(n_alerts, runs)
    else:
        result = main(int(args[0]) if args else 12)
    print(json.dumps(result, indent=1))
