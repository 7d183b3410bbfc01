"""What every command shares: the consoles, common options, settings and error exits."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from monitor.config import Settings
from monitor.models.loading import ModelLoadError
from monitor.sae.base import SAEError

if TYPE_CHECKING:
    from monitor.pipeline import Pipeline

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


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def settings_from(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise fail(f"invalid setting: {fields}") from exc


def pipeline_from(settings: Settings) -> Pipeline:
    from monitor.pipeline import Pipeline

    try:
        return Pipeline.from_settings(settings)
    except (ModelLoadError, SAEError, ValueError) as exc:
        raise fail(str(exc)) from exc


def measure_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table of named measures, the way bench and eval print them."""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    return table
