"""The ``safety-monitor`` command line."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from monitor.cli.alerts import deliveries_app, webhooks_app
from monitor.cli.common import (
    DeviceOpt,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    SaeOpt,
    err,
    fail,
    measure_table,
    out,
    pipeline_from,
    settings_from,
)
from monitor.cli.dashboards import dashboards_app
from monitor.cli.detectors import detectors_app
from monitor.cli.labels import labels_app
from monitor.cli.service import db_app, keys_app, replay, serve, worker
from monitor.cli.silences import silences_app
from monitor.cli.steering import generate, serve_model
from monitor.cli.training import corpus_app, features_app, sae_app
from monitor.logs import configure_logging
from monitor.models.builtin import BUILTIN_MODELS
from monitor.models.loading import ModelLoadError
from monitor.tokenization import InputError, PipelineInput

if TYPE_CHECKING:
    from monitor.pipeline import EncodedInput, Pipeline

app = typer.Typer(
    help="Safety monitor for deployed LLMs: SAE features of the residual stream, per token.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Built-in models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(corpus_app, name="corpus")
app.add_typer(sae_app, name="sae")
app.add_typer(features_app, name="features")
app.add_typer(detectors_app, name="detectors")
detectors_app.add_typer(labels_app, name="labels")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(silences_app, name="silences")
app.command()(serve)
app.command()(worker)
app.command()(replay)
app.command()(generate)
app.command("serve-model")(serve_model)

# Registers `detectors backtest`, `db prune` and `db export` on the sub-apps above.
import monitor.cli.audit  # noqa: E402
import monitor.cli.reencode  # noqa: E402, F401


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    # JSON lines when stderr is no terminal, rich text on one (SAFETY_MONITOR_LOG_FORMAT).
    try:
        fmt = configure_logging(verbose=verbose, console=err)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per connection
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own log lines say what loading is doing
    if fmt == "json":  # transformers' own handler writes plain lines: through ours instead
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()


@app.command()
def encode(
    text: Annotated[str | None, typer.Argument(help="Text to encode.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Encode this UTF-8 text file.")
    ] = None,
    messages: Annotated[
        Path | None,
        typer.Option("--messages", help='JSON file: [{"role": "user", "content": "..."}, ...].'),
    ] = None,
    model: ModelOpt = None,
    layer: LayerOpt = None,
    sae: SaeOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Features shown per token.")] = 5,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Tokens per forward pass (window).")
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print each token of TEXT (or --file, or --messages) with its strongest SAE features."""
    given = [x for x in (text, file, messages) if x is not None]
    if len(given) != 1:
        raise fail("give exactly one of TEXT, --file or --messages")
    item: PipelineInput
    if file is not None:
        item = _read_text(file)
    elif messages is not None:
        item = _read_messages(messages)
    else:
        assert text is not None
        item = text
    settings = settings_from(
        model=model, layer=layer, sae=sae, max_tokens=max_tokens, device=device
    )
    pipeline = pipeline_from(settings)
    try:
        (encoded,) = pipeline.encode([item])
    except InputError as exc:
        raise fail(str(exc)) from exc
    _report(pipeline, [("input", encoded)], top, as_json)


@app.command()
def demo(
    model: ModelOpt = None,
    layer: LayerOpt = None,
    sae: SaeOpt = None,
    top: Annotated[int, typer.Option("--top", min=1)] = 3,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Encode the bundled samples, print their strongest features and the detectors' verdicts."""
    data = json.loads((resources.files("monitor") / "data" / "samples.json").read_text())
    samples = data["samples"]
    pipeline = pipeline_from(settings_from(model=model, layer=layer, sae=sae, device=device))
    encoded = pipeline.encode([s["input"] for s in samples])
    names = [s["name"] for s in samples]
    verdicts = _verdicts(pipeline, encoded)
    if as_json:
        _report(pipeline, list(zip(names, encoded, strict=True)), top, as_json, verdicts)
        return
    _report(pipeline, list(zip(names, encoded, strict=True)), top, as_json)
    if verdicts is not None:
        table = Table(title="detectors (curated catalog): score, fired", title_justify="left")
        table.add_column("input")
        table.add_column("fired")
        table.add_column("rule scores (fire at 1.0)")
        for name, turn in zip(names, verdicts, strict=True):
            fired = ", ".join(f"{v.detector} ({v.severity})" for v in turn if v.fired) or "—"
            scores = "  ".join(f"{v.detector} {v.score:.2f}" for v in turn if v.kind == "rule")
            table.add_row(name, fired, scores)
        out.print(table)


def _verdicts(pipeline: Pipeline, encoded: list[EncodedInput]) -> list[list[Any]] | None:
    """The curated catalog's verdicts per input; None (with a warning) for another SAE."""
    from detectors.batch import TurnBatch
    from detectors.engine import catalog_dir, load_engine
    from detectors.rules import RuleError

    try:
        engine = load_engine([catalog_dir()], pipeline.sae)
    except RuleError as exc:
        err.print(f"[yellow]detectors skipped:[/] {exc}", highlight=False)
        return None
    return engine.evaluate(TurnBatch.from_encoded(encoded))


@app.command()
def bench(
    model: ModelOpt = None,
    layer: LayerOpt = None,
    sae: SaeOpt = None,
    batches: Annotated[int, typer.Option(min=1, help="Batches per timed pass.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=8, help="Tokens per sequence.")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="Timed passes; rates are medians.")] = 5,
    device: DeviceOpt = None,
    service: Annotated[
        bool, typer.Option("--service", help="Bench the whole service (PostgreSQL + broker).")
    ] = False,
    faults: Annotated[
        bool,
        typer.Option(
            "--faults",
            help="Fault scenarios on the real stack (--turns per scenario; default 24).",
        ),
    ] = False,
    turns: Annotated[
        int | None,
        typer.Option(
            min=8,
            help="Turns per timed pass (--service: 96), scenario (--faults: 24) or path "
            "(--guard: 12)",
        ),
    ] = None,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients (--service).")] = 16,
    guard: Annotated[
        bool, typer.Option("--guard", help="Chat requests direct vs. through guard mode.")
    ] = False,
    upstream: Annotated[
        str | None,
        typer.Option(help="--guard: an OpenAI-compatible base URL (default: llama.cpp here)."),
    ] = None,
    steering: Annotated[
        bool, typer.Option("--steering", help="The steering experiments (--turns prompts each).")
    ] = False,
    use_ray: Annotated[
        bool, typer.Option("--ray", help="Capture on a local Ray cluster vs. in this process.")
    ] = False,
    tokens: Annotated[int, typer.Option(min=1000, help="Tokens per capture pass (--ray).")] = 40000,
    as_json: JsonOpt = False,
) -> None:
    """Pipeline vs. the full-forward baseline: speed, roofline fraction, agreement, memory.

    With --service: the service end to end (request in → stored and published) against the raw
    pipeline on the same turns, and latency at saturation and at half load."""
    if service + faults + guard + steering + use_ray > 1:
        raise fail("give one of --service, --faults, --guard, --steering and --ray")
    if use_ray:
        _bench_ray(model, tokens, min(repeats, 3), as_json)
        return
    if steering:
        _bench_steering(turns or 20, as_json)
        return
    if upstream is not None and not guard:
        raise fail("--upstream goes with --guard")
    if guard:
        _bench_guard(upstream, turns or 12, as_json)
        return
    if faults:
        _bench_faults(turns, as_json)
        return
    if service:
        _bench_service(turns or 96, clients, repeats, as_json)
        return
    from monitor.bench import BenchOptions, run_bench

    settings = settings_from(
        model=model, layer=layer, sae=sae, device=device, batch_size=batch_size
    )
    pipeline = pipeline_from(settings)
    opts = BenchOptions(batches=batches, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
    report = run_bench(pipeline, opts)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        ("pipeline tokens/s", f"{report['pipeline_tokens_per_s']:.0f}"),
        ("baseline tokens/s", f"{report['baseline_tokens_per_s']:.0f}"),
        ("speed-up", f"{report['speedup']:.2f}x"),
        ("matmul rate (fp32)", f"{report['matmul_gflops']:.0f} GFLOP/s"),
        ("FLOPs per token", f"{report['flops_per_token'] / 1e6:.1f} M"),
        ("roofline fraction", f"{report['roofline_fraction']:.2f}"),
        ("top-k agreement", f"{report['topk_agreement']:.4f}"),
        ("max abs difference", f"{report['max_abs_diff']:.2e}"),
        ("peak RSS (pipeline)", f"{report['peak_rss_mb']:.0f} MB"),
    ]
    if report["detector_share"] is not None:
        share = f"{report['detector_share'] * 100:.2f}% ({report['detectors']} detectors)"
        rows.append(("detector time / pipeline time", share))
    title = f"bench: {report['model']}, layer {report['layer']}, {report['device']}"
    out.print(measure_table(title, rows))


def _bench_ray(model: str | None, tokens: int, repeats: int, as_json: bool) -> None:
    from monitor.bench_ray import run_ray_bench
    from monitor.training.ray_cluster import RayClusterError

    try:
        report = run_ray_bench(settings_from(model=model), tokens, repeats)
    except (RayClusterError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        ("local capture tokens/s", f"{report['local_tokens_per_s']:.0f}"),
        ("Ray capture tokens/s", f"{report['ray_tokens_per_s']:.0f}"),
        ("ratio (target >= 0.85)", f"{report['ratio']:.3f}"),
        ("local cluster start", f"{report['cluster_start_s']:.1f} s"),
    ]
    title = f"bench --ray: {report['model']}, layer {report['layer']}, {report['tokens']:,} tokens"
    out.print(measure_table(title, rows))


def _bench_steering(prompts: int, as_json: bool) -> None:
    from monitor.bench_steering import run_steering_bench

    report = run_steering_bench(n=prompts)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"bench --steering: {report['model']}, layer {report['layer']}")
    for col in ("detector", "clamp", "prompts", "fire rate", "score", "text score", "loss +"):
        table.add_column(col)
    for e in report["experiments"]:
        table.add_row(
            e["detector"],
            e["clamp"],
            f"{e['n']} {e['prompts']}",
            f"{e['fire_rate_unsteered']:.2f} → {e['fire_rate_steered']:.2f}",
            f"{e['score_unsteered']:.2f} → {e['score_steered']:.2f}",
            f"{e['text_score_unsteered']:.1f} → {e['text_score_steered']:.1f}",
            f"{e['loss_increase']:+.3f}",
        )
    out.print(table)
    out.print(
        f"generation time per token, steered / unsteered: {report['time_per_token_ratio']:.3f}"
    )


def _bench_guard(upstream: str | None, requests: int, as_json: bool) -> None:
    from monitor.bench_guard import GuardBenchOptions, run_guard_bench

    if upstream is not None and not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream {upstream!r}: expected an http(s):// base URL ending in /v1")
    report = run_guard_bench(GuardBenchOptions(upstream, requests))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    ms = "{:.0f} ms".format
    rows = [
        ("time to first token, direct / guard", f"{ms(report['ttft_direct_ms'])} / "
         f"{ms(report['ttft_guard_ms'])} (+{ms(report['ttft_added_ms'])})"),
        ("tokens/s, direct / guard", f"{report['tps_direct']:.1f} / {report['tps_guard']:.1f}"),
        ("overhead_ratio (guard / direct tokens/s)", f"{report['overhead_ratio']:.3f}"),
        ("with block + abort: first token, tokens/s", f"{ms(report['ttft_enforcing_ms'])}, "
         f"{report['tps_enforcing']:.1f}"),
        ("non-streamed added latency p50 / p99", f"{ms(report['added_latency_p50_ms'])} / "
         f"{ms(report['added_latency_p99_ms'])}"),
    ]  # fmt: skip
    out.print(measure_table(f"bench --guard: {report['upstream']}", rows))


def _bench_service(turns: int, clients: int, repeats: int, as_json: bool) -> None:
    from monitor.bench_service import ServiceBenchOptions, run_service_bench
    from monitor.service.monitored import load_monitored
    from monitor.service.settings import ServiceSettings

    settings = ServiceSettings()
    monitored = load_monitored(settings.resolved_pipelines()[0], settings)
    report = run_service_bench(monitored, ServiceBenchOptions(turns, clients, repeats))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        ("service tokens/s (stored + published)", f"{report['service_tokens_per_s']:.0f}"),
        ("raw pipeline tokens/s", f"{report['pipeline_tokens_per_s']:.0f}"),
        ("service_ratio", f"{report['service_ratio']:.3f}"),
        (
            "p50 / p99 latency, saturated",
            f"{report['latency_p50_s_saturated'] * 1000:.0f} / "
            f"{report['latency_p99_s_saturated'] * 1000:.0f} ms",
        ),
        (
            "p50 / p99 latency, half load",
            f"{report['latency_p50_s_half_load'] * 1000:.0f} / "
            f"{report['latency_p99_s_half_load'] * 1000:.0f} ms",
        ),
    ]
    out.print(
        measure_table(
            f"bench --service: {report['turns']} turns, {report['tokens']} tokens, "
            f"{report['clients']} clients",
            rows,
        )
    )


def _bench_faults(turns: int | None, as_json: bool) -> None:
    from monitor.bench_faults import FaultBenchOptions, run_fault_bench
    from monitor.service.monitored import load_monitored
    from monitor.service.settings import ServiceSettings

    turns = turns or FaultBenchOptions().turns
    settings = ServiceSettings()
    monitored = load_monitored(settings.resolved_pipelines()[0], settings)
    report = run_fault_bench(monitored, FaultBenchOptions(turns=turns))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = ["acknowledged", "stored", "lost", "duplicate_rows", "alerts", "alerts_published"]
    rows += ["kafka_duplicates", "dead_lettered", "outage_s", "recovery_s", "timed_out"]
    table = Table(title=f"bench --faults: {turns} turns per scenario")
    table.add_column("measure")
    for s in report["scenarios"]:
        table.add_column(s["name"], justify="right")
    for r in rows:
        table.add_row(r, *("—" if s.get(r) is None else str(s[r]) for s in report["scenarios"]))
    out.print(table)


@models_app.command("list")
def models_list() -> None:
    """List the built-in models, their sources and licences."""
    for spec in BUILTIN_MODELS.values():
        out.print(f"[bold]{spec.name}[/]  default layer {spec.default_layer}  {spec.licence}")
        out.print(f"    {spec.source}", highlight=False)


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Built-in model name.")],
) -> None:
    """Fetch and convert a built-in model now (for images built ahead of traffic)."""
    from monitor.models.loading import ensure_converted

    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise fail(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    try:
        path = ensure_converted(spec, settings_from().cache_dir)
    except ModelLoadError as exc:
        raise fail(str(exc)) from exc
    out.print(str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise fail(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise fail(f"{path}: not UTF-8 text (byte {exc.start} is invalid)") from exc


def _read_messages(path: Path) -> list[Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise fail(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise fail(f"{path}: expected a JSON list of messages")
    return data


def _report(
    pipeline: Pipeline,
    encoded: list[tuple[str, EncodedInput]],
    top: int,
    as_json: bool,
    verdicts: list[list[Any]] | None = None,
) -> None:
    if as_json:
        doc: dict[str, Any] = {
            "model": pipeline.model.name,
            "layer": pipeline.layer,
            "sae": {"architecture": pipeline.sae.architecture, "d_sae": pipeline.sae.d_sae},
            "inputs": [_encoded_json(name, e, top) for name, e in encoded],
        }
        if verdicts is not None:
            for item, turn in zip(doc["inputs"], verdicts, strict=True):
                item["verdicts"] = [v.to_json() for v in turn]
        print(json.dumps(doc, ensure_ascii=False))
        return
    for name, e in encoded:
        cut = f", {e.dropped} cut from the front by the context limit" if e.dropped else ""
        read = f" in {e.windows} windows" if e.windows > 1 else ""
        table = Table(title=f"{name}: {len(e.ids)} tokens{read}{cut}", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("role")
        table.add_column("token")
        table.add_column(f"top {top} features (index:activation)")
        for t, (tok, role) in enumerate(zip(e.tokens, e.roles, strict=True)):
            feats = "  ".join(f"{i}:{v:.2f}" for i, v in e.features.top(t, top))
            table.add_row(str(t), role.label, repr(tok)[1:-1], feats)
        if not e.ids:
            out.print(f"{name}: no tokens (empty input)")
        else:
            out.print(table)


def _encoded_json(name: str, e: EncodedInput, top: int) -> dict[str, Any]:
    tokens = [
        {
            "token": tok,
            "id": tid,
            "role": role.label,
            "features": [[i, round(v, 4)] for i, v in e.features.top(t, top)],
        }
        for t, (tok, tid, role) in enumerate(zip(e.tokens, e.ids, e.roles, strict=True))
    ]
    return {"name": name, "dropped_tokens": e.dropped, "windows": e.windows, "tokens": tokens}
