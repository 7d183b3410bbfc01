"""``safety-monitor bench --guard``: the same chat requests straight to the upstream and through
the guard, side by side in one run.

Without ``--upstream`` llama.cpp's server is started on loopback with the built-in SmolLM2 GGUF
(one thread, so that the guard has the other core). The guard is a ``safety-monitor serve``
process of its own on a throwaway SQLite file, with every detector observed; a second tenant has the
curated ``block`` and ``abort`` policies on, to show what input and stream scoring add.
Requests alternate direct / guard, one at a time, and each is read to the end of its response
(the guard records the turn before it ends the stream). Times are the client's: time to first
token, and tokens per second from the first to the last content chunk; medians are quoted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy.orm import Session

from monitor.config import Settings
from monitor.localservices import free_port, stop_process, wait_http
from monitor.service.db import make_engine
from monitor.service.keys import create_key
from monitor.upstream import LlamaServer

PROMPTS = [
    "Explain how a lighthouse works.",
    "Give me three tips for learning to cook.",
    "What is the difference between weather and climate?",
    "Write a short note inviting a colleague to lunch.",
]


@dataclass(frozen=True)
class GuardBenchOptions:
    upstream: str | None = None
    requests: int = 12  # per path and mode
    max_tokens: int = 64


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    tokens: int
    tps: float
    total_s: float


_sent = itertools.count()


def _body(prompt: str, opts: GuardBenchOptions, stream: bool) -> dict[str, Any]:
    # Numbered: llama.cpp reuses the cached prefix of the prompt it read last, and a request
    # repeating its predecessor's prompt would start sooner for that reason alone.
    return {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": f"({next(_sent)}) {prompt}"}],
        "temperature": 0,
        "max_tokens": opts.max_tokens,
        "stream": stream,
        # End tokens forbidden (SmolLM2's ids): every answer is max_tokens long, so the paths
        # are compared on equal work. Another upstream ignores ids it does not have.
        "logit_bias": {"0": -100, "2": -100},
    }


def time_stream(client: httpx.Client, url: str, body: dict[str, Any], key: str | None) -> Timing:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if _content(line):
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += 1
    ended = time.perf_counter()
    span = last - first
    tps = (tokens - 1) / span if span > 0 else 0.0
    return Timing(first - started, tokens, tps, ended - started)


def _content(line: str) -> str:
    """The text of an SSE ``data:`` line's first choice, or ''."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return ""
    choices = json.loads(line[5:]).get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def time_whole(client: httpx.Client, url: str, body: dict[str, Any], key: str | None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    client.post(url, json=body, headers=headers).raise_for_status()
    return time.perf_counter() - started


@contextlib.contextmanager
def _upstream(opts: GuardBenchOptions) -> Iterator[str]:
    if opts.upstream:
        yield opts.upstream.rstrip("/")
        return
    with LlamaServer(Settings().cache_dir, threads=1) as server:
        yield server.base_url


def _cpu(process: psutil.Process) -> float:
    """CPU seconds the process (all its threads) has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def _guard(upstream: str, db_url: str) -> Iterator[tuple[str, psutil.Process]]:
    """``safety-monitor serve`` in guard mode, a process of its own as deployed (its client,
    this bench, must not share its interpreter); its base URL once ready."""
    port = free_port()
    policies = {"enforcing": {"scam_email": "block", "deception": "abort"}}
    env = {
        **os.environ,
        "SAFETY_MONITOR_DATABASE_URL": db_url,
        "SAFETY_MONITOR_GUARD_UPSTREAM": upstream,
        "SAFETY_MONITOR_GUARD": json.dumps({"tenant_policies": policies}),
    }
    cli = str(Path(sys.executable).with_name("safety-monitor"))
    with tempfile.NamedTemporaryFile(prefix="guard-", suffix=".log") as log:
        proc = subprocess.Popen(
            [cli, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz", proc, 300, "the guard", Path(log.name))
            yield base, psutil.Process(proc.pid)
        finally:
            stop_process(proc)


def run_guard_bench(opts: GuardBenchOptions) -> dict[str, Any]:
    with _upstream(opts) as upstream, tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        with _guard(upstream, db_url) as (base, process), httpx.Client(timeout=300) as client:
            with Session(make_engine(db_url)) as session:
                observing = create_key(session, "observing", "ingest")
                enforcing = create_key(session, "enforcing", "ingest")
                session.commit()
            direct_url = f"{upstream}/chat/completions"
            guard_url = f"{base}/v1/chat/completions"
            time_stream(client, direct_url, _body(PROMPTS[0], opts, True), None)  # warm up
            time_stream(client, guard_url, _body(PROMPTS[0], opts, True), observing)
            direct: list[Timing] = []
            guarded: list[Timing] = []
            enforced: list[Timing] = []
            added: list[float] = []
            cpu_s = 0.0
            for i in range(opts.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                direct.append(time_stream(client, direct_url, _body(prompt, opts, True), None))
                before = _cpu(process)
                guarded.append(time_stream(client, guard_url, _body(prompt, opts, True), observing))
                cpu_s += _cpu(process) - before
                enforced.append(
                    time_stream(client, guard_url, _body(prompt, opts, True), enforcing)
                )
                whole = _body(prompt, opts, False)
                plain = time_whole(client, direct_url, whole, None)
                added.append(time_whole(client, guard_url, whole, observing) - plain)

    def median(xs: list[Timing], attr: str) -> float:
        return float(statistics.median(getattr(t, attr) for t in xs))

    tps_direct, tps_guard = median(direct, "tps"), median(guarded, "tps")
    pairs = [g.tps / d.tps for g, d in zip(guarded, direct, strict=True) if d.tps > 0]
    relayed = sum(t.tokens for t in guarded)
    ttft_direct, ttft_guard = median(direct, "ttft_s"), median(guarded, "ttft_s")
    return {
        "upstream": "given" if opts.upstream else "llama.cpp smollm2-135m-instruct, 1 thread",
        "requests": opts.requests,
        "max_tokens": opts.max_tokens,
        "tokens_per_answer": statistics.median(t.tokens for t in guarded),
        "ttft_direct_ms": ttft_direct * 1000,
        "ttft_guard_ms": ttft_guard * 1000,
        "ttft_added_ms": (ttft_guard - ttft_direct) * 1000,
        "tps_direct": tps_direct,
        "tps_guard": tps_guard,
        "overhead_ratio": tps_guard / tps_direct if tps_direct else 0.0,
        "overhead_ratio_paired": statistics.median(pairs) if pairs else 0.0,
        # The guard process's CPU per streamed token (relay and recording), observe policy.
        "guard_cpu_ms_per_token": cpu_s * 1000 / relayed if relayed else 0.0,
        "ttft_enforcing_ms": median(enforced, "ttft_s") * 1000,
        "tps_enforcing": median(enforced, "tps"),
        "added_latency_p50_ms": _pct(added, 0.5) * 1000,
        "added_latency_p99_ms": _pct(added, 0.99) * 1000,
    }
