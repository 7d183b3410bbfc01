"""The Kafka worker on a real broker and PostgreSQL: turns stored once each (also across a
restart and a redelivery), malformed messages dead-lettered without blocking the partition."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from monitor.localservices import Broker
from monitor.service.core import Monitored
from monitor.service.db import Turn, make_engine, upgrade
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.worker import Worker

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    b.start()
    yield b
    b.stop()


def produce(bootstrap: str, values: list[bytes], key: bytes = b"k") -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for v in values:
        p.send("llm.traffic", key=key, value=v).get(timeout=10)
    p.close()


def turn(tenant: str, i: int, turn_id: str | None = None) -> bytes:
    messages = [{"role": "user", "content": f"Question number {i}?"}]
    doc: dict[str, Any] = {"tenant": tenant, "conversation_id": f"conv-{i}", "messages": messages}
    if turn_id:
        doc["turn_id"] = turn_id
    return json.dumps(doc).encode()


def run_until(worker: Worker, done: Any, seconds: float = 120) -> None:
    t = threading.Thread(target=worker.run)
    t.start()
    try:
        deadline = time.monotonic() + seconds
        while not done():
            assert time.monotonic() < deadline, "worker did not finish"
            assert t.is_alive(), "worker died"
            time.sleep(0.2)
    finally:
        worker.stop()
        t.join(timeout=60)


def test_worker_stores_each_turn_once_and_dead_letters_bad_ones(
    pg_url: str, monitored: Monitored, broker: Broker
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings(database_url=pg_url, kafka_bootstrap=broker.bootstrap,
                               worker_session_timeout_ms=2000)  # fmt: skip
    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)

    def stored() -> int:
        with Session(engine) as s:
            n = s.scalar(select(func.count()).select_from(Turn).where(Turn.tenant == tenant))
        return int(n or 0)

    first = [turn(tenant, i, turn_id=f"id-{tenant}-{i}") for i in range(4)]
    first.insert(2, b"{not json")
    first.append(json.dumps({"tenant": tenant, "conversation_id": "x", "messages": []}).encode())
    produce(broker.bootstrap, first)
    w1 = Worker(settings, [monitored], sessions, Metrics())
    run_until(w1, lambda: stored() == 4 and w1.dead == 2)
    # After a restart: a redelivered turn (same turn_id) and one without an id, sent twice.
    produce(broker.bootstrap, [turn(tenant, 0, turn_id=f"id-{tenant}-0"), turn(tenant, 9),
                               turn(tenant, 9)])  # fmt: skip
    w2 = Worker(settings, [monitored], sessions, Metrics())
    run_until(w2, lambda: stored() == 5)
    time.sleep(1.0)
    assert stored() == 5 and w2.stored == 1, "redeliveries were stored once"
    assert w2.dead == 0, "the restarted worker resumed after the committed offsets"
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)  # fmt: skip
    parts = consumer.partitions_for_topic("llm.traffic.dlq") or set()
    consumer.assign([TopicPartition("llm.traffic.dlq", p) for p in parts])
    consumer.seek_to_beginning()
    dead = list(consumer)
    consumer.close()
    assert sorted(m.value for m in dead) == sorted([first[2], first[-1]])
    reasons = [dict(m.headers)["error"].decode() for m in dead]
    assert any("messages" in r for r in reasons) and any(
        "JSON" in r or "json" in r for r in reasons
    )
    engine.dispose()
