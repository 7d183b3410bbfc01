"""The one ingest path: turns in, evaluated, recorded and observed; recorded results out.

Every way in (``POST /v1/turns``, the batch queue, the Kafka worker, the guard proxy) turns its
input into ``TurnRequest``s and hands them to ``Ingest``. Only how a turn is evaluated differs:
``submit`` (async callers) sends one turn through its pipeline's micro-batcher, to share a
forward pass with concurrent turns; ``ingest`` (a worker's thread) evaluates many here, one
forward pass per pipeline. Both then store, observe and answer through ``_record``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from detectors.engine import Verdict
from monitor.messages import Message
from monitor.pipeline import EncodedInput
from monitor.service.core import Monitored, evaluate_turns, record
from monitor.service.metrics import Metrics
from monitor.service.schemas import TurnIn
from monitor.service.settings import ServiceSettings

Evaluated = tuple[EncodedInput, list[Verdict]]


@dataclass(frozen=True)
class TurnRequest:
    """One turn to monitor, as every way in hands it over."""

    tenant: str
    conversation_id: str
    messages: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)
    pipeline: str | None = None  # None: the first configured one
    source_id: str | None = None  # the idempotency key: stored once per tenant
    turn_id: str | None = None  # None: a new id

    @classmethod
    def of(
        cls,
        body: TurnIn,
        tenant: str,
        *,
        source_id: str | None = None,
        turn_id: str | None = None,
    ) -> TurnRequest:
        """A request from the shared request body (HTTP and Kafka)."""
        messages = [Message(role=m.role, content=m.content) for m in body.messages]
        return cls(
            tenant, body.conversation_id, messages, body.metadata, body.model, source_id, turn_id
        )


@dataclass(frozen=True)
class Ingested:
    """A recorded turn: its ids as stored, its verdicts and the alerts it made."""

    turn_id: str
    conversation_id: str  # as stored: redacted when it held personal data
    pipeline: str
    verdicts: list[Verdict]
    alert_ids: list[str]
    duplicate: bool = False  # its source id was stored before: the first one's ids
    n_tokens: int = 0  # tokens the detectors read
    dropped_tokens: int = 0  # cut from the front of a turn longer than the model's window


@dataclass(frozen=True)
class Refused:
    """The database refused this turn's content (not an outage): it was not stored."""

    reason: str


class UnknownPipelineError(ValueError):
    """The request names no configured pipeline."""


class Ingest:
    """Evaluate turns, record them (turn, features, verdicts, alerts, outbox), observe them."""

    def __init__(
        self,
        pipelines: Mapping[str, Monitored],
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        metrics: Metrics,
    ) -> None:
        self.pipelines = pipelines
        self.sessions = sessions
        self.settings = settings
        self.metrics = metrics

    def pipeline(self, name: str | None) -> Monitored:
        """The pipeline a request names (None: the first configured), or UnknownPipelineError."""
        found = self.pipelines.get(name or next(iter(self.pipelines), ""))
        if found is None:
            configured = ", ".join(self.pipelines) or "none"
            raise UnknownPipelineError(f"no pipeline named {name!r}; configured: {configured}")
        return found

    async def submit(self, turn: TurnRequest) -> Ingested:
        """One turn through its pipeline's micro-batcher, then recorded (in a thread).

        Raises UnknownPipelineError, and whatever recording raises (``DB_UNAVAILABLE``, DataError).
        """
        monitored = self.pipeline(turn.pipeline)
        assert monitored.batcher is not None, "batchers start with the app"
        evaluated = await monitored.batcher.submit(turn.messages)
        return await asyncio.to_thread(self._record, monitored, turn, evaluated)

    def ingest(self, turns: Sequence[TurnRequest]) -> list[Ingested | Refused]:
        """Turns evaluated in this thread (one forward pass per pipeline), then recorded in
        order. A turn the database refuses is ``Refused`` and the others go on; an outage
        (``DB_UNAVAILABLE``) propagates, leaving the turns before it stored."""
        monitored = [self.pipeline(t.pipeline) for t in turns]
        evaluated = self._evaluate(turns, monitored)
        out: list[Ingested | Refused] = []
        for turn, m, e in zip(turns, monitored, evaluated, strict=True):
            try:
                out.append(self._record(m, turn, e))
            except DataError as exc:  # the turn's fault, not the database's
                out.append(Refused(f"the database refused it: {exc.orig}"))
        return out

    def _evaluate(
        self, turns: Sequence[TurnRequest], monitored: list[Monitored]
    ) -> list[Evaluated]:
        by_pipeline: dict[str, list[int]] = {}
        for i, m in enumerate(monitored):
            by_pipeline.setdefault(m.config.name, []).append(i)
        evaluated: dict[int, Evaluated] = {}
        for indices in by_pipeline.values():
            m = monitored[indices[0]]
            tokenized = [m.pipeline.tokenizer.tokenize(turns[i].messages) for i in indices]
            results = evaluate_turns(m, tokenized, self.metrics)
            evaluated.update(zip(indices, results, strict=True))
        return [evaluated[i] for i in range(len(turns))]

    def _record(self, monitored: Monitored, turn: TurnRequest, evaluated: Evaluated) -> Ingested:
        encoded, verdicts = evaluated
        recorded = record(
            self.sessions,
            tenant=turn.tenant,
            conversation_id=turn.conversation_id,
            messages=turn.messages,
            metadata=turn.metadata,
            monitored=monitored,
            encoded=encoded,
            verdicts=verdicts,
            settings=self.settings,
            source_id=turn.source_id,
            turn_id=turn.turn_id,
        )
        name = monitored.config.name
        self.metrics.observe_turn(name, verdicts, recorded)
        return Ingested(
            recorded.turn_id,
            recorded.conversation_id,
            name,
            verdicts,
            recorded.alert_ids,
            recorded.duplicate,
            len(encoded.tokens),
            encoded.dropped,
        )
