"""What the audit pages and the audit API show: a conversation with per-token shading, a
feature's card. Both the JSON API and the server-rendered UI read these, so they agree.

Shading follows the published feature visualisations: a token is white where the chosen
signal is inactive and deepens in colour with activation. The signal is one feature (its
activation over the atlas maximum) or a detector (for a rule, each token's strongest feature
over that feature's per-token cut-off, so a saturated token is at or over the cut-off; for an
SAE probe, its positively weighted features over their atlas maxima). Dense probes read the
residual stream, not features, so they shade nothing; the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from detectors.engine import RuleDetector, SAEProbeDetector
from detectors.rules import SEVERITY_RANK
from monitor.messages import Role
from monitor.service.db import Alert, Turn, TurnFeatures, VerdictRow
from monitor.service.features import StoredFeatures
from monitor.service.rows import alert_json, utc_iso

if TYPE_CHECKING:
    from monitor.service.monitored import Monitored

RECENT_SCAN = 500  # stored turns a feature page looks through for live examples


@dataclass(frozen=True)
class Shade:
    """A shading signal: feature -> normaliser (activation / normaliser = intensity)."""

    name: str  # "feature:123" or "detector:scam_email"
    title: str
    norms: dict[int, float]
    note: str = ""


def shade_for(monitored: Monitored | None, name: str | None) -> Shade | None:
    """Parse ``feature:N`` or ``detector:ID`` into a shading signal (ValueError when unknown)."""
    if not name or monitored is None:
        return None
    kind, _, value = name.partition(":")
    if kind == "feature":
        try:
            index = int(value)
        except ValueError:
            raise ValueError(f"shade={name!r}: feature needs a number") from None
        sae = monitored.pipeline.sae
        if not 0 <= index < sae.d_sae:
            raise ValueError(f"shade={name!r}: the SAE has features 0..{sae.d_sae - 1}")
        top = monitored.atlas_max
        norm = float(top[index]) if top is not None and top[index] > 0 else 1.0
        return Shade(name, f"feature {index}", {index: norm})
    if kind == "detector":
        try:
            d = monitored.engine.detector(value)
        except KeyError:
            raise ValueError(f"shade={name!r}: no detector {value!r}") from None
        if isinstance(d, RuleDetector):
            # What each token adds to the rule, as the evidence ranks it: activation over the
            # per-token cut-off times the weight, relative to the heaviest weight (features with
            # a negative weight mark ordinary traffic and shade nothing).
            top_w = max(float(d.weights.max()), 1e-6)
            norms = {
                int(c): max(float(t) * top_w / float(w), 1e-6)
                for c, t, w in zip(d.columns, d.tau, d.weights, strict=True)
                if w > 0
            }
            return Shade(name, f"rule {value}", norms)
        if isinstance(d, SAEProbeDetector):
            norms = {
                int(c): max(float(s), 1e-6)
                for c, s, w in zip(d.columns, d.scale, d.coef, strict=True)
                if w > 0
            }
            return Shade(name, f"probe {value}", norms)
        note = f"{value} is a dense probe (residual stream): it has no per-token features"
        return Shade(name, f"probe {value}", {}, note)
    raise ValueError(f"shade={name!r}: use feature:N or detector:ID")


def intensities(stored: StoredFeatures, shade: Shade | None) -> np.ndarray:
    """Per token in [0, 1]: the strongest shaded feature's activation over its normaliser."""
    out = np.zeros(len(stored.tokens), dtype=np.float32)
    if shade is None or not shade.norms:
        return out
    rows = np.repeat(np.arange(len(stored.tokens)), np.diff(stored.indptr))
    for feature, norm in shade.norms.items():
        hit = stored.indices == feature
        if hit.any():
            np.maximum.at(out, rows[hit], stored.values[hit] / norm)
    return np.clip(out, 0.0, 1.0)


def conversation_view(
    session: Session,
    tenant: str,
    conversation_id: str,
    monitored: dict[str, Monitored],
    shade_name: str | None,
    top: int = 3,
) -> dict[str, Any] | None:
    """A conversation's turns: messages, verdicts, alerts, and per-token shading and features."""
    turns = session.scalars(
        select(Turn)
        .where(Turn.tenant == tenant, Turn.conversation_id == conversation_id)
        .order_by(Turn.created_at, Turn.id)
    ).all()
    if not turns:
        return None
    out = []
    for t in turns:
        m = monitored.get(t.pipeline)
        verdicts = session.scalars(
            select(VerdictRow).where(VerdictRow.turn_id == t.id).order_by(VerdictRow.id)
        ).all()
        alerts = session.scalars(
            select(Alert).where(Alert.turn_id == t.id).order_by(Alert.created_at, Alert.id)
        ).all()
        ranked = sorted(
            (a for a in alerts if a.kind != "escalation"),
            key=lambda a: (-SEVERITY_RANK.get(a.severity, 0), -a.score, a.detector),
        )
        name = shade_name or next((f"detector:{a.detector}" for a in ranked), None)
        shade = shade_for(m, name)
        row = session.get(TurnFeatures, t.id)
        tokens: list[dict[str, Any]] = []
        if row is not None:
            stored = StoredFeatures.of(row)
            strength = intensities(stored, shade)
            tokens = [
                {
                    "token": token,
                    "role": Role(int(stored.roles[i])).label,
                    "shade": round(float(strength[i]), 3),
                    "features": stored.top(i, top),
                }
                for i, token in enumerate(stored.tokens)
            ]
        out.append(
            {
                "turn_id": t.id,
                "created_at": utc_iso(t.created_at),
                "pipeline": t.pipeline,
                "messages": t.messages,
                "metadata": t.meta,
                "dropped_tokens": t.dropped,
                "sae_fingerprint": t.sae_fingerprint,
                "sae_loaded": None if m is None else m.pipeline.sae.identity,
                "alert_ids": [a.id for a in alerts],
                "alerts": [_explained(alert_json(a), tokens) for a in alerts],
                "verdicts": [
                    {
                        "detector": v.detector,
                        "kind": v.kind,
                        "score": v.score,
                        "fired": v.fired,
                        "severity": v.severity,
                        "evidence": v.evidence,
                    }
                    for v in verdicts
                ],
                "shade": None
                if shade is None
                else {"name": shade.name, "title": shade.title, "note": shade.note},
                "tokens": tokens,
            }
        )
    return {"conversation_id": conversation_id, "turns": out}


def _explained(alert: dict[str, Any], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """The alert with the text of its evidence tokens (where the turn's tokens are stored)."""
    evidence = dict(alert.get("evidence") or {})
    ev_tokens = []
    for t in evidence.get("tokens", []):
        pos = t.get("position")
        text = tokens[pos]["token"] if isinstance(pos, int) and 0 <= pos < len(tokens) else None
        ev_tokens.append({**t, "text": text})
    evidence["tokens"] = ev_tokens
    return {**alert, "evidence": evidence}


def feature_view(
    session: Session, tenant: str, monitored: Monitored, index: int, recent: int = 10
) -> dict[str, Any]:
    """A feature's card: label, density, maximum, atlas contexts, detectors, live turns."""
    from monitor.training.atlas import ATLAS_FILE, load_card

    sae = monitored.pipeline.sae
    if not 0 <= index < sae.d_sae:
        raise ValueError(f"feature {index} is outside 0..{sae.d_sae - 1}")
    labels = []
    used_by = []
    for d in monitored.engine.detectors:
        cols = [int(c) for c in d.columns]
        if index in cols:
            used_by.append({"detector": d.id, "kind": d.spec.kind, "severity": d.spec.severity})
            names = getattr(d, "labels", None)
            if names:
                labels.append(names[cols.index(index)])
    card: dict[str, Any] = {"density": None, "max_activation": None, "contexts": []}
    atlas = sae.directory / ATLAS_FILE if sae.directory is not None else None
    if atlas is not None and atlas.is_file():
        c = load_card(atlas, index)
        tok = monitored.pipeline.model.tokenizer
        card = {
            "density": c.density,
            "max_activation": c.max_activation,
            "contexts": [
                {
                    "before": tok.decode(ids[:peak]),
                    "token": tok.decode(ids[peak : peak + 1]),
                    "after": tok.decode(ids[peak + 1 :]),
                    "activation": round(value, 4),
                }
                for ids, peak, value in c.contexts
            ],
        }
    return {
        "feature": index,
        "pipeline": monitored.config.name,
        "label": next((x for x in labels if not x.startswith("feature ")), None),
        **card,
        "detectors": used_by,
        "recent": _recent_fires(session, tenant, monitored.config.name, index, recent),
    }


def _recent_fires(
    session: Session, tenant: str, pipeline: str, index: int, n: int
) -> list[dict[str, Any]]:
    """The tenant's latest stored turns where the feature fired, with its peak token."""
    rows = session.execute(
        select(Turn.id, Turn.conversation_id, Turn.created_at, TurnFeatures)
        .join(TurnFeatures, TurnFeatures.turn_id == Turn.id)
        .where(Turn.tenant == tenant, Turn.pipeline == pipeline)
        .order_by(Turn.created_at.desc())
        .limit(RECENT_SCAN)
    ).all()
    out = []
    for turn_id, conversation_id, created_at, feats in rows:
        s = StoredFeatures.of(feats)
        hit = np.flatnonzero(s.indices == index)
        if hit.size == 0:
            continue
        best = hit[np.argmax(s.values[hit])]
        pos = int(np.searchsorted(s.indptr, best, side="right") - 1)
        lo, hi = max(0, pos - 6), min(len(s.tokens), pos + 7)
        out.append(
            {
                "turn_id": turn_id,
                "conversation_id": conversation_id,
                "created_at": utc_iso(created_at),
                "activation": round(float(s.values[best]), 4),
                "before": "".join(s.tokens[lo:pos]),
                "token": s.tokens[pos],
                "after": "".join(s.tokens[pos + 1 : hi]),
            }
        )
        if len(out) >= n:
            break
    return out
