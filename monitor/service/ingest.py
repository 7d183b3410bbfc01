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
from monitor.service.batcher import Batcher, NotRunningError
from monitor.service.metrics import Metrics
from monitor.service.monitored import Monitored, evaluate_turns
from monitor.service.recorder import record
from monitor.service.schemas import TurnIn
from monitor.service.settings import ServiceSettings
from monitor.tokenization import TokenizedInput

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
    unread_parts: int = 0  # content parts no detector can read (images, audio, files)

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
        return cls(
            tenant,
            body.conversation_id,
            [m.monitored() for m in body.messages],
            body.metadata,
            body.model,
            source_id,
            turn_id,
            sum(m.unread_parts for m in body.messages),
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
    windows: int = 1  # forward-pass windows it was read in
    unread_parts: int = 0  # content parts no detector can read


@dataclass(frozen=True)
class Scored:
    """A turn evaluated and not yet recorded."""

    monitored: Monitored
    evaluated: Evaluated

    @property
    def verdicts(self) -> list[Verdict]:
        return self.evaluated[1]


@dataclass(frozen=True)
class Refused:
    """The database refused this turn's content (not an outage): it was not stored."""

    reason: str


class UnknownPipelineError(ValueError):
    """The request names no configured pipeline."""


class TurnTooLongError(ValueError):
    """The turn is longer than the pipeline reads (``max_input_tokens``): refused, not cut."""


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
        # This runtime's micro-batchers, one per pipeline, on the app's event loop. They are
        # not the pipeline's: one loaded pipeline may serve two apps (a test's), each its own.
        self.batchers: dict[str, Batcher] = {}

    def start_batchers(self) -> None:
        """Start one micro-batcher per pipeline on the running event loop."""
        for name, monitored in self.pipelines.items():
            self.batchers[name] = Batcher(monitored, self.settings, self.metrics)
            self.batchers[name].start()

    async def stop_batchers(self) -> None:
        """Stop every batcher (each even if another's stop fails); turns scored after this are
        refused (``NotRunningError``), not queued to a batcher that no longer runs."""
        batchers, self.batchers = list(self.batchers.values()), {}
        for failed in await asyncio.gather(*(b.stop() for b in batchers), return_exceptions=True):
            if isinstance(failed, BaseException):
                raise failed

    def pipeline(self, name: str | None) -> Monitored:
        """The pipeline a request names (None: the first configured), or UnknownPipelineError."""
        found = self.pipelines.get(name or next(iter(self.pipelines), ""))
        if found is None:
            configured = ", ".join(self.pipelines) or "none"
            raise UnknownPipelineError(f"no pipeline named {name!r}; configured: {configured}")
        return found

    def tokenize(self, monitored: Monitored, turn: TurnRequest) -> TokenizedInput:
        """The turn's tokens, or TurnTooLongError: a turn is read whole or not at all."""
        tokenized = monitored.pipeline.tokenizer.tokenize(turn.messages)
        if tokenized.dropped:
            limit = monitored.pipeline.tokenizer.max_tokens
            raise TurnTooLongError(
                f"the turn is {len(tokenized) + tokenized.dropped} tokens long, over the "
                f"{limit} tokens a turn may have (max_input_tokens)"
            )
        return tokenized

    def check(self, turn: TurnRequest) -> None:
        """Raise what ``submit`` would refuse the turn for, before it is accepted for later."""
        self.tokenize(self.pipeline(turn.pipeline), turn)

    async def submit(self, turn: TurnRequest) -> Ingested:
        """One turn through its pipeline's micro-batcher, then recorded (in a thread).

        Raises UnknownPipelineError, TurnTooLongError, and whatever recording raises
        (``DB_UNAVAILABLE``, DataError).
        """
        return await self.record_scored(turn, await self.score(turn))

    async def score(self, turn: TurnRequest) -> Scored:
        """One turn evaluated through its pipeline's micro-batcher and not recorded (the guard
        scores a request, or an answer as it streams, before deciding; ``record_scored`` then
        stores the evaluation it acted on). Raises UnknownPipelineError, TurnTooLongError."""
        monitored = self.pipeline(turn.pipeline)
        batcher = self.batchers.get(monitored.config.name)  # started with the app
        if batcher is None:
            raise NotRunningError(f"pipeline {monitored.config.name!r} is not running (stopping)")
        evaluated = await batcher.submit(self.tokenize(monitored, turn))
        return Scored(monitored, evaluated)

    async def record_scored(self, turn: TurnRequest, scored: Scored) -> Ingested:
        """Record (in a thread) a turn ``score`` evaluated: stored, alerted, observed."""
        return await asyncio.to_thread(self._record, scored.monitored, turn, scored.evaluated)

    def ingest(self, turns: Sequence[TurnRequest]) -> list[Ingested | Refused]:
        """Turns evaluated in this thread (one forward pass per pipeline), then recorded in
        order. A turn the database refuses is ``Refused`` and the others go on; an outage
        (``DB_UNAVAILABLE``) propagates, leaving the turns before it stored."""
        monitored = [self.pipeline(t.pipeline) for t in turns]
        out: list[Ingested | Refused | None] = [None] * len(turns)
        tokenized: dict[int, TokenizedInput] = {}
        for i, (turn, m) in enumerate(zip(turns, monitored, strict=True)):
            try:
                tokenized[i] = self.tokenize(m, turn)
            except TurnTooLongError as exc:
                out[i] = Refused(str(exc))
        evaluated = self._evaluate(tokenized, monitored)
        for i, e in evaluated.items():
            try:
                out[i] = self._record(monitored[i], turns[i], e)
            except DataError as exc:  # the turn's fault, not the database's
                out[i] = Refused(f"the database refused it: {exc.orig}")
        done = [o for o in out if o is not None]
        assert len(done) == len(turns), "every turn is recorded or refused"
        return done

    def _evaluate(
        self, tokenized: Mapping[int, TokenizedInput], monitored: list[Monitored]
    ) -> dict[int, Evaluated]:
        """Evaluate the tokenized turns (by index), one forward pass per pipeline."""
        by_pipeline: dict[str, list[int]] = {}
        for i in sorted(tokenized):
            by_pipeline.setdefault(monitored[i].config.name, []).append(i)
        evaluated: dict[int, Evaluated] = {}
        for indices in by_pipeline.values():
            m = monitored[indices[0]]
            results = evaluate_turns(m, [tokenized[i] for i in indices], self.metrics)
            evaluated.update(zip(indices, results, strict=True))
        return dict(sorted(evaluated.items()))

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
            encoded.windows,
            turn.unread_parts,
        )
