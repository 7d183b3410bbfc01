"""``db reencode``: stored turns re-read with a new SAE (``monitor.service.reencode``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from monitor.cli.common import JsonOpt, err, fail, out
from monitor.cli.service import _database, _settings, db_app


@db_app.command("reencode")
def db_reencode(
    sae: Annotated[
        Path, typer.Option("--sae", help="The new SAE: an SAELens directory for the model.")
    ],
    use_ray: Annotated[
        bool, typer.Option("--ray", help="Encode pages on Ray actors (model and SAE each).")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="With --ray: a running Ray cluster (its head's host:port, or auto); "
            "default: start a local one on loopback.",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="With --ray: actors, one CPU each.")
    ] = 1,
    since: Annotated[
        str | None, typer.Option("--since", help="Turns from this date or time (ISO, UTC).")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="One tenant (default: every tenant).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Pipeline name (default: the first).")
    ] = None,
    page_size: Annotated[
        int, typer.Option("--page-size", min=1, max=10_000, help="Turns per transaction.")
    ] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Re-encode stored turns with a new SAE, from their stored (redacted) messages: each
    page's per-token features replaced in one transaction, the SAE's fingerprint recorded per
    turn. Verdicts and alerts already stored are NOT changed. Turns already read with this SAE
    are skipped: run it again to continue an interrupted run."""
    from sqlalchemy.orm import sessionmaker

    from monitor.models.loading import ModelLoadError
    from monitor.progress import progress_bar
    from monitor.sae.base import SAEError
    from monitor.service.audit import parse_day
    from monitor.service.reencode import (
        PageEncoder,
        Scope,
        load_spec,
        local_pages,
        ray_pages,
        reencode,
    )

    settings = _settings()
    try:
        start = parse_day(since, "--since")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if not use_ray and (address is not None or workers != 1):
        raise fail("--address and --workers go with --ray")
    if not sae.is_dir():
        raise fail(f"--sae {sae}: no such SAE directory")
    pipelines = {p.name: p for p in settings.resolved_pipelines()}
    config = pipelines.get(model) if model else next(iter(pipelines.values()))
    if config is None:
        raise fail(f"--model: no pipeline {model!r}; configured: {', '.join(pipelines)}")
    try:
        spec = load_spec(settings.pipeline_settings(config), sae)
    except (SAEError, ModelLoadError) as exc:
        raise fail(str(exc)) from exc
    ray: Any = None
    started = False
    try:
        if use_ray:
            ray, started = _ray(address, workers)
            err.print(f"encoding on {workers} Ray actor(s), model and SAE {spec.fingerprint} each")
            encode = ray_pages(ray, spec, workers)
        else:
            err.print(f"loading {spec.model} with SAE {spec.fingerprint} …")
            encode = local_pages(PageEncoder(spec))
        engine = _database(settings)
        try:
            with progress_bar(err) as bar:
                task = bar.add_task("reencode", total=None, unit="turns", info=spec.fingerprint)
                report = reencode(
                    sessionmaker(engine),
                    Scope(config.name, tenant, start),
                    spec.fingerprint,
                    encode,
                    page_size,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        finally:
            engine.dispose()
    except Exception as exc:
        if ray is not None and isinstance(exc, ray.exceptions.RayError):
            raise fail(f"a Ray actor failed: {exc}") from exc
        raise
    finally:
        if started:
            ray.shutdown()
    doc = {"pipeline": config.name, **dataclasses.asdict(report)}
    if as_json:
        print(json.dumps(doc))
        return
    out.print(
        f"re-encoded {report.reencoded} turns of {config.name} with SAE {report.fingerprint} "
        f"in {report.pages} pages; {report.already} were read with it already"
        + (f", {report.failed} could not be read" if report.failed else "")
        + (f", {report.gone} were deleted meanwhile" if report.gone else "")
        + ". Verdicts and alerts are unchanged.",
        highlight=False,
    )


def _ray(address: str | None, workers: int) -> tuple[Any, bool]:
    """Ray joined to ``address``, or to a new local cluster on loopback, with room for
    ``workers`` one-CPU actors (else a CLI error, before any work); and whether this call
    started it (so that it ends it)."""
    from monitor.training.ray_cluster import RayClusterError, connect, import_ray, shutdown

    try:
        was_running = import_ray(local=address is None).is_initialized()
    except RayClusterError as exc:
        raise fail(str(exc)) from exc
    try:
        ray, _shape = connect(address, workers, cpus=1, gpu=False)
        return ray, not was_running
    except RayClusterError as exc:
        if not was_running:  # started here and too small: not left running
            shutdown()
        raise fail(str(exc)) from exc
