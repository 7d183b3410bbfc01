"""``safety-monitor generate`` and ``serve-model``: the built-in models generating, with SAE
features clamped (``--clamp FEATURE=VALUE``, see ``monitor.steering``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from monitor.cli.common import (
    DeviceOpt,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    SaeOpt,
    fail,
    out,
    settings_from,
)
from monitor.messages import Message
from monitor.models.loading import ModelLoadError
from monitor.sae.base import SAEError
from monitor.steering import Clamp, SteeringError, parse_clamp

if TYPE_CHECKING:
    from monitor.generation import Generator

ClampOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--clamp",
        help="FEATURE=VALUE: hold an SAE feature at an activation (6168=4.5, 6168=0) or a "
        "multiple of its atlas maximum (6168=5x). Repeatable.",
    ),
]


def _clamps(texts: list[str] | None) -> list[Clamp]:
    try:
        return [parse_clamp(t) for t in texts or []]
    except SteeringError as exc:
        raise fail(str(exc)) from exc


def _generator(
    model: str | None, layer: int | None, sae: Path | None, device: str | None
) -> Generator:
    from monitor.generation import Generator

    settings = settings_from(model=model, layer=layer, sae=sae, device=device)
    try:
        return Generator.from_settings(settings)
    except (ModelLoadError, SAEError, ValueError) as exc:
        raise fail(str(exc)) from exc


def _messages(prompt: str | None, messages: Path | None) -> list[Message]:
    if (prompt is None) == (messages is None):
        raise fail("give a PROMPT or --messages FILE (a JSON list of {role, content}), not both")
    if prompt is not None:
        return [Message(role="user", content=prompt)]
    assert messages is not None
    try:
        data = json.loads(messages.read_text(encoding="utf-8"))
        return [Message.model_validate(m) for m in data]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise fail(f"{messages}: expected a JSON list of messages ({exc})") from exc
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"]))
        raise fail(f"{messages}: message {where}: {e['msg']}") from exc


def generate(
    prompt: Annotated[str | None, typer.Argument(help="The user's message.")] = None,
    messages: Annotated[
        Path | None, typer.Option("--messages", help="A JSON file: a list of {role, content}.")
    ] = None,
    clamp: ClampOpt = None,
    prompt_too: Annotated[
        bool, typer.Option("--on-prompt", help="Clamp on the prompt's positions too.")
    ] = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also generate unsteered; print side by side.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    seed: Annotated[int, typer.Option(help="Sampling seed (with --temperature > 0).")] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0, help="0: greedy.")] = 0.0,
    model: ModelOpt = None,
    layer: LayerOpt = None,
    sae: SaeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate an answer with SAE features clamped at the SAE's layer (reconstruction error
    kept, so only the clamped features change); --compare shows the unsteered answer beside it."""
    conversation = _messages(prompt, messages)
    clamps = _clamps(clamp)
    gen = _generator(model, layer, sae, device)
    try:
        steerer = gen.steerer(clamps, prompt=prompt_too)
    except SteeringError as exc:
        raise fail(str(exc)) from exc
    kw = {"max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature}
    steered = gen.generate(conversation, steerer=steerer, **kw)  # type: ignore[arg-type]
    plain = gen.generate(conversation, **kw) if compare else None  # type: ignore[arg-type]
    if as_json:
        doc = {
            "model": gen.name,
            "layer": gen.layer,
            "clamp": [str(c) for c in clamps],
            "steered": vars(steered),
            "unsteered": vars(plain) if plain else None,
        }
        print(json.dumps(doc, indent=2))
        return
    if plain is None:
        out.print(steered.text, highlight=False, markup=False)
        return
    table = Table(title=f"{gen.name}, layer {gen.layer}", show_lines=True)
    table.add_column("unsteered")
    table.add_column("clamp " + ", ".join(str(c) for c in clamps) if clamps else "(no clamp)")
    table.add_row(plain.text, steered.text)
    out.print(table)


def serve_model(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    clamp: ClampOpt = None,
    no_steering: Annotated[
        bool,
        typer.Option("--no-steering", help="Refuse requests' steering fields (422)."),
    ] = False,
    model: ModelOpt = None,
    layer: LayerOpt = None,
    sae: SaeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """An OpenAI-compatible model server for a built-in model (POST /v1/chat/completions,
    streamed or not; GET /v1/models); requests may steer with {"steering": {"clamp": {...}}},
    and --clamp sets what every request gets unless it says otherwise."""
    import uvicorn

    from monitor.model_server import create_model_app

    defaults = _clamps(clamp)
    gen = _generator(model, layer, sae, device)
    if defaults and no_steering:
        raise fail("--clamp and --no-steering contradict each other")
    try:
        gen.steerer(defaults)  # refused now rather than on every request
    except SteeringError as exc:
        raise fail(str(exc)) from exc
    app = create_model_app(gen, defaults, steering=not no_steering)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=None)
