"""``safety-monitor dashboards``: build the Grafana dashboards' JSON, push it to a Grafana."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monitor.cli.common import err, fail, out

dashboards_app = typer.Typer(
    help="Grafana dashboards as code: build the JSON in dashboards/, push it to a Grafana.",
    no_args_is_help=True,
)


@dashboards_app.command()
def build(
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Folder for the JSON files (the repository's dashboards/)."),
    ] = Path("dashboards"),
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 when a file differs from the code."),
    ] = False,
) -> None:
    """Generate the dashboards' JSON from monitor/dashboards/build.py."""
    from monitor.dashboards import changed, write

    if check:
        stale = changed(out_dir)
        if stale:
            err.print(
                f"out of date in {out_dir}: {', '.join(stale)} "
                "(run `safety-monitor dashboards build`)"
            )
            raise typer.Exit(code=1)
        out.print(f"{out_dir}: up to date")
        return
    for path in write(out_dir):
        out.print(f"wrote {path}")


@dashboards_app.command()
def push(
    url: Annotated[str, typer.Option("--url", envvar="GRAFANA_URL", help="Grafana's base URL.")],
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="GRAFANA_TOKEN",
            help="Service account token (Editor role).",
            show_default=False,
        ),
    ],
    folder: Annotated[str, typer.Option("--folder", help="Title of the folder to create.")] = (
        "Safety monitor"
    ),
    folder_uid: Annotated[
        str, typer.Option("--folder-uid", help="The folder's uid: how it is found again.")
    ] = "safety-monitor",
    timeout: Annotated[float, typer.Option(min=0.5, help="Seconds per HTTP request.")] = 10.0,
) -> None:
    """Upload the dashboards through Grafana's HTTP API (idempotent: same uids, overwrite)."""
    from monitor.dashboards.push import PushError
    from monitor.dashboards.push import push as push_dashboards

    try:
        result = push_dashboards(
            url, token, folder_title=folder, folder_uid=folder_uid, timeout=timeout
        )
    except PushError as exc:
        raise fail(str(exc)) from exc
    made = "created" if result.folder_created else "existing"
    out.print(f"folder {result.folder_uid} ({made})")
    base = url.rstrip("/")
    for uid, path in result.dashboards:
        out.print(f"pushed {uid}: {base}{path}")
    for uid in result.missing_datasources:
        err.print(
            f"[yellow]warning:[/] no data source with uid {uid!r} in this Grafana: the panels "
            "that use it show errors until it exists (dashboards/provisioning/datasources/)",
            highlight=False,
        )
