"""``safety-monitor bench --service``: the whole service against the raw pipeline, in one run.

The service runs in this process (uvicorn in a thread) on a real PostgreSQL and a real
Kafka-protocol broker: the configured ones, else a throwaway cluster and a Tansu broker on
loopback. Closed-loop clients send the same turns the raw pipeline gets; the service's rate
counts from the first request to the moment every turn is stored and every alert published.
Latency is measured at saturation (all clients) and at half load (an open loop at half the
saturated rate). Clients share the machine with the service, as a sidecar's callers would not;
on 2 cores that is part of what the ratio measures.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from detectors.batch import TurnBatch
from monitor.localservices import Broker, ThreadedServer, postgres
from monitor.service.app import create_app
from monitor.service.db import Outbox
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBenchOptions:
    turns: int = 96
    clients: int = 16
    repeats: int = 3


def _texts(n: int) -> list[list[dict[str, str]]]:
    """Conversations of realistic length: the bundled replay traffic, cycled."""
    import json
    from importlib import resources

    source = resources.files("monitor") / "data" / "traffic.jsonl"
    turns = [json.loads(x)["messages"] for x in source.read_text().splitlines() if x.strip()]
    return [turns[i % len(turns)] for i in range(n)]


@contextlib.contextmanager
def _services(settings: ServiceSettings) -> Iterator[tuple[str, str]]:
    if settings.database_url and settings.kafka_bootstrap:
        yield settings.database_url, settings.kafka_bootstrap
        return
    with postgres() as url:
        broker = Broker()
        broker.start()
        try:
            yield url, broker.bootstrap
        finally:
            broker.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_service_bench(monitored: Monitored, opts: ServiceBenchOptions) -> dict[str, Any]:
    conversations = _texts(opts.turns)
    pipeline = monitored.pipeline
    tokenized = [pipeline.tokenizer.tokenize(c) for c in conversations]
    n_tokens = sum(len(t) for t in tokenized)

    def raw() -> None:
        size = pipeline.batch_size
        for i in range(0, len(tokenized), size):
            encoded = pipeline.encode_tokenized(tokenized[i : i + size])
            monitored.engine.evaluate(TurnBatch.from_encoded(encoded))

    raw()  # warm-up
    base = ServiceSettings()
    with _services(base) as (db_url, bootstrap):
        settings = ServiceSettings(
            database_url=db_url, kafka_bootstrap=bootstrap, dispatch_interval_s=0.05
        )
        app = create_app(settings, [monitored])
        server = ThreadedServer(app).start()
        state = app.state.monitor
        with Session(state.engine) as session:
            key = create_key(session, "bench", "ingest")
            session.commit()
        url = f"{server.url}/v1/turns"
        headers = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=opts.clients))

        def send(i: int, tag: str) -> float:
            t0 = time.perf_counter()
            body = {"conversation_id": f"{tag}-{i}", "messages": conversations[i]}
            r = client.post(url, json=body, headers=headers)
            r.raise_for_status()
            return time.perf_counter() - t0

        def backlog() -> int:
            with Session(state.engine) as session:
                n = session.scalar(
                    select(func.count()).select_from(Outbox).where(Outbox.published_at.is_(None))
                )
            return int(n or 0)

        def saturated(tag: str) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(opts.clients) as pool:
                latencies = list(pool.map(lambda i: send(i, tag), range(opts.turns)))
            while backlog():  # stored and published
                time.sleep(0.02)
            return time.perf_counter() - t0, latencies

        try:
            saturated("warm")
            raw_s, service_s, sat_lat = [], [], []
            for r in range(opts.repeats):
                log.info("repeat %d/%d", r + 1, opts.repeats)
                t0 = time.perf_counter()
                raw()
                raw_s.append(time.perf_counter() - t0)
                seconds, latencies = saturated(f"sat{r}")
                service_s.append(seconds)
                sat_lat.extend(latencies)
            service_tps = n_tokens / statistics.median(service_s)
            raw_tps = n_tokens / statistics.median(raw_s)
            # Half load: an open loop sending at half the saturated turn rate.
            interval = 2 * statistics.median(service_s) / opts.turns
            half_lat: list[float] = []
            with ThreadPoolExecutor(opts.clients * 2) as pool:
                futures = []
                start = time.perf_counter()
                for i in range(opts.turns):
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(pool.submit(send, i, "half"))
                half_lat = [f.result() for f in futures]
        finally:
            client.close()
            server.stop()
    return {
        "model": pipeline.model.name,
        "turns": opts.turns,
        "tokens": n_tokens,
        "clients": opts.clients,
        "repeats": opts.repeats,
        "database": "postgresql",
        "service_tokens_per_s": service_tps,
        "pipeline_tokens_per_s": raw_tps,
        "service_ratio": service_tps / raw_tps,
        "latency_p50_s_saturated": _percentile(sat_lat, 0.5),
        "latency_p99_s_saturated": _percentile(sat_lat, 0.99),
        "latency_p50_s_half_load": _percentile(half_lat, 0.5),
        "latency_p99_s_half_load": _percentile(half_lat, 0.99),
    }
