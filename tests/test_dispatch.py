"""The dispatcher runs each alert sink in a loop of its own: a slow webhook receiver delays
neither Kafka publication nor another webhook (real PostgreSQL, real Tansu broker, real HTTP
receivers on loopback)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from samples import WEBHOOK_SECRET
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from monitor.localservices import Broker, free_port, read_topic
from monitor.service.db import Alert, Outbox, WebhookDelivery, make_engine, upgrade, utcnow
from monitor.service.dispatch import Dispatcher
from monitor.service.health import Loops
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings, WebhookConfig

pytestmark = pytest.mark.integration

DELAY = 3.0  # seconds the slow receiver takes to answer each request


class Receiver:
    """A webhook receiver on loopback that takes ``delay`` s to answer; records, per alert id,
    when each request arrived and when it was answered (``time.monotonic``)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.arrived: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.bodies: list[tuple[str, dict[str, str], bytes]] = []  # (alert id, headers, body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                alert_id = self.headers["webhook-id"]
                outer.arrived.setdefault(alert_id, time.monotonic())
                outer.bodies.append((alert_id, dict(self.headers.items()), body))
                time.sleep(delay)
                self.send_response(200)
                self.end_headers()
                outer.answered.setdefault(alert_id, time.monotonic())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True  # closing does not wait for a sleeping answer
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll ``check`` until true; the monotonic time it first was."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


def add_alert(sessions: sessionmaker[Session], webhooks: list[str]) -> str:
    """An alert as the recorder writes it: the alert, its outbox row, its deliveries."""
    alert_id = str(uuid.uuid4())
    with sessions() as session:
        session.add(
            Alert(
                id=alert_id,
                tenant="t-dispatch",
                conversation_id="c1",
                pipeline="p",
                detector="scam_email",
                severity="high",
                score=1.0,
            )
        )
        session.flush()
        session.add(
            Outbox(
                alert_id=alert_id, key="c1", payload={"alert_id": alert_id, "tenant": "t-dispatch"}
            )
        )
        for name in webhooks:
            session.add(WebhookDelivery(alert_id=alert_id, webhook=name, next_attempt_at=utcnow()))
        session.commit()
    return alert_id


def published(sessions: sessionmaker[Session], alert_id: str) -> bool:
    with sessions() as session:
        row = session.scalar(select(Outbox).where(Outbox.alert_id == alert_id))
        return row is not None and row.published_at is not None


def on_kafka(bootstrap: str, topic: str = "safety.alerts") -> set[str]:
    """The ``alert_id`` headers of every message on ``topic``."""
    return {dict(m.headers)["alert_id"].decode() for m in read_topic(bootstrap, topic)}


def test_a_slow_webhook_delays_neither_kafka_nor_another_webhook(
    pg_url: str, broker: Broker
) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    slow, fast = Receiver(delay=DELAY), Receiver()
    tag = uuid.uuid4().hex[:8]
    hooks = [
        WebhookConfig(name=f"slow-{tag}", url=slow.url, secrets=[WEBHOOK_SECRET]),
        WebhookConfig(name=f"fast-{tag}", url=fast.url, secrets=[WEBHOOK_SECRET]),
    ]
    settings = ServiceSettings(
        database_url=pg_url,
        kafka_bootstrap=broker.bootstrap,
        dispatch_interval_s=0.1,
        kafka_timeout_s=5,
        webhook_timeout_s=4 * DELAY,
        webhooks=hooks,
    )
    dispatcher = Dispatcher(sessions, settings, Metrics())
    names = [h.name for h in hooks]  # the slow one's delivery rows come first
    try:
        warm = add_alert(sessions, [])  # the producer connects, the topic is created
        dispatcher.start()
        wait_for(lambda: published(sessions, warm), 60, "a first alert on Kafka")
        first = add_alert(sessions, names)
        slow_busy = wait_for(lambda: first in slow.arrived, 60, "the slow receiver's request")
        answers_at = slow.arrived[first] + DELAY  # not before: it sleeps that long

        # A new alert while the slow receiver holds its request: Kafka does not wait for it.
        second = add_alert(sessions, names)
        on_kafka_at = wait_for(lambda: published(sessions, second), 60, "the second on Kafka")
        assert on_kafka_at < answers_at and first not in slow.answered, (
            f"the alert reached Kafka {on_kafka_at - slow_busy:.2f} s after it was written, "
            f"only once the slow webhook had answered ({DELAY} s)"
        )
        assert on_kafka_at - slow_busy < DELAY / 2

        # Nor does the other webhook.
        wait_for(lambda: second in fast.arrived, 60, "the fast receiver's second request")
        assert fast.arrived[first] < answers_at and fast.arrived[second] < answers_at
        assert {warm, first, second} <= on_kafka(broker.bootstrap)
        for alert_id, headers, body in fast.bodies:
            # The outbox rows here are not whole alerts: check the signature alone.
            Webhook(WEBHOOK_SECRET).verify(body, headers)
            assert headers["webhook-id"] == alert_id

        # The slow one still gets both, in order, each once.
        wait_for(lambda: second in slow.answered, 4 * DELAY, "the slow receiver's second answer")
        assert [a for a, _s, _b in slow.bodies] == [first, second]
    finally:
        stopping = time.monotonic()
        dispatcher.stop()
        stopped_in = time.monotonic() - stopping
        slow.close()
        fast.close()
        engine.dispose()
    assert stopped_in < DELAY + 5, "stop waits for one request in flight at most"


def test_each_sink_loop_reports_its_own_failure() -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens
    engine = make_engine(nowhere)
    hooks = [
        WebhookConfig(name=n, url="http://127.0.0.1:9/hook", secrets=[WEBHOOK_SECRET]) for n in "ab"
    ]
    settings = ServiceSettings(
        database_url=nowhere, kafka_bootstrap="127.0.0.1:9", dispatch_interval_s=0.1, webhooks=hooks
    )
    loops = Loops()
    dispatcher = Dispatcher(sessionmaker(engine), settings, Metrics(), loops)
    expected = {
        "dispatcher:kafka",
        "dispatcher:webhook:a",
        "dispatcher:webhook:b",
        "dispatcher:webhook-unconfigured",
    }
    try:
        dispatcher.start()
        wait_for(lambda: set(loops.failing()) == expected, 30, "every loop to report")
        assert all("OperationalError" in why for why in loops.failing().values())
    finally:
        stopping = time.monotonic()
        dispatcher.stop()
        engine.dispose()
    assert time.monotonic() - stopping < 10
