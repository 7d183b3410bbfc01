"""Backtest a new or edited detector over stored history, without alerting.

Stored turns keep every token's sparse SAE code (``turn_features``), so a rule or an SAE probe
written for the pipeline's SAE is scored from storage, with no forward pass. A detector that
reads what storage lacks (a dense residual probe) re-encodes the stored text, which is the
redacted text when redaction is on (docs/operations.md, "Backtest").
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from detectors.batch import TurnBatch
from detectors.engine import Detector, Engine, bind
from detectors.rules import RuleError, Spec, load_definitions, parse_definition
from monitor.messages import Message
from monitor.sae.sparse import SparseActivations
from monitor.service.audit import AuditFilter, keyset_pages
from monitor.service.db import Turn, TurnFeatures
from monitor.service.features import StoredFeatures
from monitor.service.rows import utc_iso

if TYPE_CHECKING:
    from monitor.service.monitored import Monitored

log = logging.getLogger(__name__)

CHUNK = 64


@dataclass(frozen=True)
class Candidate:
    """The definition under test: where it came from and its spec."""

    source: str
    spec: Spec
    detector: Detector | None = None  # already bound (a catalog detector)


def candidate_from_file(path: Path) -> Candidate:
    """One definition from a YAML file (RuleError when it does not load or holds several)."""
    found = load_definitions([path])
    if len(found) != 1:
        raise RuleError(path, None, None, f"holds {len(found)} definitions; backtest takes one")
    return Candidate(str(path), found[0][1])


def candidate_from_text(text: str, name: str = "<request>") -> Candidate:
    """One definition from YAML text (an API request body)."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(name, None, None, f"not YAML: {exc}") from exc
    spec = parse_definition(doc, Path(name))
    if spec.kind != "rule":
        # A probe names a weights file on the server's disk: not something a request may pick.
        raise RuleError(
            name,
            spec.id,
            "kind",
            "only rules can be sent; backtest a probe by its "
            "catalog id, or from its file with `detectors backtest`",
        )
    return Candidate(name, spec)


def candidate_from_catalog(monitored: Monitored, detector_id: str) -> Candidate:
    try:
        d = monitored.engine.detector(detector_id)
    except KeyError:
        ids = ", ".join(x.id for x in monitored.engine.detectors)
        raise RuleError("<catalog>", detector_id, "id", f"no such detector; known: {ids}") from None
    return Candidate(f"catalog:{detector_id}", d.spec, d)


def backtest(
    sessions: sessionmaker[Session],
    monitored: Monitored,
    candidate: Candidate,
    flt: AuditFilter,
    samples: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score ``candidate`` and the pipeline's current detector of the same id over stored turns.

    Reports turns scored, how many were read from storage and how many re-encoded, fires per
    day for both, turns whose outcome changes, and samples of the turns the candidate fires on.
    ``progress(done, total)`` is called after each chunk of turns.
    """
    sae = monitored.pipeline.sae
    new = candidate.detector or bind(candidate.source, candidate.spec, sae, monitored.atlas_max)
    try:
        current: Detector | None = monitored.engine.detector(candidate.spec.id)
    except KeyError:
        current = None
    engines = {"new": Engine([new], sae.d_sae)}
    if current is not None:
        engines["current"] = Engine([current], sae.d_sae)
    per_day: dict[str, dict[str, int]] = defaultdict(lambda: {"turns": 0, "new": 0, "current": 0})
    totals = {
        "turns": 0,
        "new": 0,
        "current": 0,
        "from_storage": 0,
        "reencoded": 0,
        "newly_firing": 0,
        "no_longer_firing": 0,
    }
    fired_samples: list[dict[str, Any]] = []
    read_with: Counter[str | None] = Counter()  # turns per SAE fingerprint (None: unknown)
    query = flt.turns().where(Turn.pipeline == monitored.config.name)
    with sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0

    def stored_features(session: Session, turns: list[Turn]) -> dict[str, TurnFeatures]:
        ids = [t.id for t in turns]
        found = session.scalars(select(TurnFeatures).where(TurnFeatures.turn_id.in_(ids)))
        return {f.turn_id: f for f in found.all()}

    for turns, feats in keyset_pages(sessions, query, Turn, CHUNK, stored_features):
        assert feats is not None
        chunk = _Chunk(turns, feats, monitored)
        results = {name: chunk.score(e) for name, e in engines.items()}
        totals["reencoded" if chunk.reencoded else "from_storage"] += len(turns)
        new_scores, new_fired = results["new"]
        for i, t in enumerate(turns):
            read_with[t.sae_fingerprint] += 1
            day = t.created_at.date().isoformat()
            row = per_day[day]
            row["turns"] += 1
            totals["turns"] += 1
            fired_new = bool(new_fired[i])
            fired_cur = bool(results["current"][1][i]) if "current" in results else False
            row["new"] += fired_new
            totals["new"] += fired_new
            row["current"] += fired_cur
            totals["current"] += fired_cur
            totals["newly_firing"] += fired_new and not fired_cur
            totals["no_longer_firing"] += fired_cur and not fired_new
            if fired_new and len(fired_samples) < samples:
                fired_samples.append(
                    {
                        "turn_id": t.id,
                        "conversation_id": t.conversation_id,
                        "created_at": utc_iso(t.created_at),
                        "score": round(float(new_scores[i]), 4),
                        "current_score": round(float(results["current"][0][i]), 4)
                        if "current" in results
                        else None,
                        "fired_current": fired_cur,
                    }
                )
        if progress is not None:
            progress(totals["turns"], total)
    n = max(totals["turns"], 1)
    running = sae.identity
    other = sum(k for fp, k in read_with.items() if fp is not None and fp != running)
    if other:
        log.warning(
            "backtest %s: %d of %d turns were read with another SAE than this pipeline's (%s); "
            "their stored features mean other things: re-encode them (db reencode)",
            candidate.spec.id,
            other,
            totals["turns"],
            running,
        )
    return {
        "detector": candidate.spec.id,
        "kind": candidate.spec.kind,
        "source": candidate.source,
        "compared_with_current": current is not None,
        "since": flt.since.isoformat() if flt.since else None,
        "until": flt.until.isoformat() if flt.until else None,
        **totals,
        "new_rate": round(totals["new"] / n, 4),
        "current_rate": round(totals["current"] / n, 4) if current is not None else None,
        "per_day": [{"day": d, **per_day[d]} for d in sorted(per_day)],
        "samples": fired_samples,
        # Which SAE the turns' stored features were read with ("unknown": before fingerprints).
        "sae_fingerprint": running,
        "fingerprints": {fp or "unknown": k for fp, k in sorted(read_with.items(), key=_by_count)},
        "other_sae": other,
    }


def _by_count(item: tuple[str | None, int]) -> tuple[int, str]:
    return -item[1], item[0] or ""


class _Chunk:
    """One chunk of turns, batched from storage or re-encoded (once) as each engine needs."""

    def __init__(self, turns: Any, feats: dict[str, TurnFeatures], monitored: Monitored):
        self.turns, self.feats, self.monitored = turns, feats, monitored
        self._stored: TurnBatch | None = None
        self._encoded: TurnBatch | None = None

    def score(self, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and fired flags of the engine's one detector, for the turns in order."""
        stored = [self.feats.get(t.id) for t in self.turns]
        if not engine.needs_residuals and all(s is not None for s in stored):
            if self._stored is None:
                rows = [s for s in stored if s is not None]
                self._stored = stored_batch(rows, self.monitored.pipeline.sae.d_sae)
            batch = self._stored
        else:
            if self._encoded is None:
                pipeline = self.monitored.pipeline
                encoded = pipeline.encode([[Message(**m) for m in t.messages] for t in self.turns])
                self._encoded = TurnBatch.from_encoded(encoded)
            batch = self._encoded
        scores, fired = next(iter(engine.score(batch).values()))
        return scores, fired

    @property
    def reencoded(self) -> bool:
        return self._encoded is not None


def stored_batch(rows: list[TurnFeatures], d_sae: int) -> TurnBatch:
    """A TurnBatch from stored per-token features (no token ids or residuals are stored)."""
    parts = []
    roles = []
    for row in rows:
        s = StoredFeatures.of(row)
        parts.append(
            SparseActivations(
                indptr=torch.from_numpy(s.indptr.astype("int64")),
                indices=torch.from_numpy(s.indices.astype("int64")),
                values=torch.from_numpy(s.values.copy()),
                d_sae=d_sae,
            )
        )
        roles.append(torch.from_numpy(s.roles.astype("int64")))
    lengths = torch.tensor([p.n_tokens for p in parts], dtype=torch.int64)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    all_roles = torch.cat(roles) if roles else torch.zeros(0, dtype=torch.int64)
    return TurnBatch(
        features=SparseActivations.concat(parts),
        roles=all_roles,
        token_ids=torch.full_like(all_roles, -1),
        offsets=offsets,
    )
