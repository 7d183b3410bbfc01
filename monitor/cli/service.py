"""Commands of the running service: ``serve``, ``worker``, ``replay``, ``db upgrade``, ``keys``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from monitor.cli.common import JsonOpt, err, fail, out

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from monitor.service.settings import ServiceSettings


db_app = typer.Typer(help="The service database.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
log = logging.getLogger(__name__)


def _settings() -> ServiceSettings:
    from monitor.service.settings import ServiceSettings

    try:
        return ServiceSettings()
    except ValidationError as exc:
        # Field and message only: the input values may be secrets (webhook secrets, URLs).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise fail(f"invalid service settings: {problems}") from exc
    except ValueError as exc:  # the file or the environment names something unknown
        raise fail(f"invalid service settings: {exc}") from exc


def _database(settings: ServiceSettings) -> Engine:
    """The configured database, its schema brought up to date."""
    from sqlalchemy.exc import SQLAlchemyError

    from monitor.service.db import make_engine, upgrade

    engine = make_engine(settings.resolved_database_url())
    try:
        upgrade(engine)
    except SQLAlchemyError as exc:
        raise fail(f"cannot upgrade {engine.url.render_as_string()}: {exc}") from exc
    return engine


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
) -> None:
    """Run the sidecar's HTTP API (settings: SAFETY_MONITOR_* variables, optional YAML file)."""
    import uvicorn

    from monitor.service.app import create_app

    settings = _settings()
    # No log_config: uvicorn's error and access loggers propagate to the root handler the
    # command line set up (monitor.logs), so every line has one format (JSON or text).
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", log_config=None)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema (Alembic) of SAFETY_MONITOR_DATABASE_URL (default SQLite)."""
    engine = _database(_settings())
    out.print(f"schema is current in {engine.url.render_as_string()}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key is bound to.")],
    role: Annotated[str, typer.Option(help="ingest, read, triage or admin.")],
    name: Annotated[
        str | None,
        typer.Option(help="Who holds it (1-64 characters): the author its triage changes show."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from sqlalchemy.orm import Session

    from monitor.service.keys import create_key

    settings = _settings()
    engine = _database(settings)
    with Session(engine) as session:
        try:
            key = create_key(session, tenant, role, name)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        session.commit()
    if as_json:
        print(json.dumps({"key": key, "tenant": tenant, "role": role, "name": name}))
        return
    out.print(key, highlight=False)
    err.print(f"key for tenant {tenant!r}, role {role}: shown once, store it now")


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key, or its first 10 characters (keys list).")],
) -> None:
    """Revoke a key: it stops working at once; its rows stay for the audit trail."""
    from sqlalchemy.orm import Session

    from monitor.service.keys import revoke_key

    settings = _settings()
    engine = _database(settings)
    with Session(engine) as session:
        try:
            n = revoke_key(session, key)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        if n == 0:
            raise fail(f"no live key matches {key[:10]!r}")
        if n > 1:
            raise fail(f"{n} keys share the prefix {key[:10]!r}: give the whole key")
        session.commit()
    out.print(f"revoked {key[:10]}…")


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """Keys by prefix, tenant, role, creation and revocation (never the keys themselves)."""
    from sqlalchemy.orm import Session

    from monitor.service.keys import list_keys

    settings = _settings()
    engine = _database(settings)
    with Session(engine) as session:
        rows = [
            {
                "prefix": k.prefix,
                "tenant": k.tenant,
                "role": k.role,
                "name": k.name,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in list_keys(session)
        ]
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "live"
        name = r["name"] or ""
        out.print(
            f"{r['prefix']}…  {r['tenant']:<20} {r['role']:<7} {name:<16} {state}",
            highlight=False,
        )


def worker(
    host: Annotated[
        str, typer.Option(help="Interface the --port listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve /metrics, /healthz and /readyz on this port (default: no HTTP port).",
        ),
    ] = None,
) -> None:
    """Evaluate turns from the Kafka topic (SAFETY_MONITOR_TRAFFIC_TOPIC) in a consumer group."""
    import signal

    from monitor.localservices import ThreadedServer
    from monitor.service.runtime import Runtime
    from monitor.service.worker import Worker
    from monitor.service.worker_api import worker_app

    settings = _settings()
    if not settings.kafka_bootstrap:
        raise fail("the worker reads Kafka: set SAFETY_MONITOR_KAFKA_BOOTSTRAP=host:port")
    _database(settings).dispose()  # the schema up to date, or a clear error
    runtime = Runtime.load(settings)
    w = Worker(runtime, group=settings.worker_group)
    server: ThreadedServer | None = None
    if port is not None:
        server = ThreadedServer(worker_app(runtime), host, port)
        try:
            server.start(timeout=30)
        except RuntimeError as exc:
            runtime.close()
            raise fail(f"the worker's HTTP port: {exc}") from exc
        log.info("worker metrics and probes on http://%s:%d", host, port)
    runtime.dispatcher.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: w.stop())
    try:
        w.run()
    finally:
        if server is not None:
            server.stop()
        runtime.close()
        err.print(f"worker stopped: {w.stored} turns stored, {w.dead} dead-lettered")


def replay(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    once: Annotated[bool, typer.Option("--once", help="Replay, print the alerts, exit.")] = False,
    traffic: Annotated[
        Path | None, typer.Option("--file", help="JSONL of turns (default: the bundled sample).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="A running sidecar (http://host:port) to replay into instead of starting one; "
            "exits after the replay.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="SAFETY_MONITOR_REPLAY_API_KEY",
            help="With --url: an admin key of that sidecar (keys create --role admin).",
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option("--wait", min=0, help="With --url: seconds to wait for its /readyz.")
    ] = 300,
) -> None:
    """Start the sidecar, replay sample traffic through its HTTP API, print the alerts, serve on.

    With --url, replay into a sidecar that is already running (no local one, no new key).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor
    from importlib import resources

    import httpx
    from rich.table import Table
    from sqlalchemy.orm import Session

    from monitor.localservices import ThreadedServer
    from monitor.service.app import create_app
    from monitor.service.keys import create_key

    source = traffic or Path(str(resources.files("monitor") / "data" / "traffic.jsonl"))
    try:
        turns = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"{source}: {exc}") from exc
    server: ThreadedServer | None = None
    if url is not None:
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise fail(f"--url must be an http:// or https:// address, not {url!r}")
        if not api_key:
            raise fail(
                "--url needs --api-key KEY (or SAFETY_MONITOR_REPLAY_API_KEY): an admin key of "
                "that sidecar, from `safety-monitor keys create --role admin`"
            )
        key = api_key
        # The sidecar may still be loading its model: wait for /readyz, but not for ever.
        deadline = time.monotonic() + wait
        while True:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
                why = f"/readyz answered {ready.status_code}: {ready.text[:200]}"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise fail(
                    f"{base} was not ready within {wait:g} s ({why}); check the URL and "
                    "that the sidecar is running"
                )
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        try:
            probe = httpx.get(
                f"{base}/v1/alerts",
                params={"limit": 1},
                timeout=30,
                headers={"Authorization": f"Bearer {key}"},
            )
        except httpx.HTTPError as exc:
            raise fail(f"{base} stopped answering: {type(exc).__name__}: {exc}") from exc
        if probe.status_code in (401, 403):
            raise fail(
                f"{base} refused the API key ({probe.status_code}: {probe.text[:200]}); "
                "replaying needs a live key with the admin role"
            )
    else:
        settings = _settings()
        engine = _database(settings)
        with Session(engine) as session:
            key = create_key(session, "demo", "admin")
            session.commit()
        engine.dispose()
        server = ThreadedServer(create_app(settings), host, port)
        try:
            server.start()
        except RuntimeError as exc:
            raise fail(str(exc)) from exc
        base = server.url
    headers = {"Authorization": f"Bearer {key}"}
    run_id = time.strftime("%Y%m%dT%H%M%S")

    def send(turn: dict[str, object]) -> httpx.Response:
        body = {**turn, "conversation_id": f"{turn['conversation_id']}-{run_id}"}
        try:
            return httpx.post(f"{base}/v1/turns", json=body, headers=headers, timeout=300)
        except httpx.HTTPError as exc:
            raise fail(f"sending a turn to {base} failed: {type(exc).__name__}: {exc}") from exc

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        responses = list(pool.map(send, turns))
    elapsed = time.monotonic() - started
    failed = [r for r in responses if r.status_code != 200]
    for r in failed:
        err.print(f"[red]turn refused:[/] {r.status_code} {r.text[:200]}")
    alert_ids = {a for r in responses if r.status_code == 200 for a in r.json()["alert_ids"]}
    alerts = httpx.get(
        f"{base}/v1/alerts", headers=headers, params={"limit": 500}, timeout=30
    ).json()
    table = Table(title=f"alerts from {len(turns)} replayed turns ({elapsed:.1f} s)")
    for col in ("severity", "detector", "score", "conversation", "summary"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for a in alerts["alerts"]:
        if a["alert_id"] in alert_ids:
            conversation = a["conversation_id"].removesuffix(f"-{run_id}")
            table.add_row(
                a["severity"], a["detector"], f"{a['score']:.2f}", conversation, a["summary"]
            )
    out.print(table)
    if server is None:  # --url: nothing of ours to keep serving
        if failed:
            raise typer.Exit(code=1)
        return
    if once:
        server.stop()
        if failed:
            raise typer.Exit(code=1)
        return
    out.print(
        f"serving on {base}: audit UI at {base}/ui (log in with the key below), "
        f"API docs at {base}/docs; demo key for tenant 'demo':"
    )
    out.print(key, highlight=False)
    server.serve_until_interrupted()
