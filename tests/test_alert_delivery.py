"""Alerts out: the outbox to a real Kafka-protocol broker (Tansu) and to signed webhooks,
on a real PostgreSQL; broker outages and failing receivers lose and duplicate nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samples import WEBHOOK_SECRET
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.localservices import Broker, free_port, read_topic
from monitor.service.app import create_app
from monitor.service.db import Alert, Outbox
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings
from monitor.webhooks import verify

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCAM = [
    {
        "role": "user",
        "content": "Subject: You have WON $1,000,000!!!\n\nDear Winner, "
        "CONGRATULATIONS! Your e-mail address has won ONE MILLION DOLLARS in our international "
        "lottery. To claim your FREE prize, send your bank account number and a processing fee "
        "of $99 today. Act NOW, this offer expires in 24 hours!",
    }
]


class Receiver:
    """A webhook receiver on loopback that records calls and answers with ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.calls: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.append((dict(self.headers), body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def app_client(pg_url: str, monitored: Monitored, **over: Any) -> TestClient:
    settings = ServiceSettings(
        database_url=pg_url, dispatch_interval_s=0.1, kafka_timeout_s=3, **over
    )
    return TestClient(create_app(settings, [monitored]))


def post_scam(client: TestClient, tenant: str, conversation: str) -> list[str]:
    with Session(client.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
        k = create_key(session, tenant, "ingest")
        session.commit()
    r = client.post(
        "/v1/turns",
        headers={"Authorization": f"Bearer {k}"},
        json={"conversation_id": conversation, "messages": SCAM},
    )
    assert r.status_code == 200, r.text
    ids: list[str] = r.json()["alert_ids"]
    assert ids, "the scam turn raised an alert"
    return ids


def wait_for(check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def consume(bootstrap: str, topic: str = "safety.alerts") -> list[tuple[str, dict[str, Any]]]:
    """Every message on ``topic`` from the beginning: (key, value)."""
    return [(m.key.decode(), json.loads(m.value)) for m in read_topic(bootstrap, topic)]


def outbox_state(client: TestClient, tenant: str) -> tuple[int, int]:
    """(published, waiting) outbox rows of a tenant."""
    with Session(client.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
        base = select(func.count()).select_from(Outbox).join(Alert).where(Alert.tenant == tenant)
        done = session.scalar(base.where(Outbox.published_at.is_not(None)))
        waiting = session.scalar(base.where(Outbox.published_at.is_(None)))
    return int(done or 0), int(waiting or 0)


def test_scam_alert_reaches_kafka_and_a_signed_webhook(
    pg_url: str, monitored: Monitored, broker: Broker, receiver: Receiver
) -> None:
    tenant, conv = f"t-{uuid.uuid4().hex[:8]}", f"conv-{uuid.uuid4().hex[:8]}"
    hook = {"name": "ops", "url": receiver.url, "secrets": [WEBHOOK_SECRET]}
    with app_client(pg_url, monitored, kafka_bootstrap=broker.bootstrap, webhooks=[hook]) as c:
        ids = post_scam(c, tenant, conv)
        wait_for(lambda: outbox_state(c, tenant) == (len(ids), 0))
        wait_for(lambda: len(receiver.calls) >= len(ids))
    messages = [(k, v) for k, v in consume(broker.bootstrap) if v["tenant"] == tenant]
    assert sorted(v["alert_id"] for _k, v in messages) == sorted(ids)
    for key, value in messages:
        assert key == conv and value["schema_version"] == 1
        assert value["detector"] in (
            "scam_email",
            "prompt_injection",
            "deception",
            "sycophancy",
            "backdoor_code",
        )
    assert sorted(h["webhook-id"] for h, _b in receiver.calls) == sorted(ids)
    for headers, body in receiver.calls:
        assert verify(body, headers, [WEBHOOK_SECRET]).alert_id == headers["webhook-id"]


def test_broker_down_alerts_wait_then_go_out_once(pg_url: str, monitored: Monitored) -> None:
    broker = Broker()  # its port is fixed, so it can come back where the service expects it
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with app_client(pg_url, monitored, kafka_bootstrap=broker.bootstrap) as c:
        ids = post_scam(c, tenant, "c1") + post_scam(c, tenant, "c2")
        time.sleep(1.0)
        assert outbox_state(c, tenant) == (0, len(ids)), "nothing goes out while it is down"
        assert c.get("/readyz").json()["degraded"] is True
        broker.start()
        try:
            wait_for(lambda: outbox_state(c, tenant) == (len(ids), 0), seconds=90)
            got = [v["alert_id"] for _k, v in consume(broker.bootstrap) if v["tenant"] == tenant]
        finally:
            broker.stop()
    assert sorted(got) == sorted(ids), "each alert published exactly once"
    with Session(c.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
        n = session.scalar(select(func.count()).select_from(Alert).where(Alert.tenant == tenant))
    assert n == len(ids)


def test_failing_webhook_is_retried_then_dead_lettered(pg_url: str, monitored: Monitored) -> None:
    failing = Receiver(status=500)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    hook = {"name": "flaky", "url": failing.url, "secrets": [WEBHOOK_SECRET]}
    try:
        with app_client(
            pg_url, monitored, webhooks=[hook], webhook_max_attempts=3, webhook_backoff_s=0.1
        ) as c:
            ids = post_scam(c, tenant, "c1")
            with Session(c.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
                k = create_key(session, tenant, "read")
                session.commit()
            auth = {"Authorization": f"Bearer {k}"}

            def dead() -> list[dict[str, Any]]:
                r = c.get("/v1/webhooks/deliveries", params={"status": "dead"}, headers=auth)
                out: list[dict[str, Any]] = r.json()["deliveries"]
                return out

            wait_for(lambda: len(dead()) == len(ids), seconds=60)
            for d in dead():
                assert d["attempts"] == 3 and d["last_status"] == 500 and d["webhook"] == "flaky"
            assert len(failing.calls) == 3 * len(ids)
            pending = c.get("/v1/webhooks/deliveries", params={"status": "pending"}, headers=auth)
            assert pending.json()["deliveries"] == []
    finally:
        failing.close()
