"""Micro-batching: concurrent turns of one pipeline share a forward pass.

``Ingest.submit`` ─► ``Batcher`` (one per pipeline: gathers requests until
``batch_max_tokens`` or ``batch_wait_ms``) ─► pipeline + engine in one worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from detectors.engine import Verdict
from monitor.pipeline import EncodedInput
from monitor.service.metrics import Metrics
from monitor.service.monitored import Monitored, evaluate_turns
from monitor.service.settings import ServiceSettings
from monitor.tokenization import TokenizedInput

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    tokenized: TokenizedInput
    future: asyncio.Future[tuple[EncodedInput, list[Verdict]]]


class NotRunningError(RuntimeError):
    """A turn to score while its pipeline's batcher is not running (the app is stopping)."""


class Batcher:
    """Gathers concurrent turns into one forward pass; the service, not the client, batches."""

    def __init__(self, monitored: Monitored, settings: ServiceSettings, metrics: Metrics):
        self.m = monitored
        self.max_tokens = settings.batch_max_tokens
        self.wait = settings.batch_wait_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"pipeline-{monitored.config.name}"
        )
        self.task: asyncio.Task[None] | None = None
        self.current: list[_Pending] = []  # the batch being gathered or evaluated

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop batching. Turns still waiting (queued, or in the batch cut short) fail with
        NotRunningError instead of waiting for ever."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)
        waiting, self.current = self.current, []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(
                    NotRunningError(f"pipeline {self.m.config.name!r} stopped before scoring")
                )

    async def submit(self, tokenized: TokenizedInput) -> tuple[EncodedInput, list[Verdict]]:
        future: asyncio.Future[tuple[EncodedInput, list[Verdict]]] = (
            asyncio.get_running_loop().create_future()
        )
        await self.queue.put(_Pending(tokenized, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = self.current = [first]
            tokens = len(first.tokenized)
            deadline = loop.time() + self.wait
            while tokens < self.max_tokens:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
                batch.append(item)
                tokens += len(item.tokenized)
            try:
                results = await loop.run_in_executor(self.executor, self._work, batch)
            except Exception as exc:  # a failed batch fails its requests, not the service
                log.exception("pipeline %s failed on a batch", self.m.config.name)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                self.current = []
                continue
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
            self.current = []

    def _work(self, batch: list[_Pending]) -> list[tuple[EncodedInput, list[Verdict]]]:
        return evaluate_turns(self.m, [p.tokenized for p in batch], self.metrics)
