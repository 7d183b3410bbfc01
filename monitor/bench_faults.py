"""``safety-monitor bench --faults``: fault scenarios against the real stack, measured.

Every scenario runs on a throwaway PostgreSQL cluster of this run, a Tansu broker of its own and,
for one, a webhook receiver, all on 127.0.0.1, with a tenant of its own. The HTTP scenarios run
the service in this process (uvicorn in a thread, like ``bench --service``); ``turns`` turns of
the bundled replay traffic (scam, injection, code and sycophancy turns: they make alerts) go to
``POST /v1/turns`` from ``clients`` threads. A client retries a 5xx answer or a transport error
every 0.25 s with the same ``Idempotency-Key`` until it gets 200 or the scenario's time is up.
The service's settings are the configured ones (``report["settings"]``: the defaults unless
``SAFETY_MONITOR_*`` says otherwise) except ``dispatch_interval_s``, 0.05 as in ``--service``.

- ``broker``: once half the turns are answered the broker is SIGKILLed, kept down until the
  load is done (``down_s`` at least), and started again on the same port (empty: Tansu keeps
  its log in memory).
- ``postgres``: PostgreSQL stopped (``pg_ctl stop -m fast``) for ``down_s``, then started.
- ``webhook``: a webhook is configured; its receiver stops listening, then listens again (as
  the broker: after the load).
- ``worker``: the turns are produced to ``llm.traffic`` with acks=all; a ``safety-monitor
  worker`` process is SIGKILLed while it handles a poll (preferably with turns of it stored and
  its offsets not yet committed) and started again.

What each scenario reports:

- ``acknowledged``: turns the service answered 200 for (HTTP), or produced to Kafka with
  acks=all (worker).
- ``stored``: distinct acknowledged turns found in PostgreSQL (by their idempotency key).
- ``lost``: acknowledged - stored.
- ``duplicate_rows``: turns stored more than once: extra rows with the same conversation id
  (each turn has its own) or the same source id.
- ``alerts``: the tenant's alerts in PostgreSQL.
- ``alerts_published``: alerts whose ``alert_id`` was seen on the alerts topic (read from its
  beginning as it grows, in both lives of a restarted broker); in the webhook scenario,
  delivered to the receiver (a 2xx answer to a correctly signed POST).
- ``kafka_duplicates``: extra copies of an alert_id on the alerts topic (at least once allows
  them; they are counted, not hidden). ``webhook_duplicates``: the same for the receiver.
- ``dead_lettered``: the tenant's webhook deliveries dead-lettered plus messages on the traffic
  dead-letter topic.
- ``recovery_s``: seconds from the fault being healed (broker, database or receiver back, worker
  restarted) until every turn of the load is acknowledged and stored and every alert published
  or delivered; null when the scenario timed out (``timed_out: true``: every wait is bounded by
  ``timeout_s`` and the scenario reports what it saw by then).
- ``lost_in_broker`` (broker): alerts the killed broker had acknowledged (``published_at`` set
  before the kill) that the topic reader had not read yet; they died with Tansu's in-memory log,
  where a durable Kafka would keep them. The kill waits (up to 5 s) for a moment when every
  alert so far is published and read back, so this is normally 0.
- ``uncommitted_at_kill`` (worker): turns stored but whose offsets were not committed when the
  worker died; the restarted worker reads them again and must recognise them.
  ``worker_ready_s``: of ``recovery_s``, the restarted worker's start until it consumes.
- ``http_errors``: what the clients got before their 200s, by status or error. ``outage_s``:
  how long the fault lasted (broker and receiver stay down until the load is done, so that
  ``recovery_s`` is the backlog's; clients wait on PostgreSQL, so it is held ``down_s``).

Targets: lost 0, duplicate_rows 0, alerts_published == alerts in every scenario.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from monitor.localservices import free_port
from monitor.service.db import Alert, Turn, WebhookDelivery
from monitor.service.monitored import Monitored
from monitor.webhooks import WebhookVerificationError, verify

log = logging.getLogger(__name__)
SCENARIOS = ("broker", "postgres", "webhook", "worker")
SECRET = "whsec_" + base64.b64encode(b"bench-faults-secret-of-32-bytes!").decode()
DISPATCH_INTERVAL_S = 0.05  # as in bench --service; every other setting is the configured one


@dataclass(frozen=True)
class FaultBenchOptions:
    turns: int = 24  # per scenario
    clients: int = 4  # HTTP scenarios
    down_s: float = 2.0  # how long each fault lasts
    timeout_s: float = 180.0  # per scenario: every wait ends by then
    scenarios: tuple[str, ...] = SCENARIOS


def run_fault_bench(monitored: Monitored, opts: FaultBenchOptions) -> dict[str, Any]:
    """Run the chosen scenarios in order on one throwaway PostgreSQL cluster."""
    from monitor.bench_faults_scenarios import run_scenario
    from monitor.localservices import Postgres
    from monitor.service.settings import ServiceSettings

    unknown = set(opts.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    base = ServiceSettings(dispatch_interval_s=DISPATCH_INTERVAL_S)
    cluster = Postgres()
    # A killed broker makes every Kafka client complain; httpx logs every request.
    quiet = {name: logging.getLogger(name) for name in ("kafka", "httpx")}
    levels = {name: q.level for name, q in quiet.items()}
    for q in quiet.values():
        q.setLevel(logging.CRITICAL)
    try:
        cluster.start()
        results = [run_scenario(name, monitored, cluster, opts) for name in opts.scenarios]
    finally:
        cluster.close()
        for name, q in quiet.items():
            q.setLevel(levels[name])
    return {
        "model": monitored.pipeline.model.name,
        "turns": opts.turns,
        "clients": opts.clients,
        "down_s": opts.down_s,
        "database": "postgresql",
        "settings": base.model_dump(
            include={
                "dispatch_interval_s",
                "kafka_timeout_s",
                "webhook_backoff_s",
                "webhook_max_attempts",
                "worker_session_timeout_ms",
            }
        ),
        "scenarios": results,
    }


def wait_until(check: Callable[[], bool], deadline: float, every: float = 0.1) -> bool:
    """Poll ``check`` until it holds (True) or the monotonic ``deadline`` passes (False)."""
    while True:
        try:
            if check():
                return True
        except SQLAlchemyError:  # the database is (still) down: not yet
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


class Tap:
    """Every alert id on a topic, read in a thread from the topic's beginning as it grows.
    ``restart()`` after the broker came back with an empty log: read the new one from its start."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: list[str] = []  # in arrival order, duplicates included
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tap:{topic}", daemon=True)
        self._thread.start()

    def restart(self) -> None:
        self._generation += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read(self._generation)
            except Exception:  # a dead broker: try again with a new consumer
                log.debug("tap on %s: retrying", self.topic, exc_info=True)
                self._stop.wait(0.2)

    def _read(self, generation: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            reconnect_backoff_max_ms=200,
            request_timeout_ms=5000,
        )
        try:
            parts = consumer.partitions_for_topic(self.topic)  # asks again while unknown
            while not parts and not self._stop.wait(0.2) and generation == self._generation:
                parts = consumer.partitions_for_topic(self.topic)
            if not parts:
                return
            consumer.assign([TopicPartition(self.topic, p) for p in parts])
            consumer.seek_to_beginning()
            while not self._stop.is_set() and generation == self._generation:
                for records in consumer.poll(timeout_ms=100).values():
                    self.seen.extend(alert_id(r) for r in records)
        finally:
            consumer.close()


def alert_id(record: Any) -> str:
    """The alert id of an alerts-topic record: its header, else the payload's field."""
    for name, value in record.headers or []:
        if name == "alert_id":
            return bytes(value).decode()
    return str(json.loads(record.value)["alert_id"])


class Receiver:
    """A webhook receiver on 127.0.0.1 that records the alert id of every verified delivery
    (``monitor.webhooks.verify``) it answers 200 to; ``down()`` stops listening, ``up()``
    listens again on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.delivered: list[str] = []
        self.bad_signatures = 0
        self._server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    alert = verify(body, dict(self.headers.items()), [SECRET])
                except WebhookVerificationError:
                    outer.bad_signatures += 1
                    self.send_response(401)
                else:
                    outer.delivered.append(alert.alert_id)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def measure(
    engine: Engine,
    tenant: str,
    acknowledged: set[str],
    on_kafka: list[str],
    delivered: list[str] | None = None,
) -> dict[str, Any]:
    """The counts of a scenario so far (module docstring): ``acknowledged`` source ids, the
    alert ids seen ``on_kafka`` and, with a webhook, those ``delivered`` to the receiver."""
    published = on_kafka if delivered is None else delivered
    with Session(engine) as session:
        rows = session.execute(
            select(Turn.source_id, Turn.conversation_id).where(Turn.tenant == tenant)
        ).all()
        alerts = set(session.scalars(select(Alert.id).where(Alert.tenant == tenant)).all())
        dead = session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .join(Alert, Alert.id == WebhookDelivery.alert_id)
            .where(Alert.tenant == tenant, WebhookDelivery.dead_at.is_not(None))
        )
    sources = [r.source_id for r in rows if r.source_id is not None]
    stored = len(acknowledged & set(sources))
    extra_by_conversation = len(rows) - len({r.conversation_id for r in rows})
    return {
        "acknowledged": len(acknowledged),
        "stored": stored,
        "lost": len(acknowledged) - stored,
        "duplicate_rows": max(extra_by_conversation, len(sources) - len(set(sources))),
        "alerts": len(alerts),
        "alerts_published": len(alerts & set(published)),
        "kafka_duplicates": _extra_copies(on_kafka, alerts),
        "webhook_duplicates": _extra_copies(delivered or [], alerts),
        "dead_lettered": int(dead or 0),
    }


def _extra_copies(ids: list[str], among: set[str]) -> int:
    return sum(n - 1 for a, n in Counter(ids).items() if a in among and n > 1)
