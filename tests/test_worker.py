"""The Kafka worker on a real broker and PostgreSQL: turns stored once each (also across a
restart and a redelivery), malformed messages dead-lettered without blocking the partition."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.localservices import Broker
from monitor.service.db import Turn, make_engine, upgrade
from monitor.service.monitored import Monitored
from monitor.service.runtime import Runtime
from monitor.service.settings import ServiceSettings
from monitor.service.worker import Worker
from monitor.tokenization import InputTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.integration]


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
    settings = ServiceSettings(
        database_url=pg_url, kafka_bootstrap=broker.bootstrap, worker_session_timeout_ms=2000
    )
    engine = make_engine(pg_url)
    upgrade(engine)

    def stored() -> int:
        return count_turns(engine, tenant)

    first = [turn(tenant, i, turn_id=f"id-{tenant}-{i}") for i in range(4)]
    first.insert(2, b"{not json")
    first.append(json.dumps({"tenant": tenant, "conversation_id": "x", "messages": []}).encode())
    produce(broker.bootstrap, first)
    w1 = Worker(Runtime(settings, [monitored]))
    run_until(w1, lambda: stored() == 4 and w1.dead == 2)
    # After a restart: a redelivered turn (same turn_id) and one without an id, sent twice.
    produce(
        broker.bootstrap,
        [turn(tenant, 0, turn_id=f"id-{tenant}-0"), turn(tenant, 9), turn(tenant, 9)],
    )
    w2 = Worker(Runtime(settings, [monitored]))
    run_until(w2, lambda: stored() == 5)
    time.sleep(1.0)
    assert stored() == 5 and w2.stored == 1, "redeliveries were stored once"
    assert w2.dead == 0, "the restarted worker resumed after the committed offsets"
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
    )
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


def dead_letters(bootstrap: str) -> list[Any]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
    )
    parts = consumer.partitions_for_topic("llm.traffic.dlq") or set()
    consumer.assign([TopicPartition("llm.traffic.dlq", p) for p in parts])
    consumer.seek_to_beginning()
    dead = list(consumer)
    consumer.close()
    return dead


def count_turns(engine: Any, tenant: str) -> int:
    with Session(engine) as s:
        n = s.scalar(select(func.count()).select_from(Turn).where(Turn.tenant == tenant))
    return int(n or 0)


def test_text_the_database_cannot_hold_is_dead_lettered(
    pg_url: str, monitored: Monitored, broker: Broker
) -> None:
    """A NUL or a lone surrogate anywhere in a message: dead-lettered, the worker goes on."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings(
        database_url=pg_url, kafka_bootstrap=broker.bootstrap, worker_session_timeout_ms=2000
    )
    engine = make_engine(pg_url)
    upgrade(engine)
    good = json.loads(turn(tenant, 1))
    bad = [
        {**good, "messages": [{"role": "user", "content": "a\x00b"}]},
        {**good, "conversation_id": "c\x00"},
        {**good, "metadata": {"k\x00": "v"}},
        {**good, "metadata": {"k": ["\ud800"]}},
        {**good, "tenant": "t\x00"},
    ]
    produce(broker.bootstrap, [json.dumps(b).encode() for b in bad] + [turn(tenant, 1)])
    w = Worker(Runtime(settings, [monitored]))
    run_until(w, lambda: count_turns(engine, tenant) == 1 and w.dead == len(bad))
    reasons = [dict(m.headers)["error"].decode() for m in dead_letters(broker.bootstrap)]
    for field in ("messages", "conversation_id", "metadata", "tenant"):
        assert any(r.startswith(field) for r in reasons), (field, reasons)
    assert all("NUL" in r or "surrogate" in r for r in reasons), reasons
    engine.dispose()


def test_worker_rides_out_a_database_outage(monitored: Monitored, broker: Broker) -> None:
    """PostgreSQL stopped for a few seconds (pg_ctl) while turns arrive: the worker waits for
    it, then stores every turn once, without exiting."""
    from monitor.localservices import Postgres

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    cluster = Postgres()
    cluster.start()
    try:
        settings = ServiceSettings(
            database_url=cluster.url,
            kafka_bootstrap=broker.bootstrap,
            worker_session_timeout_ms=2000,
        )
        engine = make_engine(cluster.url)
        upgrade(engine)
        w = Worker(Runtime(settings, [monitored]))
        t = threading.Thread(target=w.run)
        t.start()
        try:
            produce(broker.bootstrap, [turn(tenant, i) for i in range(2)])
            deadline = time.monotonic() + 120
            while count_turns(engine, tenant) < 2:
                assert time.monotonic() < deadline and t.is_alive(), "first turns not stored"
                time.sleep(0.2)
            cluster.stop()
            produce(broker.bootstrap, [turn(tenant, i) for i in range(2, 5)])
            # It polls the new turns, evaluates them, fails to store them, and holds them.
            deadline = time.monotonic() + 60
            while not getattr(w, "waiting_for_database", False):
                assert t.is_alive(), "the worker rides out the outage"
                assert time.monotonic() < deadline, "the worker noticed the outage"
                time.sleep(0.2)
            time.sleep(2.0)
            assert t.is_alive(), "the worker rides out the outage"
            cluster.start()
            deadline = time.monotonic() + 120
            while count_turns(engine, tenant) < 5:
                assert time.monotonic() < deadline, "turns not stored after the outage"
                assert t.is_alive(), "worker died"
                time.sleep(0.2)
            time.sleep(1.0)
            assert count_turns(engine, tenant) == 5 and w.stored == 5 and w.dead == 0
            assert not w.waiting_for_database
        finally:
            w.stop()
            t.join(timeout=60)
        engine.dispose()
    finally:
        cluster.close()


def test_kafka_takes_openai_messages_and_dead_letters_a_turn_too_long_to_read(
    pg_url: str, monitored: Monitored, broker: Broker
) -> None:
    """The topic's schema is the HTTP body's: tool results and tool calls are read; a turn over
    max_input_tokens is refused whole (dead-lettered with the reason), never cut."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings(
        database_url=pg_url, kafka_bootstrap=broker.bootstrap, worker_session_timeout_ms=2000
    )
    engine = make_engine(pg_url)
    upgrade(engine)
    limited_pipeline = copy.copy(monitored.pipeline)
    limited_pipeline.tokenizer = InputTokenizer(monitored.pipeline.model.tokenizer, 300)
    limited = dataclasses.replace(monitored, pipeline=limited_pipeline)
    tool_turn = {
        "tenant": tenant,
        "conversation_id": "tools",
        "messages": [
            {"role": "user", "content": "Look up order 17."},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "function": {"name": "find_order", "arguments": '{"id": 17}'}}
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [{"type": "text", "text": "shipped"}],
            },
        ],
    }
    too_long = {
        "tenant": tenant,
        "conversation_id": "long",
        "messages": [{"role": "user", "content": "a few words " * 200}],
    }
    produce(broker.bootstrap, [json.dumps(too_long).encode(), json.dumps(tool_turn).encode()])
    w = Worker(Runtime(settings, [limited]))
    run_until(w, lambda: count_turns(engine, tenant) == 1 and w.dead == 1)
    with Session(engine) as s:
        stored = s.scalars(select(Turn).where(Turn.tenant == tenant)).one()
        assert [m["role"] for m in stored.messages] == ["user", "assistant", "tool"]
        assert stored.messages[1]["content"] == 'find_order({"id": 17})'
    (dead,) = [m for m in dead_letters(broker.bootstrap) if b'"long"' in m.value]
    assert "over the 300 tokens" in dict(dead.headers)["error"].decode()
    engine.dispose()
