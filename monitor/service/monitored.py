"""A configured pipeline as the service runs it (model, SAE, catalog), and how a
batch of turns is evaluated by it: one forward pass, one engine pass."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from detectors.batch import TurnBatch
from detectors.engine import Engine, Verdict, catalog_dir, load_atlas_max, load_engine
from detectors.rules import Alerting
from monitor.pipeline import EncodedInput, Pipeline
from monitor.service.metrics import Metrics
from monitor.service.settings import PipelineConfig, ServiceSettings
from monitor.tokenization import TokenizedInput

log = logging.getLogger(__name__)


@dataclass
class Monitored:
    """One configured pipeline: model + SAE + catalog (its micro-batcher is the runtime's)."""

    config: PipelineConfig
    pipeline: Pipeline
    engine: Engine
    summaries: dict[str, str]
    alerting: dict[str, Alerting] = field(default_factory=dict)
    atlas_max: np.ndarray | None = None  # the SAE's per-feature maxima (shading, backtests)


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
