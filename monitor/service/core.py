"""The service's work: micro-batch turns through a pipeline and its detectors, then record them.

``ingest.Ingest`` ─► ``Batcher`` (one per pipeline: gathers requests until
``batch_max_tokens`` or ``batch_wait_ms``) ─► pipeline + engine in one worker thread ─►
``record`` (one transaction: turn, features, verdicts, alerts, outbox rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from detectors.batch import TurnBatch
from detectors.engine import Engine, Verdict, catalog_dir, load_atlas_max, load_engine
from detectors.rules import Alerting
from monitor.messages import Message
from monitor.pipeline import EncodedInput, Pipeline
from monitor.service.alerting import Alerts, AlertSpec
from monitor.service.db import (
    Alert,
    Turn,
    TurnFeatures,
    VerdictRow,
    search_text,
    utcnow,
)
from monitor.service.metrics import Metrics
from monitor.service.redacted import Redacted
from monitor.service.settings import PipelineConfig, ServiceSettings
from monitor.tokenization import TokenizedInput

log = logging.getLogger(__name__)


@dataclass
class Monitored:
    """One configured pipeline: model + SAE + catalog, and its batcher."""

    config: PipelineConfig
    pipeline: Pipeline
    engine: Engine
    summaries: dict[str, str]
    alerting: dict[str, Alerting] = field(default_factory=dict)
    batcher: Batcher | None = None
    atlas_max: np.ndarray | None = None  # the SAE's per-feature maxima (shading, backtests)


@dataclass
class _Pending:
    tokenized: TokenizedInput
    future: asyncio.Future[tuple[EncodedInput, list[Verdict]]]


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

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

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
            batch = [first]
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
                continue
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)

    def _work(self, batch: list[_Pending]) -> list[tuple[EncodedInput, list[Verdict]]]:
        return evaluate_turns(self.m, [p.tokenized for p in batch], self.metrics)


def evaluate_turns(
    monitored: Monitored, tokenized: list[TokenizedInput], metrics: Metrics | None = None
) -> list[tuple[EncodedInput, list[Verdict]]]:
    """One forward pass and one engine pass over tokenized turns: (encoded, verdicts) each,
    observed as one batch on ``metrics`` when given."""
    started = time.perf_counter()
    encoded = monitored.pipeline.encode_tokenized(tokenized)
    verdicts = monitored.engine.evaluate(TurnBatch.from_encoded(encoded))
    if metrics is not None:
        seconds = time.perf_counter() - started
        tokens = sum(len(e.ids) for e in encoded)
        metrics.observe_batch(monitored.config.name, len(tokenized), tokens, seconds)
    return list(zip(encoded, verdicts, strict=True))


def load_monitored(config: PipelineConfig, settings: ServiceSettings) -> Monitored:
    from detectors.rules import RuleSpec

    pipeline = Pipeline.from_settings(settings.pipeline_settings(config))
    atlas_max = load_atlas_max(pipeline.sae)
    engine = load_engine(config.catalog or [catalog_dir()], pipeline.sae, atlas_max)
    specs = [d.spec for d in engine.detectors]
    summaries = {s.id: s.annotations.summary for s in specs}
    alerting = {s.id: s.alerting for s in specs if s.alerting is not None}
    rules = sum(isinstance(d.spec, RuleSpec) for d in engine.detectors)
    log.info(
        "pipeline %s: %s layer %d, %d detectors (%d rules)",
        config.name,
        pipeline.model.name,
        pipeline.layer,
        len(engine.detectors),
        rules,
    )
    return Monitored(config, pipeline, engine, summaries, alerting, atlas_max=atlas_max)


@dataclass(frozen=True)
class Recorded:
    turn_id: str
    conversation_id: str  # as stored (redacted)
    alert_ids: list[str] = field(default_factory=list)
    duplicate: bool = False
    alerts: list[tuple[str, str]] = field(default_factory=list)  # (detector, severity) made


def _features_row(turn_id: str, e: EncodedInput, tokens: list[str]) -> TurnFeatures:
    f = e.features
    return TurnFeatures(
        turn_id=turn_id,
        tokens=tokens,
        roles=np.asarray([int(r) for r in e.roles], dtype=np.int8).tobytes(),
        indptr=f.indptr.numpy().astype(np.int32).tobytes(),
        indices=f.indices.numpy().astype(np.int32).tobytes(),
        values=f.values.numpy().astype(np.float16).tobytes(),
    )


def record(
    sessions: sessionmaker[Session],
    *,
    tenant: str,
    conversation_id: str,
    messages: list[Message],
    metadata: dict[str, Any],
    monitored: Monitored,
    encoded: EncodedInput,
    verdicts: list[Verdict],
    settings: ServiceSettings,
    source_id: str | None = None,
    turn_id: str | None = None,
) -> Recorded:
    """Store one evaluated turn, its features, verdicts, alerts and outbox rows, atomically.

    With a ``source_id`` the turn is stored once per tenant: a second delivery returns the
    first one's ids (``duplicate=True``). A detector's ``alerting`` policy applies here: within
    its cooldown a fire is counted on the conversation's last alert instead of making a new
    one; when its window's count of the tenant's fires is reached, an escalation alert is made
    (once per window).
    """
    turn_id = turn_id or str(uuid.uuid4())
    now = utcnow()
    stored = Redacted.of(conversation_id, messages, metadata, encoded, settings)
    metadata, conversation_id = stored.metadata, stored.conversation_id
    with sessions() as session:
        if source_id is not None:
            found = _existing(session, tenant, source_id)
            if found is not None:
                return found
        session.add(
            Turn(
                id=turn_id,
                tenant=tenant,
                conversation_id=conversation_id,
                source_id=source_id,
                pipeline=monitored.config.name,
                created_at=now,
                messages=stored.messages,
                search_text=search_text(stored.messages),
                meta=metadata,
                n_tokens=len(encoded.ids),
                dropped=encoded.dropped,
            )
        )
        session.flush()
        session.add(_features_row(turn_id, encoded, stored.tokens))
        evidence = [stored.evidence(v.evidence_json()) for v in verdicts]
        for v, e in zip(verdicts, evidence, strict=True):
            session.add(VerdictRow(turn_id=turn_id, detector=v.detector, kind=v.kind,
                                   score=v.score, fired=v.fired, severity=v.severity,
                                   evidence=e))  # fmt: skip
        session.flush()
        alerts = Alerts(session, tenant, conversation_id, turn_id, now, monitored.config.name,
                        metadata, settings.webhooks)  # fmt: skip
        alert_ids = []
        for v, e in zip(verdicts, evidence, strict=True):
            if not v.fired or (v.kind != "rule" and not settings.alert_on_probes):
                continue
            spec = AlertSpec(v.detector, v.kind, v.severity, v.score,
                             monitored.summaries.get(v.detector, ""), e)  # fmt: skip
            alert_ids.extend(alerts.fired(spec, monitored.alerting.get(v.detector)))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if source_id is not None:  # a concurrent delivery of the same turn won the race
                found = _existing(session, tenant, source_id)
                if found is not None:
                    return found
            raise
    return Recorded(turn_id, conversation_id, alert_ids, alerts=alerts.created)


def _existing(session: Session, tenant: str, source_id: str) -> Recorded | None:
    turn = session.scalar(select(Turn).where(Turn.tenant == tenant, Turn.source_id == source_id))
    if turn is None:
        return None
    ids = session.scalars(select(Alert.id).where(Alert.turn_id == turn.id)).all()
    return Recorded(turn.id, turn.conversation_id, list(ids), duplicate=True)
