"""The worker scenario of ``bench --faults``: turns on the traffic topic, a ``safety-monitor
worker`` process SIGKILLed while it handles a poll and started again (``monitor.bench_faults``
says what is measured)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.bench_faults import measure, wait_until
from monitor.bench_service import _texts
from monitor.localservices import read_topic
from monitor.service.db import Turn

if TYPE_CHECKING:
    from monitor.bench_faults_scenarios import Run

READY = "worker in group"  # the worker's log line once it is loaded and consuming


def worker_scenario(run: Run) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    topic, turns = run.settings.traffic_topic, run.opts.turns
    batch = max(2, turns // 2)  # records per poll: a kill lands inside one
    acked = _produce(run, topic)
    group = f"bench-faults-{uuid.uuid4().hex[:8]}"
    logs = Path(tempfile.mkdtemp(prefix="sm-faults-"))
    env = {
        **os.environ,
        "SAFETY_MONITOR_DATABASE_URL": run.cluster.url,
        "SAFETY_MONITOR_KAFKA_BOOTSTRAP": run.broker.bootstrap,
        "SAFETY_MONITOR_ALERTS_TOPIC": run.settings.alerts_topic,
        "SAFETY_MONITOR_TRAFFIC_TOPIC": topic,
        "SAFETY_MONITOR_WORKER_GROUP": group,
        "SAFETY_MONITOR_WORKER_MAX_POLL_RECORDS": str(batch),
        "SAFETY_MONITOR_DISPATCH_INTERVAL_S": str(run.settings.dispatch_interval_s),
        "SAFETY_MONITOR_WEBHOOKS": "[]",
    }
    probe = KafkaConsumer(bootstrap_servers=run.broker.bootstrap, group_id=group)
    parts = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic)]
    workers = [_spawn(env, logs / "worker-1.log")]

    def stored() -> int:
        with Session(run.engine) as session:
            n = session.scalar(
                select(func.count()).select_from(Turn).where(Turn.tenant == run.tenant)
            )
        return int(n or 0)

    def uncommitted() -> int:
        return stored() - sum(probe.committed(tp) or 0 for tp in parts)

    def mid_batch() -> bool:
        """Turns of a poll stored, its offsets not committed yet; failing that, a poll in
        hand after the first (or the worker gone on its own: its log says why)."""
        if workers[0].poll() is not None:
            return True
        n = stored()
        return n > 0 and (uncommitted() > 0 or batch <= n < turns)

    try:
        wait_until(mid_batch, run.deadline, every=0.01)
        workers[0].kill()
        workers[0].wait()
        down = time.monotonic()
        run.extra["stored_at_kill"] = stored()
        run.extra["uncommitted_at_kill"] = uncommitted()
        run.pause(run.opts.down_s)
        workers.append(_spawn(env, logs / "worker-2.log"))
        spawned = time.monotonic()
        run.extra["outage_s"] = round(spawned - down, 2)

        def counts() -> dict[str, Any]:
            return measure(run.engine, run.tenant, acked, list(run.tap.seen))

        def recovered() -> bool:
            if "worker_ready_s" not in run.extra and READY in (logs / "worker-2.log").read_text():
                run.extra["worker_ready_s"] = round(time.monotonic() - spawned, 2)
            m = counts()
            everything = m["stored"] == m["acknowledged"] == turns
            return bool(everything and m["alerts_published"] == m["alerts"])

        result = run.result(recovered, counts)
        result["dead_lettered"] += len(read_topic(run.broker.bootstrap, f"{topic}.dlq", wait_s=2.0))
        if result["timed_out"]:  # what the workers said, to see why
            for i in range(len(workers)):
                result[f"worker_{i + 1}_log"] = (logs / f"worker-{i + 1}.log").read_text()[-2000:]
        return result
    finally:
        probe.close()
        for w in workers:
            _stop(w)
        shutil.rmtree(logs, ignore_errors=True)


def _produce(run: Run, topic: str) -> set[str]:
    """The load on the traffic topic; the turn ids the broker acknowledged (acks=all)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=run.broker.bootstrap, acks="all")
    sent = {}
    for i, messages in enumerate(_texts(run.opts.turns)):
        turn_id, conversation = f"{run.tenant}-{i}", f"{run.tenant}-c{i}"
        doc = {"tenant": run.tenant, "turn_id": turn_id, "conversation_id": conversation}
        value = json.dumps({**doc, "messages": messages}).encode()
        sent[turn_id] = producer.send(topic, key=conversation.encode(), value=value)
    acked = set()
    for turn_id, future in sent.items():
        try:
            future.get(timeout=10)
            acked.add(turn_id)
        except Exception:  # not acknowledged: not counted
            pass
    producer.close()
    return acked


def _worker_command() -> list[str]:
    script = Path(sys.executable).with_name("safety-monitor")
    if script.is_file():
        return [str(script), "worker"]
    return [sys.executable, "-c", "from monitor.cli import app; app()", "worker"]


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(_worker_command(), env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
