"""``safety-monitor silences add|list|expire``: a detector's fires for a tenant (or every
tenant), optionally only those matching a feature pattern, stored and counted, not alerted, for
a time window (the API's ``/v1/silences``, as an operator: all-tenant silences included)."""

from __future__ import annotations

import getpass
import json
from typing import TYPE_CHECKING, Annotated

import typer

from monitor.cli.audit import TenantOpt
from monitor.cli.common import JsonOpt, err, fail, out
from monitor.cli.service import _database, _settings

if TYPE_CHECKING:
    from monitor.service.settings import ServiceSettings

silences_app = typer.Typer(
    help="Silences: a detector's fires stored and counted, not alerted, for a while.",
    no_args_is_help=True,
)
ByOpt = Annotated[
    str | None, typer.Option("--by", help="Who (shown with the silence; default: cli:$USER).")
]


def _operator(by: str | None) -> str:
    if by:
        return by[:64]
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except (KeyError, OSError):  # no user name in this container
        return "cli"


def _detectors(settings: ServiceSettings, pipeline: str | None) -> set[str]:
    """The detector ids of the configured pipelines' catalogs (read without loading models)."""
    from detectors.engine import catalog_dir
    from detectors.rules import RuleError, load_definitions

    configs = settings.resolved_pipelines()
    if pipeline is not None:
        configs = [c for c in configs if c.name == pipeline]
        if not configs:
            names = ", ".join(c.name for c in settings.resolved_pipelines())
            raise fail(f"--pipeline: no pipeline {pipeline!r}; configured: {names}")
    try:
        return {s.id for c in configs for _f, s in load_definitions(c.catalog or [catalog_dir()])}
    except RuleError as exc:
        raise fail(str(exc)) from exc


@silences_app.command("add")
def silences_add(
    detector: Annotated[str, typer.Option("--detector", help="The detector id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (shown with the silence).")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="The tenant whose fires it silences.")
    ] = None,
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="Every tenant's fires (instead of --tenant).")
    ] = False,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="Only fires with an evidence feature matching: indices, ranges, label globs, "
            "comma-separated (6168, 7000-7100, *praise*).",
        ),
    ] = None,
    duration: Annotated[
        str | None, typer.Option("--duration", help="90s, 30m, 2h, 7d, 1w, 1h30m (max 90 days).")
    ] = None,
    ends_at: Annotated[
        str | None, typer.Option("--ends-at", help="Or until this ISO time (UTC unless given).")
    ] = None,
    starts_at: Annotated[
        str | None, typer.Option("--starts-at", help="From this ISO time (default: now).")
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only this pipeline (default: every one).")
    ] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Silence a detector for a tenant (or every tenant): while active, its fires (with
    --features, those matching) are stored and counted (verdicts,
    safety_monitor_silenced_fires_total), but make no alert, outbox row or delivery."""
    from sqlalchemy.orm import Session

    from monitor.service.audit import parse_day
    from monitor.service.silences import SilenceError, create, parse_duration, silence_json

    if (tenant is None) == (not all_tenants):
        raise fail("give exactly one of --tenant and --all-tenants")
    settings = _settings()
    if detector not in _detectors(settings, pipeline):
        raise fail(f"--detector: no detector {detector!r} in the configured pipelines' catalogs")
    try:
        start, end = parse_day(starts_at, "--starts-at"), parse_day(ends_at, "--ends-at")
        length = parse_duration(duration) if duration is not None else None
    except ValueError as exc:
        raise fail(str(exc)) from exc
    engine = _database(settings)
    try:
        with Session(engine) as session:
            try:
                silence = create(
                    session,
                    tenant=tenant,
                    detector=detector,
                    pipeline=pipeline,
                    features=features,
                    reason=reason,
                    created_by=_operator(by),
                    starts_at=start,
                    ends_at=end,
                    duration=length,
                )
            except SilenceError as exc:
                raise fail(f"--{exc.field.replace('_', '-')}: {exc.message}") from exc
            session.commit()
            doc = silence_json(silence)
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps(doc))
        return
    only = f" (features {doc['features']})" if doc["features"] else ""
    out.print(
        f"silence {doc['id']}: {detector}{only} for {tenant or 'all tenants'} from "
        f"{doc['starts_at']} to {doc['ends_at']} ({doc['state']})",
        highlight=False,
        markup=False,  # patterns and reasons are as typed: [abc] is a glob, not rich markup
    )


@silences_app.command("list")
def silences_list(
    tenant: TenantOpt = None,
    state: Annotated[
        str | None, typer.Option("--state", help="pending, active or expired (default: all).")
    ] = None,
    detector: Annotated[str | None, typer.Option("--detector", help="One detector.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Silences (with --tenant: its own and the all-tenant ones), latest ending first, with the
    fires each withheld."""
    from sqlalchemy.orm import Session

    from monitor.service.silences import STATES, listed

    if state is not None and state not in STATES:
        raise fail(f"--state: {state!r} is not pending, active or expired")
    engine = _database(_settings())
    try:
        with Session(engine) as session:
            rows = listed(session, tenant, state, detector, limit)
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps({"silences": rows}, indent=2))
        return
    for r in rows:
        who = "all tenants" if r["all_tenants"] else r["tenant"]
        where = f"{who}/{r['pipeline']}" if r["pipeline"] else who
        only = f" features {r['features']}" if r["features"] else ""
        out.print(
            f"{r['id']:>5}  {r['state']:<8} {r['detector']:<24} {where:<24} "
            f"{r['starts_at'][:19]} → {r['ends_at'][:19]}  {r['fires']} fires{only}  "
            f"by {r['created_by']}: {r['reason']}",
            highlight=False,
            markup=False,  # tenants' patterns and reasons, as typed ([/x] is not markup)
        )
    if not rows:
        err.print("no silences")


@silences_app.command("expire")
def silences_expire(
    silence_id: Annotated[int, typer.Argument(help="The silence's id (silences list).")],
    tenant: TenantOpt = None,
    by: ByOpt = None,
) -> None:
    """End a silence now: its detector's fires alert again. It stays listed."""
    from sqlalchemy.orm import Session

    from monitor.service.rows import utc_iso
    from monitor.service.silences import SilenceNotFoundError, expire

    engine = _database(_settings())
    try:
        with Session(engine) as session:
            try:
                silence = expire(session, tenant, silence_id, _operator(by))
            except SilenceNotFoundError:
                raise fail(f"no silence {silence_id}") from None
            session.commit()
            detector, ends = silence.detector, utc_iso(silence.ends_at)
    finally:
        engine.dispose()
    out.print(f"silence {silence_id} ({detector}) ends {ends}", highlight=False, markup=False)
