"""Backtest and export speed on a stored history (SQLite in a temporary folder).

Stores the bundled replay traffic REPS times through the batch API, then times a backtest of a
rule (scored from the stored features) against a dense probe (whose turns are re-encoded), and a
JSONL export of every turn. Prints JSON. Usage: .venv/bin/python scripts/measure_audit.py [REPS]
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
from monitor.service.db import Turn
from monitor.service.keys import create_key
from monitor.service.monitored import load_monitored
from monitor.service.settings import PipelineConfig, ServiceSettings


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
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 12), indent=1))
