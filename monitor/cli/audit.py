"""Audit commands on the service database: ``detectors backtest``, ``db prune``, ``db export``."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from monitor.cli.common import JsonOpt, err, fail, out
from monitor.cli.detectors import detectors_app
from monitor.cli.service import _database, _settings, db_app

SinceOpt = Annotated[
    str | None, typer.Option("--since", help="From this date or time (ISO, UTC unless given).")
]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Up to this date or time.")]
TenantOpt = Annotated[
    str | None, typer.Option("--tenant", help="One tenant (default: every tenant).")
]


@detectors_app.command("backtest")
def detectors_backtest(
    rule: Annotated[
        str, typer.Option("--rule", help="A rule file (YAML), or the id of a catalog detector.")
    ],
    since: SinceOpt = None,
    until: UntilOpt = None,
    tenant: TenantOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Pipeline name (default: the first).")
    ] = None,
    samples: Annotated[int, typer.Option(min=0, max=1000)] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Score a new or edited rule over stored history without alerting: fires per day against
    the current rule of the same id, turns whose outcome changes, and samples."""
    from rich.table import Table
    from sqlalchemy.orm import sessionmaker

    from detectors.rules import RuleError
    from monitor.models.loading import ModelLoadError
    from monitor.progress import progress_bar
    from monitor.sae.base import SAEError
    from monitor.service.audit import AuditFilter, parse_day
    from monitor.service.backtest import backtest, candidate_from_catalog, candidate_from_file
    from monitor.service.monitored import load_monitored

    settings = _settings()
    try:
        start, end = parse_day(since, "--since"), parse_day(until, "--until")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    pipelines = {p.name: p for p in settings.resolved_pipelines()}
    config = pipelines.get(model) if model else next(iter(pipelines.values()))
    if config is None:
        raise fail(f"--model: no pipeline {model!r}; configured: {', '.join(pipelines)}")
    engine = _database(settings)
    err.print(f"loading pipeline {config.name} …")
    try:
        monitored = load_monitored(config, settings)
        path = Path(rule)
        candidate = (
            candidate_from_file(path)
            if path.suffix in (".yaml", ".yml") or path.exists()
            else candidate_from_catalog(monitored, rule)
        )
        with progress_bar(err) as bar:
            task = bar.add_task("backtest", total=None, unit="turns", info=candidate.spec.id)
            report = backtest(
                sessionmaker(engine),
                monitored,
                candidate,
                AuditFilter(tenant, since=start, until=end),
                samples,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (RuleError, ModelLoadError, SAEError) as exc:
        raise fail(str(exc)) from exc
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    current = report["compared_with_current"]
    out.print(
        f"[bold]{report['detector']}[/] ({report['source']}) over {report['turns']} stored turns "
        f"({report['from_storage']} from stored features, {report['reencoded']} re-encoded)"
    )
    read_with = ", ".join(f"{fp} {n}" for fp, n in report["fingerprints"].items())
    out.print(f"turns per SAE: {read_with or 'none'}", highlight=False)
    if report["other_sae"]:
        err.print(
            f"[yellow]warning:[/] {report['other_sae']} turns were read with another SAE than "
            f"this pipeline's ({report['sae_fingerprint']}): re-encode them (db reencode)",
            highlight=False,
        )
    out.print(
        f"would fire on {report['new']} ({report['new_rate']:.1%})"
        + (
            f"; the current rule fires on {report['current']} ({report['current_rate']:.1%}); "
            f"{report['newly_firing']} newly firing, {report['no_longer_firing']} no longer"
            if current
            else "; no current detector with this id"
        )
    )
    table = Table(title="fires per day")
    for col in ("day", "turns", "new", *(["current"] if current else [])):
        table.add_column(col, justify="right")
    for row in report["per_day"]:
        table.add_row(
            row["day"],
            str(row["turns"]),
            str(row["new"]),
            *([str(row["current"])] if current else []),
        )
    out.print(table)
    for s in report["samples"]:
        out.print(
            f"  {s['created_at'][:19]}  {s['conversation_id']}  score {s['score']:.3f}"
            f"{'' if s['fired_current'] else '  (new)'}",
            highlight=False,
        )


@db_app.command("prune")
def db_prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete turns past their tenant's retention (with features and verdicts); alerts stay,
    with their text-bearing evidence removed. Safe to interrupt and rerun."""
    from sqlalchemy.orm import sessionmaker

    from monitor.service.retention import prune

    settings = _settings()
    engine = _database(settings)
    try:
        report = prune(
            sessionmaker(engine),
            settings.retention_days,
            settings.tenant_retention_days,
            dry_run=dry_run,
        )
    finally:
        engine.dispose()
    doc = {
        "dry_run": dry_run,
        "turns": report.turns,
        "total": report.total,
        "alerts_kept": report.alerts_kept,
        "outbox_scrubbed": report.outbox,
        "pending_deleted": report.pending,
        "skipped": report.skipped,
    }
    if as_json:
        print(json.dumps(doc))
        return
    if report.skipped:
        out.print("another instance is pruning right now; nothing done (run again later)")
        return
    verb = "would delete" if dry_run else "deleted"
    days = settings.retention_days
    out.print(
        f"retention {days if days is not None else 'forever'} days (default), "
        f"{len(settings.tenant_retention_days)} tenant overrides"
    )
    for t, n in sorted(report.turns.items()):
        out.print(f"  {t}: {verb} {n} turns")
    out.print(f"{verb} {report.total} turns; {report.alerts_kept} alerts kept without their text")


@db_app.command("export")
def db_export(
    what: Annotated[str, typer.Argument(help="alerts or turns")],
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant to export.")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    detector: str | None = None,
    severity: str | None = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    output: Annotated[
        Path | None, typer.Option("--out", help="File to write (default: stdout).")
    ] = None,
) -> None:
    """Stream a tenant's alerts or turns for a filter as JSONL or CSV (the API's export)."""
    from sqlalchemy.orm import sessionmaker

    from monitor.service.audit import AuditFilter, parse_day
    from monitor.service.export import export

    if what not in ("alerts", "turns"):
        raise fail(f"WHAT: {what!r}; choose alerts or turns")
    if fmt not in ("jsonl", "csv"):
        raise fail(f"--format: {fmt!r}; choose jsonl or csv")
    try:
        flt = AuditFilter(
            tenant,
            detector,
            severity,
            None,
            None,
            parse_day(since, "--since"),
            parse_day(until, "--until"),
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    settings = _settings()
    engine = _database(settings)
    tmp = output.with_name(output.name + ".part") if output else None
    try:
        sink: contextlib.AbstractContextManager[BinaryIO] = (
            tmp.open("wb") if tmp else contextlib.nullcontext(sys.stdout.buffer)
        )
        rows = 0
        with sink as f:
            for chunk in export(sessionmaker(engine), what, fmt, flt):
                f.write(chunk)
                rows += 1
        if tmp and output:
            tmp.replace(output)  # the file appears whole or not at all
    except OSError as exc:
        raise fail(f"{output}: {exc}") from exc
    finally:
        if tmp:  # gone once renamed; left over only when the export did not finish
            tmp.unlink(missing_ok=True)
        engine.dispose()
    if output:
        lines = rows - 1 if fmt == "csv" else rows
        err.print(f"wrote {lines} {what} to {output}")
