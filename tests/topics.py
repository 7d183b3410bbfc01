"""Reading a Kafka topic back in tests: every message from the beginning, then stop."""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, TopicPartition


def read_topic(bootstrap: str, topic: str = "safety.alerts") -> list[Any]:
    """Every record on ``topic`` from its beginning (waiting up to 3 s for more)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        return list(consumer)
    finally:
        consumer.close()
