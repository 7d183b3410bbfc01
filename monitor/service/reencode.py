"""Re-encoding stored history with a new SAE (``safety-monitor db reencode``).

Each stored turn's messages (as stored: redacted when redaction is on) are read again by the
model and the new SAE the way ingest reads a turn (tokenizer, windows, truncated forward,
encoder), in pages; each page's ``turn_features`` rows and its turns' ``sae_fingerprint`` are
replaced in one transaction. A turn already read with the new SAE is skipped, so running it
again continues a run that stopped. Verdicts and alerts are never touched. Pages are encoded
in this process (``PageEncoder``) or by Ray actors that each load the model and SAE once
(``ray_pages``); only the driver reads and writes the database.

``Turn.sae_fingerprint`` (``sae_fingerprint``): the dictionary a turn was read with, recorded
at ingest and here, shown by the audit, counted by the backtest; NULL (turns stored before
migration 0008): unknown.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from monitor.service import features
from monitor.service.audit import AuditFilter, keyset_pages
from monitor.service.db import Turn, TurnFeatures, utcnow

if TYPE_CHECKING:
    from torch import Tensor

    from monitor.config import Settings
    from monitor.pipeline import Pipeline

log = logging.getLogger(__name__)

PAGE_SIZE = 64
Page = list[tuple[str, list[dict[str, Any]]]]  # (turn id, stored messages)


@dataclass(frozen=True)
class EncodedTurn:
    """One turn's re-encoded feature columns, as ``features.row`` writes them (picklable: Ray
    actors send these back). ``error`` set: the turn could not be read, nothing to store."""

    turn_id: str
    tokens: list[str]
    roles: bytes = b""
    indptr: bytes = b""
    indices: bytes = b""
    values: bytes = b""
    error: str | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """What a page encoder builds its pipeline from: the model, the layer and the new SAE's
    cfg and tensors (so a Ray node needs the model in its cache, not the SAE's directory)."""

    model: str
    cache_dir: str
    device: str
    layer: int
    max_tokens: int
    batch_size: int
    max_input_tokens: int
    cfg: dict[str, Any]
    tensors: dict[str, Tensor]
    fingerprint: str


def load_spec(settings: Settings, sae_dir: Path) -> EncoderSpec:
    """The new SAE loaded and checked against the model (``d_in``, SAEError) without reading
    the model's weights; the layer as the pipeline picks it (setting, else the SAE's)."""
    from monitor.models.loading import load_model
    from monitor.sae.base import SAEError
    from monitor.sae.saelens import load_sae

    sae = load_sae(sae_dir)  # a bad directory fails before the model is looked at
    loaded = load_model(settings.model, settings.cache_dir, "meta")
    if sae.d_in != loaded.adapter.d_model:
        raise SAEError(
            f"{sae_dir}: d_in is {sae.d_in} but {settings.model}'s residual stream is "
            f"{loaded.adapter.d_model} wide; this SAE was made for another model"
        )
    layer = settings.layer or sae.hook_layer or loaded.default_layer
    if sae.hook_layer is not None and sae.hook_layer != layer:
        log.warning("SAE was trained on layer %d, but layer %d is used", sae.hook_layer, layer)
    return EncoderSpec(
        settings.model,
        str(settings.cache_dir),
        settings.device,
        layer,
        settings.max_tokens,
        settings.batch_size,
        settings.max_input_tokens,
        dict(sae.cfg),
        dict(sae.stored),
        sae.identity,
    )


class PageEncoder:
    """The model and the new SAE, loaded once; ``encode`` reads a page of stored turns. Runs in
    the driver, or as a Ray actor (``ray_pages``)."""

    def __init__(self, spec: EncoderSpec) -> None:
        from monitor.config import resolve_device
        from monitor.models.loading import load_model
        from monitor.pipeline import Pipeline
        from monitor.sae.registry import ARCHITECTURES

        loaded = load_model(spec.model, Path(spec.cache_dir), resolve_device(spec.device))
        sae = ARCHITECTURES[spec.cfg["architecture"]](spec.cfg, spec.tensors)
        if sae.identity != spec.fingerprint:
            raise RuntimeError(f"rebuilt SAE is {sae.identity}, not {spec.fingerprint}")
        self.pipeline: Pipeline = Pipeline(
            loaded, sae, spec.layer, spec.max_tokens, spec.batch_size, spec.max_input_tokens
        )

    def encode(self, page: Page) -> list[EncodedTurn]:
        """Each turn's features from its stored messages, as ingest reads a turn."""
        from monitor.messages import Message

        tokenizer = self.pipeline.tokenizer
        out: dict[str, EncodedTurn] = {}
        ok, tokenized = [], []
        for turn_id, messages in page:
            try:
                tokenized.append(tokenizer.tokenize([Message(**m) for m in messages]))
                ok.append(turn_id)
            except (ValueError, TypeError) as exc:  # InputError and pydantic's too
                out[turn_id] = EncodedTurn(turn_id, [], error=f"{type(exc).__name__}: {exc}")
        for turn_id, encoded in zip(ok, self.pipeline.encode_tokenized(tokenized), strict=True):
            r = features.row(turn_id, encoded, list(encoded.tokens))
            out[turn_id] = EncodedTurn(turn_id, r.tokens, r.roles, r.indptr, r.indices, r.values)
        return [out[turn_id] for turn_id, _ in page]


@dataclass(frozen=True)
class Scope:
    """Which stored turns: one pipeline's, optionally one tenant's, from ``since``; up to
    ``until`` (the run's start by default: turns stored meanwhile are the next run's)."""

    pipeline: str
    tenant: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


@dataclass
class Report:
    fingerprint: str
    total: int = 0  # turns in scope still read with another (or an unknown) SAE at the start
    already: int = 0  # turns in scope already read with this SAE: skipped
    reencoded: int = 0
    failed: int = 0  # stored messages the tokenizer refused: left as they were
    gone: int = 0  # deleted (retention) while the run went on
    pages: int = 0


PageMap = Callable[[Iterator[Page]], Iterator[list[EncodedTurn]]]


def local_pages(encoder: PageEncoder) -> PageMap:
    """Pages encoded one after the other in this process."""
    return lambda pages: (encoder.encode(p) for p in pages)


def reencode(
    sessions: sessionmaker[Session],
    scope: Scope,
    fingerprint: str,
    encode: PageMap,
    page_size: int = PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Re-encode the turns of ``scope`` not yet read with the SAE ``fingerprint``: pages read
    here, encoded by ``encode``, each written back in one transaction; ``progress(done,
    total)`` after each. Verdicts and alerts are left as they are."""
    until = scope.until or utcnow()
    flt = AuditFilter(scope.tenant, model=scope.pipeline, since=scope.since, until=until)
    other = or_(Turn.sae_fingerprint.is_(None), Turn.sae_fingerprint != fingerprint)
    query = flt.turns().where(other)
    report = Report(fingerprint)
    with sessions() as session:
        report.total = _count(session, query)
        report.already = _count(session, flt.turns().where(Turn.sae_fingerprint == fingerprint))
    for encoded in encode(_pages(sessions, query, page_size)):
        written, gone = write_page(sessions, [e for e in encoded if e.error is None], fingerprint)
        for e in encoded:
            if e.error is not None:
                log.warning("turn %s not re-encoded: %s", e.turn_id, e.error)
        report.reencoded += written
        report.gone += gone
        report.failed += sum(e.error is not None for e in encoded)
        report.pages += 1
        if progress is not None:
            progress(report.reencoded + report.gone + report.failed, report.total)
    return report


def _count(session: Session, query: Any) -> int:
    return session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0


def _pages(sessions: sessionmaker[Session], query: Any, page_size: int) -> Iterator[Page]:
    """Pages of (turn id, messages), oldest first."""
    for turns, _ in keyset_pages(sessions, query, Turn, page_size):
        yield [(t.id, list(t.messages)) for t in turns]


def write_page(
    sessions: sessionmaker[Session], encoded: list[EncodedTurn], fingerprint: str
) -> tuple[int, int]:
    """Replace the page's feature rows and set its turns' fingerprint, in one transaction.
    Returns (turns written, turns gone meanwhile)."""
    ids = [e.turn_id for e in encoded]
    if not ids:
        return 0, 0
    with sessions.begin() as session:
        # Locked (PostgreSQL) so that retention cannot delete them under this transaction.
        present = set(
            session.scalars(select(Turn.id).where(Turn.id.in_(ids)).with_for_update()).all()
        )
        stored = select(TurnFeatures).where(TurnFeatures.turn_id.in_(present))
        rows = {r.turn_id: r for r in session.scalars(stored)}
        for e in encoded:
            if e.turn_id not in present:
                continue
            row = rows.get(e.turn_id)
            if row is None:
                row = TurnFeatures(turn_id=e.turn_id)
                session.add(row)
            row.tokens, row.roles, row.indptr = e.tokens, e.roles, e.indptr
            row.indices, row.values = e.indices, e.values
        session.execute(
            update(Turn).where(Turn.id.in_(present)).values(sae_fingerprint=fingerprint)
        )
    return len(present), len(ids) - len(present)


def ray_pages(ray: Any, spec: EncoderSpec, workers: int) -> PageMap:
    """Pages encoded by ``workers`` Ray actors (one CPU each), each holding the model and the
    SAE; at most two pages per actor in flight, results as they finish."""
    import importlib

    ref = ray.put(spec)
    actor = ray.remote(num_cpus=1)(PageEncoder)
    pool = importlib.import_module("ray.util").ActorPool(
        [actor.remote(ref) for _ in range(workers)]
    )

    def run(pages: Iterator[Page]) -> Iterator[list[EncodedTurn]]:
        in_flight = 0
        for page in pages:
            if in_flight >= 2 * workers:
                yield pool.get_next_unordered()
                in_flight -= 1
            pool.submit(lambda a, p: a.encode.remote(p), page)
            in_flight += 1
        while pool.has_next():
            yield pool.get_next_unordered()

    return run
