"""The engine: every detector of a catalog evaluated on a batch of turns at once.

The features a catalog names (a few dozen of the SAE's thousands) are gathered once per batch
into a small dense ``[tokens, features]`` matrix; each detector then reduces its columns over its
scope with segment operations. The cost is a few small tensor operations per detector per batch,
next to a forward pass through 15 transformer layers (``safety-monitor bench`` measures it).

Scores: a rule's score is its combined ratio to its cut-offs, so it fires at ``score >= 1``
(and with at least ``min_tokens`` tokens in scope); a probe's score is its probability and it
fires at its calibrated threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.batch import TurnBatch, gather_columns
from detectors.rules import ProbeSpec, RuleError, RuleSpec, Spec, Threshold, load_definitions
from monitor.sae.base import SparseAutoencoder

ATLAS_FILE = "atlas.npz"
EVIDENCE_TOKENS = 5
EVIDENCE_FEATURES = 5


@dataclass(frozen=True)
class FeatureEvidence:
    index: int
    label: str
    value: float  # aggregated value (activation, count or share) or probe input
    cutoff: float  # what ``value`` is compared with (rules) or the probe weight


@dataclass(frozen=True)
class TokenEvidence:
    position: int  # token index within the turn
    token_id: int
    feature: int
    activation: float


@dataclass(frozen=True)
class Verdict:
    detector: str
    kind: str
    score: float
    fired: bool
    severity: str
    features: list[FeatureEvidence] = field(default_factory=list)
    tokens: list[TokenEvidence] = field(default_factory=list)

    def evidence_json(self) -> dict[str, Any]:
        """What drove the verdict: ``{"features": [...], "tokens": [...]}``."""
        return {
            "features": [vars(f) for f in self.features],
            "tokens": [vars(t) for t in self.tokens],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "kind": self.kind,
            "score": round(self.score, 6),
            "fired": self.fired,
            "severity": self.severity,
            **self.evidence_json(),
        }


class Detector:
    """One bound definition: knows its SAE columns and how to score a batch.

    ``pool`` reduces the detector's columns to one row per turn (what it scores); scores, fired
    flags and evidence are all computed from that one pooling.
    """

    spec: Spec
    columns: Tensor  # SAE feature indices it reads (may be empty)

    @property
    def id(self) -> str:
        return self.spec.id

    def pool(self, dense: Tensor, batch: TurnBatch) -> Tensor:
        """[n_turns, ...] per-turn inputs; ``dense`` holds this detector's columns per token."""
        raise NotImplementedError

    def scores_from(self, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, dense: Tensor, batch: TurnBatch) -> Tensor:
        """[n_turns] scores."""
        return self.scores_from(self.pool(dense, batch))

    def threshold(self) -> float:
        raise NotImplementedError

    def fired(self, scores: Tensor, batch: TurnBatch) -> Tensor:
        """Score at the threshold, with at least ``min_tokens`` tokens in scope."""
        enough = batch.scoped_counts(self.spec.scope) >= self.spec.min_tokens
        return (scores >= self.threshold()) & enough

    def evidence(
        self, pooled: Tensor, dense: Tensor, batch: TurnBatch, turn: int
    ) -> tuple[list[FeatureEvidence], list[TokenEvidence]]:
        return [], []


class RuleDetector(Detector):
    def __init__(self, spec: RuleSpec, max_activation: np.ndarray | None, file: Path | str):
        self.spec: RuleSpec = spec
        self.columns = torch.tensor([f.index for f in spec.features], dtype=torch.int64)
        self.labels = [f.label for f in spec.features]
        self.weights = torch.tensor([f.weight for f in spec.features], dtype=torch.float32)
        taus = []
        for i, f in enumerate(spec.features):
            t = f.threshold or spec.threshold
            where = f"features.{i}.threshold" if f.threshold else "threshold"
            taus.append(_resolve(t, f.index, max_activation, file, spec.id, where))
        self.tau = torch.tensor(taus, dtype=torch.float32)  # per-token activation cut-off
        agg = spec.aggregation
        self.cutoff = (
            torch.full_like(self.tau, float(agg.at_least))
            if agg.at_least is not None
            else self.tau.clone()
        )

    def pool(self, dense: Tensor, batch: TurnBatch) -> Tensor:
        """[n_turns, n_features] aggregated values (activation, count or share)."""
        scope, method = self.spec.scope, self.spec.aggregation.method
        if method == "max":
            return batch.pool_max(dense, scope)
        if method == "mean":
            return batch.pool_mean(dense, scope)
        above = (dense >= self.tau).float()
        if method == "count_above":
            return batch.pool_sum(above, scope)
        return batch.pool_mean(above, scope)

    def scores_from(self, pooled: Tensor) -> Tensor:
        ratio = pooled / self.cutoff
        method = self.spec.combine.method
        if method == "any":
            return ratio.max(dim=1).values
        if method == "all":
            return ratio.min(dim=1).values
        assert self.spec.combine.at_least is not None
        return (ratio * self.weights).sum(dim=1) / self.spec.combine.at_least

    def threshold(self) -> float:
        return 1.0

    def evidence(
        self, pooled: Tensor, dense: Tensor, batch: TurnBatch, turn: int
    ) -> tuple[list[FeatureEvidence], list[TokenEvidence]]:
        values = pooled[turn]
        # what each feature adds to the score; a feature with a negative weight (it counts
        # against firing) is never named as what drove a verdict
        contribution = values / self.cutoff * self.weights
        order = torch.argsort(contribution, descending=True)[:EVIDENCE_FEATURES]
        feats = [
            FeatureEvidence(
                int(self.columns[i]), self.labels[i], float(values[i]), float(self.cutoff[i])
            )
            for i in order.tolist()
            if contribution[i] > 0
        ]
        strength = dense / self.tau * self.weights.clamp(min=0)
        return feats, _top_tokens(strength, dense, self.columns, batch, turn, self.spec.scope)


class SAEProbeDetector(Detector):
    """Logistic regression on max-pooled SAE features (scaled by their atlas maxima)."""

    def __init__(self, spec: ProbeSpec, weights: dict[str, np.ndarray]):
        self.spec: ProbeSpec = spec
        self.columns = torch.from_numpy(weights["indices"].astype(np.int64))
        self.scale = torch.from_numpy(weights["scale"].astype(np.float32))
        self.coef = torch.from_numpy(weights["coef"].astype(np.float32))
        self.intercept = float(weights["intercept"])
        labels = weights.get("labels")
        self.labels = (
            [str(x) for x in labels]
            if labels is not None
            else [f"feature {int(i)}" for i in self.columns]
        )

    def pool(self, dense: Tensor, batch: TurnBatch) -> Tensor:
        return batch.pool_max(dense, self.spec.scope) / self.scale

    def scores_from(self, pooled: Tensor) -> Tensor:
        return torch.sigmoid(pooled @ self.coef + self.intercept)

    def threshold(self) -> float:
        return self.spec.probe.threshold

    def evidence(
        self, pooled: Tensor, dense: Tensor, batch: TurnBatch, turn: int
    ) -> tuple[list[FeatureEvidence], list[TokenEvidence]]:
        x = pooled[turn]
        contribution = x * self.coef
        order = torch.argsort(contribution, descending=True)[:EVIDENCE_FEATURES]
        feats = [
            FeatureEvidence(int(self.columns[i]), self.labels[i], float(x[i]), float(self.coef[i]))
            for i in order.tolist()
            if contribution[i] > 0
        ]
        weighted = dense * self.coef.clamp(min=0) / self.scale
        return feats, _top_tokens(weighted, dense, self.columns, batch, turn, self.spec.scope)


class ResidualProbeDetector(Detector):
    """Logistic regression on the standardised mean layer-L residual: the dense baseline."""

    def __init__(self, spec: ProbeSpec, weights: dict[str, np.ndarray]):
        self.spec: ProbeSpec = spec
        self.columns = torch.zeros(0, dtype=torch.int64)
        self.mean = torch.from_numpy(weights["mean"].astype(np.float32))
        self.std = torch.from_numpy(weights["std"].astype(np.float32))
        self.coef = torch.from_numpy(weights["coef"].astype(np.float32))
        self.intercept = float(weights["intercept"])

    def pool(self, dense: Tensor, batch: TurnBatch) -> Tensor:
        return (batch.residual_mean(self.spec.scope) - self.mean) / self.std

    def scores_from(self, pooled: Tensor) -> Tensor:
        return torch.sigmoid(pooled @ self.coef + self.intercept)

    def threshold(self) -> float:
        return self.spec.probe.threshold


def _top_tokens(
    strength: Tensor, dense: Tensor, columns: Tensor, batch: TurnBatch, turn: int, scope: str
) -> list[TokenEvidence]:
    """The turn's scoped tokens where ``strength`` peaks, with the feature that peaks there."""
    lo, hi = int(batch.offsets[turn]), int(batch.offsets[turn + 1])
    if hi == lo or columns.numel() == 0:
        return []
    s = strength[lo:hi] * batch.scope_mask(scope)[lo:hi, None]
    best, which = s.max(dim=1)
    out = []
    for pos in torch.argsort(best, descending=True)[:EVIDENCE_TOKENS].tolist():
        if best[pos] <= 0:
            break
        col = int(which[pos])
        out.append(
            TokenEvidence(
                pos, int(batch.token_ids[lo + pos]), int(columns[col]), float(dense[lo + pos, col])
            )
        )
    return out


def _resolve(
    t: Threshold,
    index: int,
    max_activation: np.ndarray | None,
    file: Path | str,
    rule: str,
    where: str,
) -> float:
    if t.absolute is not None:
        return float(t.absolute)
    if max_activation is None:
        raise RuleError(file, rule, where, "a relative threshold needs the SAE's feature atlas")
    if index >= len(max_activation):
        raise RuleError(file, rule, where, f"feature {index} is outside the SAE")
    peak = float(max_activation[index])
    if peak <= 0:
        raise RuleError(
            file, rule, where, f"feature {index} never fired in the atlas: use 'absolute'"
        )
    assert t.relative is not None
    return float(t.relative) * peak


class Engine:
    """A set of bound detectors and the union of the SAE features they read."""

    def __init__(self, detectors: Sequence[Detector], d_sae: int):
        ids = [d.id for d in detectors]
        if len(set(ids)) != len(ids):
            raise ValueError("detector ids must be unique")
        self.detectors = list(detectors)
        self.d_sae = d_sae
        cols = [d.columns for d in detectors if d.columns.numel()]
        self.columns = torch.unique(torch.cat(cols)) if cols else torch.zeros(0, dtype=torch.int64)
        self._where = [torch.searchsorted(self.columns, d.columns) for d in detectors]

    @property
    def needs_residuals(self) -> bool:
        return any(isinstance(d, ResidualProbeDetector) for d in self.detectors)

    def detector(self, detector_id: str) -> Detector:
        for d in self.detectors:
            if d.id == detector_id:
                return d
        raise KeyError(detector_id)

    def score(self, batch: TurnBatch) -> dict[str, tuple[Tensor, Tensor]]:
        """Per detector: [n_turns] scores and [n_turns] fired flags (no evidence)."""
        dense = gather_columns(batch.features, self.columns)
        out = {}
        for d, where in zip(self.detectors, self._where, strict=True):
            s = d.scores(dense[:, where], batch)
            out[d.id] = (s, d.fired(s, batch))
        return out

    def evaluate(self, batch: TurnBatch, explain: bool = True) -> list[list[Verdict]]:
        """Verdicts per turn, in catalog order; fired verdicts carry their evidence."""
        dense = gather_columns(batch.features, self.columns)
        per_turn: list[list[Verdict]] = [[] for _ in range(batch.n_turns)]
        for d, where in zip(self.detectors, self._where, strict=True):
            cols = dense[:, where]
            pooled = d.pool(cols, batch)
            scores = d.scores_from(pooled)
            fired = d.fired(scores, batch)
            for t in range(batch.n_turns):
                feats: list[FeatureEvidence] = []
                toks: list[TokenEvidence] = []
                if explain and bool(fired[t]):
                    feats, toks = d.evidence(pooled, cols, batch, t)
                per_turn[t].append(
                    Verdict(
                        d.id,
                        d.spec.kind,
                        float(scores[t]),
                        bool(fired[t]),
                        d.spec.severity,
                        feats,
                        toks,
                    )
                )
        return per_turn


def load_atlas_max(sae: SparseAutoencoder) -> np.ndarray | None:
    if sae.directory is None or not (sae.directory / ATLAS_FILE).is_file():
        return None
    with np.load(sae.directory / ATLAS_FILE) as atlas:
        return np.asarray(atlas["max_activation"], dtype=np.float32)


def bind(
    file: Path | str, spec: Spec, sae: SparseAutoencoder, atlas_max: np.ndarray | None
) -> Detector:
    """Check a definition against the SAE in use and build its detector."""
    if spec.sae.fingerprint != sae.fingerprint:
        raise RuleError(
            file,
            spec.id,
            "sae.fingerprint",
            f"written for SAE {spec.sae.fingerprint}, but the SAE in use is {sae.fingerprint}; "
            "rediscover its features for this SAE (see docs/detectors.md)",
        )
    if isinstance(spec, RuleSpec):
        for i, f in enumerate(spec.features):
            if f.index >= sae.d_sae:
                raise RuleError(
                    file,
                    spec.id,
                    f"features.{i}.index",
                    f"feature {f.index} is outside the SAE's {sae.d_sae} features",
                )
        return RuleDetector(spec, atlas_max, file)
    weights_path = Path(file).parent / spec.probe.weights
    try:
        with np.load(weights_path) as z:
            weights = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise RuleError(
            file, spec.id, "probe.weights", f"cannot read {weights_path}: {exc}"
        ) from exc
    need = (
        ("indices", "scale", "coef", "intercept")
        if spec.probe.input == "sae"
        else ("mean", "std", "coef", "intercept")
    )
    missing = [k for k in need if k not in weights]
    if missing:
        raise RuleError(
            file, spec.id, "probe.weights", f"{weights_path} lacks {', '.join(missing)}"
        )
    if spec.probe.input == "sae":
        return SAEProbeDetector(spec, weights)
    if weights["coef"].shape != (sae.d_in,):
        raise RuleError(file, spec.id, "probe.weights", f"{weights_path} is not {sae.d_in} wide")
    return ResidualProbeDetector(spec, weights)


def load_engine(
    paths: Iterable[Path], sae: SparseAutoencoder, atlas_max: np.ndarray | None = None
) -> Engine:
    """Load definitions from files/directories and bind them all to ``sae`` (its atlas maxima
    are read from the SAE's directory unless given)."""
    atlas_max = atlas_max if atlas_max is not None else load_atlas_max(sae)
    detectors = [bind(f, s, sae, atlas_max) for f, s in load_definitions(paths)]
    return Engine(detectors, sae.d_sae)


def catalog_dir() -> Path:
    """The curated catalog shipped with the project."""
    return Path(__file__).resolve().parent / "catalog"
