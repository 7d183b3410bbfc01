"""``safety-monitor worker``: turns from the Kafka topic ``llm.traffic``, in a consumer group.

Each message is one turn (``schemas.TrafficTurn``): the JSON body of ``POST /v1/turns`` plus
``tenant`` (default ``"default"``) and an optional ``turn_id``; it takes the same ingest path
as the API's turns. N identical workers in one group share the topic's
partitions; the topic is keyed by conversation, so a conversation stays on one worker.

Offsets are committed only after every turn of a poll is stored. A turn seen twice (a redelivery
after a crash, a producer retry) is stored once: its ``turn_id``, or a hash of its content, is
the turn's idempotency key. A malformed message (text the database cannot hold, such as a NUL
character, included) is logged, counted and copied to the dead-letter topic (``<topic>.dlq``)
with the reason in a header; it never blocks its partition.

When the database is unavailable the worker does not exit: it rewinds and pauses the partitions
of the poll it could not store, keeps polling (so it stays in its group) and checks the
database with growing waits, then resumes where it stopped.

What it does shows in the runtime's metrics (turns, messages by outcome, errors, the lag of each
partition it holds) and in its readiness: the loop ``consumer`` of ``runtime.loops`` is ready
while partitions are assigned to it and it polls, not ready while it joins the group, holds no
partition or waits for the database, and failing when a poll's turns take longer than the
consumer's ``max_poll_interval_ms`` (``monitor.service.worker_api`` serves both).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from monitor.service.health import DB_UNAVAILABLE, Backoff
from monitor.service.ingest import Refused, TurnRequest, UnknownPipelineError
from monitor.service.runtime import Runtime
from monitor.service.schemas import TrafficTurn

log = logging.getLogger(__name__)
LOOP = "consumer"  # its name in runtime.loops (/readyz)
LAG_INTERVAL_S = 5.0  # how often the lag gauges are refreshed


def parse(raw: bytes) -> TrafficTurn:
    """A message's turn; ValueError says what is wrong."""
    try:
        return TrafficTurn.model_validate_json(raw)
    except ValidationError as exc:
        error = exc
    if error.errors()[0]["type"] == "json_invalid":
        # pydantic's parser refuses a lone surrogate escape ("\ud800") as bad JSON without
        # saying where; Python's accepts it, and validation then names the field. Only the
        # message is taken from there: what pydantic's parser refuses stays refused.
        try:
            TrafficTurn.model_validate(json.loads(raw))
        except ValidationError as exc:
            error = exc
        except (ValueError, RecursionError):
            pass
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    raise ValueError(f"{where}: {first['msg']}") from error


class Worker:
    """Consumes the traffic topic into the runtime's ingest path (it does not start the
    runtime's dispatcher: whoever runs the worker decides)."""

    def __init__(self, runtime: Runtime, group: str = "safety-monitor") -> None:
        settings = runtime.settings
        if not settings.kafka_bootstrap:
            raise ValueError("the worker needs SAFETY_MONITOR_KAFKA_BOOTSTRAP")
        self.settings = settings
        self.ingest = runtime.ingest
        self.sessions = runtime.sessions
        self.metrics = runtime.metrics
        self.loops = runtime.loops
        self.group = group
        self.lag_interval_s = LAG_INTERVAL_S
        self.loops.waiting(LOOP, "starting")
        self.stop_event = threading.Event()
        self.stored = 0
        self.dead = 0
        self.waiting_for_database = False

    def run(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        consumer = KafkaConsumer(
            self.settings.traffic_topic,
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.worker_session_timeout_ms,
            heartbeat_interval_ms=max(100, self.settings.worker_session_timeout_ms // 4),
            max_poll_records=self.settings.worker_max_poll_records,
            client_id="safety-monitor-worker",
        )
        dlq = KafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            client_id="safety-monitor-dlq",
        )
        log.info("worker in group %s reading %s", self.group, self.settings.traffic_topic)
        self.loops.waiting(LOOP, "joining the consumer group")
        # A poll's turns may take this long before the group counts the worker gone.
        within_s = consumer.config["max_poll_interval_ms"] / 1000
        backoff = Backoff()
        next_lag = 0.0
        try:
            while not self.stop_event.is_set():
                if time.monotonic() >= next_lag:
                    self._observe_lag(consumer)
                    next_lag = time.monotonic() + self.lag_interval_s
                if self.waiting_for_database:
                    if not self._database_answers():
                        self.metrics.worker_errors.labels("database").inc()
                        # Polling paused partitions keeps this worker in its group.
                        wait_ms = int(backoff.next() * 1000)
                        self._hold(consumer, consumer.poll(timeout_ms=wait_ms))
                        continue
                    log.info("the database answers again: resuming %s", self.settings.traffic_topic)
                    consumer.resume(*consumer.paused())
                    self.waiting_for_database = False
                    backoff.reset()
                polled = consumer.poll(timeout_ms=500)
                if consumer.assignment():
                    self.loops.beat(LOOP, within_s)
                else:
                    self.loops.waiting(LOOP, "no partition of the topic is assigned to it")
                if not polled:
                    continue
                try:
                    self._handle([m for msgs in polled.values() for m in msgs], dlq)
                except DB_UNAVAILABLE as exc:
                    # Not the messages' fault: nothing is committed, they are read again when
                    # the database is back (turns already stored are recognised then).
                    log.warning(
                        "database unavailable (%s); holding %d partitions until it returns",
                        type(exc).__name__,
                        len(polled),
                    )
                    self._hold(consumer, polled)
                    self.waiting_for_database = True
                    self.metrics.worker_errors.labels("database").inc()
                    self.loops.waiting(LOOP, "holding its partitions until the database answers")
                    continue
                consumer.commit()  # only after every turn of the poll is stored
        finally:
            self.loops.waiting(LOOP, "stopped")
            consumer.close()
            dlq.flush(timeout=10)
            dlq.close(timeout=10)

    def stop(self) -> None:
        self.stop_event.set()

    def _database_answers(self) -> bool:
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def _observe_lag(self, consumer: Any) -> None:
        """Set the lag gauge of each partition held: end offset - position (NaN: unknown)."""
        from kafka.errors import KafkaError

        held = sorted(consumer.assignment())
        lag = {tp.partition: math.nan for tp in held}
        try:
            ends = consumer.end_offsets(held, timeout_ms=int(self.settings.kafka_timeout_s * 1000))
            for tp in held:
                position = consumer.position(tp, timeout_ms=0) if tp in ends else None
                if position is not None:
                    lag[tp.partition] = max(0, ends[tp] - position)
        except (KafkaError, OSError) as exc:
            self.metrics.worker_errors.labels("offsets").inc()
            log.debug("consumer lag unknown: %s", exc)
        self.metrics.observe_lag(self.settings.traffic_topic, lag)

    @staticmethod
    def _hold(consumer: Any, polled: dict[Any, list[Any]]) -> None:
        """Rewind polled partitions to their first message not yet handled, and pause them."""
        for tp, messages in polled.items():
            consumer.seek(tp, messages[0].offset)
        if polled:
            consumer.pause(*polled)

    def _handle(self, messages: list[Any], dlq: Any) -> None:
        accepted: list[tuple[Any, TurnRequest]] = []
        for m in messages:
            try:
                turn = parse(m.value)
                self.ingest.pipeline(turn.model)
            except UnknownPipelineError as exc:
                self._dead_letter(dlq, m, f"model: {exc}")
                continue
            except ValueError as exc:
                self._dead_letter(dlq, m, str(exc))
                continue
            request = TurnRequest.of(turn, turn.tenant, source_id=turn.idempotency_key())
            accepted.append((m, request))
        outcomes = self.ingest.ingest([r for _m, r in accepted])
        for (m, _r), outcome in zip(accepted, outcomes, strict=True):
            if isinstance(outcome, Refused):
                self._dead_letter(dlq, m, outcome.reason)
            elif outcome.duplicate:
                self.metrics.worker_messages.labels("duplicate").inc()
            else:
                self.stored += 1
                self.metrics.worker_messages.labels("stored").inc()

    def _dead_letter(self, dlq: Any, message: Any, reason: str) -> None:
        log.warning(
            "malformed message at %s[%d]@%d: %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )
        self.metrics.rejected.labels("malformed_message").inc()
        source = f"{message.topic}/{message.partition}/{message.offset}"
        headers = [("error", reason.encode()[:1000]), ("source", source.encode())]
        dlq.send(
            f"{self.settings.traffic_topic}.dlq",
            key=message.key,
            value=message.value,
            headers=headers,
        ).get(timeout=self.settings.kafka_timeout_s)
        self.dead += 1
        self.metrics.worker_messages.labels("dead_lettered").inc()
