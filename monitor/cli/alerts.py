"""Commands of alert delivery: ``webhooks secret``, ``deliveries list`` and ``deliveries retry``."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Annotated, cast

import typer

from monitor.cli.audit import SinceOpt, TenantOpt
from monitor.cli.common import JsonOpt, err, fail, out
from monitor.cli.service import _database, _settings

webhooks_app = typer.Typer(help="Webhook receivers.", no_args_is_help=True)
deliveries_app = typer.Typer(help="Webhook deliveries.", no_args_is_help=True)
WebhookOpt = Annotated[str | None, typer.Option("--webhook", help="One webhook or sink (by name).")]


@webhooks_app.command("secret")
def webhooks_secret() -> None:
    """Print a new webhook secret (Standard Webhooks: whsec_ + base64 of 32 random bytes)."""
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[
        str | None, typer.Option("--status", help="pending, delivered or dead.")
    ] = None,
    tenant: TenantOpt = None,
    webhook: WebhookOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Webhook deliveries, newest first."""
    from sqlalchemy.orm import Session

    from monitor.service.deliveries import DeliveryFilter, Status, list_deliveries

    if status not in (None, "pending", "delivered", "dead"):
        raise fail(f"--status: {status!r} is not pending, delivered or dead")
    engine = _database(_settings())
    with Session(engine) as session:
        flt = DeliveryFilter(tenant=tenant, webhook=webhook)
        rows = list_deliveries(session, flt, cast("Status | None", status), limit)
    engine.dispose()
    if as_json:
        print(json.dumps({"deliveries": rows}, indent=2))
        return
    for r in rows:
        out.print(
            f"{r['alert_id']}  {r['webhook']}  {r['event']}  {r['status']}  "
            f"attempts {r['attempts']}  {r['last_error'] or ''}",
            highlight=False,
        )


@deliveries_app.command("retry")
def deliveries_retry(
    dead: Annotated[
        bool, typer.Option("--dead", help="Retry the dead-lettered deliveries (required).")
    ] = False,
    since: SinceOpt = None,
    tenant: TenantOpt = None,
    webhook: WebhookOpt = None,
) -> None:
    """Send dead-lettered deliveries again, each from a fresh round of attempts (after the
    cause is fixed: the receiver back up, its secret corrected)."""
    from sqlalchemy.orm import Session

    from monitor.service.audit import parse_day
    from monitor.service.deliveries import DeliveryFilter, retry_dead

    if not dead:
        raise fail("say which deliveries: --dead (the dead-lettered ones)")
    try:
        start = parse_day(since, "--since")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    engine = _database(_settings())
    with Session(engine) as session:
        n = retry_dead(session, DeliveryFilter(tenant=tenant, webhook=webhook, since=start))
    engine.dispose()
    err.print(f"{n} dead-lettered deliveries due again; the service sends them on its next round")
