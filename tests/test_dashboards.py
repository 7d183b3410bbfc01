"""The Grafana dashboards, checked without a Grafana server.

Grafana itself cannot run here, so these tests do what it would do with each panel: expand the
template variables and macros the way Grafana does (``expand_sql``, ``expand_promql`` below),
then run the resulting query against the real backend: the SQL panels against PostgreSQL
seeded with known alerts and turns, the PromQL panels against a real Prometheus that scraped
the real sidecar after known traffic. The committed JSON must equal what the code generates,
and every panel must name a data source that the provisioning file defines.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from samples import PLAIN, SCAM, WEBHOOK_SECRET, turn_row
from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.dashboards import FOLDER_TITLE, FOLDER_UID, build_all, changed, render
from monitor.dashboards.push import payloads
from monitor.localservices import ThreadedServer, free_port, stop_process
from monitor.service import silences
from monitor.service.db import (
    Alert,
    Outbox,
    Silence,
    Turn,
    VerdictRow,
    WebhookDelivery,
    make_engine,
    upgrade,
)
from monitor.service.keys import create_key

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
ALL = "$__all"  # the value Grafana gives a variable when "All" is selected


# ==== Grafana's query expansion ================================================================
#
# Grafana turns a panel's query text into what the data source runs in two steps:
#
# 1. The frontend interpolates template variables (public/app/features/templating): ``$var``,
#    ``${var}``, ``${var:format}`` and ``[[var]]``; unknown names are left alone. A variable set
#    to All takes the variable's custom ``allValue`` *as is* (no quoting, no escaping), or, with
#    no custom all value, the list of all its options. Otherwise the value is formatted by the
#    explicit ``:format`` if given, else by the target data source:
#      - SQL data sources: for a multi-value or include-All variable each value is quoted as an
#        SQL string literal ('' doubles a quote) and the list joined with commas; a plain single
#        value is inserted with quotes doubled but unquoted.
#      - Prometheus: multi-value or include-All variables are regex-escaped (inside a PromQL
#        string, so the escaping backslash is doubled) and several values become ``(a|b)``; a
#        single plain value only gets backslashes and quotes escaped.
#    The built-in ``$__interval`` (and ``$__interval_ms``, ``$__rate_interval`` for Prometheus)
#    are variables too: Grafana derives them from the time range, the panel width and the data
#    source's scrape interval; the tests pass the values a panel would get.
# 2. The SQL data source's backend expands its macros (pkg/tsdb/grafana-postgresql-datasource):
#      $__timeFilter(col)        → col BETWEEN '<from>' AND '<to>'      (RFC 3339, UTC)
#      $__timeFrom(), $__timeTo() → '<from>', '<to>'
#      $__timeGroup(col, 5m)     → floor(extract(epoch from col)/300)*300
#      $__timeGroupAlias(col, 5m) → the same AS "time"    (a fill argument only changes how
#                                   Grafana fills empty buckets after the query, not the SQL)
#      $__time(col)              → col AS "time"
#      $__timeEpoch(col)         → extract(epoch from col) AS "time"
#      $__unixEpochFilter(col)   → col >= <from epoch> AND col <= <to epoch>

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")
_MACRO = re.compile(r"\$__(\w+)\(([^)]*)\)")
_PROM_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _format(values: list[str], fmt: str | None, var: dict[str, Any], dialect: str) -> str:
    multi = bool(var.get("multi") or var.get("includeAll"))
    if fmt in ("raw", "text", "csv"):
        return ",".join(values)
    if fmt in ("sqlstring", "singlequote"):
        return ",".join(_sql_literal(v) for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "regex":
        escaped = [re.sub(r"[\\^$*+?.()|{}\[\]/]", lambda m: "\\" + m.group(0), v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt is not None:
        raise ValueError(f"format {fmt!r} is not implemented here")
    if dialect == "sql":
        if multi:
            return ",".join(_sql_literal(v) for v in values)
        return values[0].replace("'", "''")
    if not multi:  # Prometheus, single plain value
        return values[0].replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    escaped = [
        _PROM_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v.replace("\\", "\\\\\\\\"))
        for v in values
    ]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(
    query: str,
    variables: list[dict[str, Any]],
    values: dict[str, str | list[str]],
    builtins: dict[str, str],
    dialect: str,
) -> str:
    """Step 1: template variables, as Grafana's frontend replaces them for ``dialect``
    ("sql" or "prometheus"). ``values`` maps a variable to its selection: ``ALL``, one value
    or a list; a variable not in ``values`` keeps its saved ``current`` value."""
    defs = {v["name"]: v for v in variables}

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(5)
        if name in builtins:
            return builtins[name]
        var = defs.get(name)
        if var is None:
            return m.group(0)
        chosen = values.get(name, var.get("current", {}).get("value", var.get("query", "")))
        chosen_list = [chosen] if isinstance(chosen, str) else list(chosen)
        if chosen_list == [ALL]:
            if var.get("allValue"):
                return interpolate(var["allValue"], variables, values, builtins, dialect)
            chosen_list = [o["value"] for o in var.get("options", []) if o["value"] != ALL]
        return _format(chosen_list, fmt, var, dialect)

    return _VARIABLE.sub(replace, query)


def duration_seconds(text_: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text_.strip())
    if m is None:
        raise ValueError(f"not a Grafana duration: {text_!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * scale


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def expand_macros(sql: str, t_from: dt.datetime, t_to: dt.datetime) -> str:
    """Step 2: the PostgreSQL data source's macros."""

    def replace(m: re.Match[str]) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",") if a.strip()]
        if name == "timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339(t_from)}' AND '{_rfc3339(t_to)}'"
        if name == "timeFrom":
            return f"'{_rfc3339(t_from)}'"
        if name == "timeTo":
            return f"'{_rfc3339(t_to)}'"
        if name in ("timeGroup", "timeGroupAlias"):
            n = _num(duration_seconds(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{n})*{n}"
            return group + (' AS "time"' if name == "timeGroupAlias" else "")
        if name == "time":
            return f'{args[0]} AS "time"'
        if name == "timeEpoch":
            return f'extract(epoch from {args[0]}) AS "time"'
        if name == "unixEpochFilter":
            lo, hi = int(t_from.timestamp()), int(t_to.timestamp())
            return f"{args[0]} >= {lo} AND {args[0]} <= {hi}"
        raise ValueError(f"macro $__{name} is not implemented here")

    return _MACRO.sub(replace, sql)


def expand_sql(
    sql: str,
    dashboard: dict[str, Any],
    values: dict[str, str | list[str]],
    t_from: dt.datetime,
    t_to: dt.datetime,
    interval: str,
) -> str:
    """A SQL panel's query as Grafana's PostgreSQL data source would run it."""
    builtins = {"__interval": interval, "__interval_ms": _num(duration_seconds(interval) * 1000)}
    variables = dashboard["templating"]["list"]
    out = expand_macros(interpolate(sql, variables, values, builtins, "sql"), t_from, t_to)
    assert "$" not in out, f"unexpanded: {out}"
    return out


def expand_promql(
    expr: str,
    dashboard: dict[str, Any],
    values: dict[str, str | list[str]],
    interval: str,
    scrape_interval_s: float,
) -> str:
    """A PromQL panel's expression as Grafana sends it. ``$__rate_interval`` follows Grafana's
    rule: max($__interval + scrape interval, 4 × scrape interval)."""
    step = duration_seconds(interval)
    rate = max(step + scrape_interval_s, 4 * scrape_interval_s)
    builtins = {
        "__interval": interval,
        "__interval_ms": _num(step * 1000),
        "__rate_interval": f"{math.ceil(rate)}s",
    }
    out = interpolate(expr, dashboard["templating"]["list"], values, builtins, "prometheus")
    assert "$" not in out, f"unexpanded: {out}"
    return out


def test_expander_follows_grafana_rules() -> None:
    """The expander itself, on the cases the panels rely on."""
    variables = [
        {
            "name": "t",
            "multi": True,
            "includeAll": True,
            "allValue": "'__all'",
            "options": [{"value": "a"}, {"value": "b"}],
        },
        {
            "name": "n",
            "multi": True,
            "includeAll": True,
            "options": [{"value": "x"}, {"value": "y"}],
        },
        {"name": "s", "multi": False, "includeAll": False, "current": {"value": "it's"}},
        {"name": "p", "multi": True, "includeAll": True, "allValue": ".*"},
    ]
    assert interpolate("IN ($t)", variables, {"t": ALL}, {}, "sql") == "IN ('__all')"
    assert interpolate("IN ($t)", variables, {"t": ["o'n", "b"]}, {}, "sql") == "IN ('o''n','b')"
    assert interpolate("IN (${n})", variables, {"n": ALL}, {}, "sql") == "IN ('x','y')"
    assert interpolate("${n:csv}", variables, {"n": ["x", "y"]}, {}, "sql") == "x,y"
    assert interpolate("${n:sqlstring}", variables, {"n": ["x"]}, {}, "sql") == "'x'"
    assert interpolate("[[s]] $s", variables, {}, {}, "sql") == "it''s it''s"
    assert interpolate("$__timeFilter(c) $nope", variables, {}, {}, "sql") == (
        "$__timeFilter(c) $nope"
    )
    assert interpolate('p=~"$p"', variables, {"p": ALL}, {}, "prometheus") == 'p=~".*"'
    assert interpolate('p=~"$p"', variables, {"p": ["a.b", "c"]}, {}, "prometheus") == (
        'p=~"(a\\\\.b|c)"'
    )
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    out = expand_macros(
        "SELECT $__timeGroupAlias(created_at, 10m) WHERE $__timeFilter(created_at)",
        t0,
        t0 + dt.timedelta(hours=1),
    )
    assert out == (
        'SELECT floor(extract(epoch from created_at)/600)*600 AS "time" WHERE created_at '
        "BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-01T01:00:00Z'"
    )
    assert duration_seconds("1h") == 3600 and duration_seconds("250ms") == 0.25


# ==== (c) generated JSON, provisioning, push payloads ==========================================


def _targets(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_committed_json_is_what_the_code_generates() -> None:
    generated = build_all()
    committed = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert committed == sorted(generated), "dashboards/*.json and the code list different files"
    for name, doc in generated.items():
        on_disk = (DASHBOARDS / name).read_text(encoding="utf-8")
        assert on_disk == render(doc), (
            f"dashboards/{name} is out of date: run `safety-monitor dashboards build`"
        )
    assert changed(DASHBOARDS) == []


def test_json_parses_back_with_the_sdk_model_unchanged() -> None:
    """The generated JSON is a dashboard the SDK's own schema model reads back as is."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    for name, doc in build_all().items():
        back = json.loads(json.dumps(Dashboard.from_json(doc), cls=JSONEncoder))
        assert back == {k: v for k, v in doc.items() if k != "id"}, name  # id null: new


def test_build_command_writes_and_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["dashboards", "build", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for name, doc in build_all().items():
        assert json.loads((tmp_path / name).read_text()) == doc
    assert (
        runner.invoke(cli, ["dashboards", "build", "--out", str(tmp_path), "--check"]).exit_code
        == 0
    )
    (tmp_path / "service-health.json").write_text("{}\n")
    r = runner.invoke(cli, ["dashboards", "build", "--out", str(tmp_path), "--check"])
    assert r.exit_code == 1 and "service-health.json" in r.output


def _provisioned() -> dict[str, dict[str, Any]]:
    docs = [yaml.safe_load(p.read_text()) for p in (PROVISIONING / "datasources").glob("*.yaml")]
    return {ds["uid"]: ds for doc in docs for ds in doc["datasources"]}


def test_every_panel_uses_a_provisioned_datasource() -> None:
    sources = _provisioned()
    assert {ds["type"] for ds in sources.values()} == {
        "grafana-postgresql-datasource",
        "prometheus",
    }
    for ds in sources.values():
        env = json.dumps(ds)
        assert "${" in env, f"{ds['name']}: URL and credentials come from the environment"
    pg = next(ds for ds in sources.values() if ds["type"] == "grafana-postgresql-datasource")
    assert pg["secureJsonData"]["password"] == "${POSTGRES_PASSWORD}"
    prom = next(ds for ds in sources.values() if ds["type"] == "prometheus")
    assert prom["url"] == "${PROMETHEUS_URL}"
    used = 0
    for name, doc in build_all().items():
        for panel, target in _targets(doc):
            for ref in (panel.get("datasource"), target.get("datasource")):
                if ref is None:
                    continue
                assert ref["uid"] in sources, f"{name} / {panel['title']}: unknown {ref}"
                assert sources[ref["uid"]]["type"] == ref["type"]
                used += 1
            assert target.get("datasource"), f"{name} / {panel['title']} has no data source"
        for var in doc["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"] in sources
    assert used > 20


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "safety-monitor.yaml").read_text())[
        "providers"
    ]
    assert provider["folder"] == FOLDER_TITLE and provider["folderUid"] == FOLDER_UID
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboards_have_stable_uids_ids_and_variables() -> None:
    docs = build_all()
    overview, health = docs["safety-overview.json"], docs["service-health.json"]
    assert overview["uid"] == "sm-safety-overview" and health["uid"] == "sm-service-health"
    for doc in docs.values():
        ids = [p["id"] for p in doc["panels"]]
        assert ids == list(range(1, len(ids) + 1))
        for _panel, target in _targets(doc):
            assert target["refId"]
    names = {v["name"]: v for v in overview["templating"]["list"]}
    assert {"tenant", "detector", "pipeline", "audit_url"} <= set(names)
    assert names["audit_url"]["type"] == "textbox"
    assert names["audit_url"]["query"] == "http://localhost:8000"
    assert {v["name"] for v in health["templating"]["list"]} == {"pipeline", "detector"}
    table = next(p for p in overview["panels"] if p["title"] == "Latest alerts")
    links = [
        prop["value"]
        for o in table["fieldConfig"]["overrides"]
        if o["matcher"]["options"] == "conversation_id"
        for prop in o["properties"]
        if prop["id"] == "links"
    ]
    assert links and links[0][0]["url"].startswith("${audit_url}/ui/conversations/${__value.raw")


def test_push_payloads_overwrite_with_stable_uids() -> None:
    first, second = payloads(), payloads()
    assert first == second
    uids = [p["dashboard"]["uid"] for p in first]
    assert uids == [doc["uid"] for doc in build_all().values()]
    for p in first:
        assert p["overwrite"] is True and p["folderUid"] == FOLDER_UID
        assert p["dashboard"]["id"] is None
    assert {p["folderUid"] for p in payloads(folder_uid="elsewhere")} == {"elsewhere"}


def test_push_refuses_an_unreachable_grafana() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = CliRunner().invoke(
        cli,
        ["dashboards", "push", "--url", url, "--token", "glsa_x", "--timeout", "3"],
        env={"COLUMNS": "300"},
    )
    assert r.exit_code != 0
    message = " ".join(r.output.split())
    assert f"Grafana at {url} is unreachable" in message and "refused" in message.lower()
    r = CliRunner().invoke(cli, ["dashboards", "push", "--url", "grafana:3000", "--token", "x"])
    assert r.exit_code != 0 and "http://" in r.output


# ==== (a) the SQL panels on a real PostgreSQL ===================================================

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)
BUCKET = 600  # $__interval 10m
TENANTS = ("acme", "o'neil")  # a quote in a tenant name exercises the SQL quoting


def _at(minute: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minute)


# (tenant, pipeline, detector, severity, kind, minute, conversation, suppressed, features)
# features: (index, label, value, cutoff); an escalation's evidence has none.
SEED_ALERTS: list[
    tuple[str, str, str, str, str, float, str, int, list[tuple[int, str, float, float]]]
] = [
    (
        "acme",
        "smol",
        "scam_email",
        "high",
        "rule",
        5,
        "c1",
        0,
        [(123, "prize", 2.0, 1.0), (77, "money", 1.5, 1.0)],
    ),
    ("acme", "smol", "scam_email", "high", "rule", 7, "c2", 2, [(123, "prize", 3.0, 1.0)]),
    ("acme", "smol", "deception", "medium", "rule", 15, "c3", 0, [(300, "lie", 0.9, 0.5)]),
    ("acme", "gemma", "scam_email", "critical", "escalation", 16, "c2", 0, []),
    (
        "o'neil",
        "gemma",
        "prompt_injection",
        "high",
        "rule",
        25,
        "d1",
        1,
        [(55, "ignore", 3.0, 1.0), (123, "prize", 1.2, 1.0)],
    ),
    ("o'neil", "smol", "scam_email", "high", "rule", 45, "d2", 0, [(123, "prize", 1.1, 1.0)]),
    ("acme", "smol", "scam_email", "high", "rule", 75, "c9", 0, [(123, "prize", 5.0, 1.0)]),
    ("o'neil", "smol", "deception", "low", "rule", -3, "d0", 0, [(300, "lie", 2.0, 0.5)]),
    # Judged in triage, but 31 days before the range ends: out of the triage window.
    ("acme", "smol", "scam_email", "high", "rule", -31 * 24 * 60, "c0", 0, []),
]
# Triage verdicts of SEED_ALERTS (by index); the others are not judged.
SEED_VERDICTS = {
    0: "true_positive",
    1: "false_positive",
    2: "false_positive",
    3: "unsure",  # judged, but neither true nor false positive: not in the share
    4: "true_positive",
    5: "false_positive",
    7: "false_positive",  # before the range, within the 30 days: counted
    8: "false_positive",  # 31 days back: not counted
}
TRIAGE_WINDOW = dt.timedelta(days=30)  # monitor.service.metrics.TRIAGE_DAYS
# Turns without an alert: (tenant, pipeline, minute, tokens, detector a silence withheld)
SEED_QUIET: list[tuple[str, str, float, int, str | None]] = [
    ("acme", "smol", 1, 40, None),
    ("acme", "smol", 31, 50, "scam_email"),
    ("acme", "gemma", 50, 60, None),
    ("o'neil", "gemma", 52, 70, "prompt_injection"),
    ("o'neil", "gemma", 55, 20, "prompt_injection"),
    ("zeta", "smol", 90, 10, None),
]
# Silences: (tenant, detector, pipeline, starts minute, ends minute); active at T1 when they
# start at or before 60 and end after it.
SEED_SILENCES: list[tuple[str, str, str | None, float, float]] = [
    ("acme", "scam_email", None, -60, 120),
    ("o'neil", "prompt_injection", "gemma", 50, 61),
    ("acme", "deception", None, 0, 30),  # expired before the range ends
    ("zeta", "scam_email", "smol", 90, 200),  # not started yet
]
DETECTORS = ("scam_email", "deception", "prompt_injection")


@pytest.fixture(scope="module")
def seeded(pg_url: str) -> Iterator[tuple[Engine, dict[str, list[dict[str, Any]]]]]:
    """A fresh database in the session's PostgreSQL cluster: the service schema, known rows."""
    admin = make_engine(pg_url)
    name = f"dash_{uuid.uuid4().hex[:10]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin.url).set(database=name)
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        upgrade(engine)
        expected = _seed(engine)
        yield engine, expected
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _seed(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Insert the seed rows; return them as plain records for the expectations."""
    alerts, turns, verdicts = [], [], []
    with Session(engine) as session:
        for tenant in (*TENANTS, "zeta"):
            create_key(session, tenant, "read")
        for i, (tenant, pipe, det, sev, kind, minute, conv, supp, feats) in enumerate(SEED_ALERTS):
            turns.append({"tenant": tenant, "pipeline": pipe, "at": _at(minute), "tokens": 100 + i})
            row = turn_row(tenant, conv, n_tokens=100 + i, created_at=_at(minute), pipeline=pipe)
            session.add(row)
            turn_id = row.id
            session.flush()
            for d in DETECTORS:
                fired = d == det and kind == "rule"
                verdicts.append(
                    {
                        "tenant": tenant,
                        "pipeline": pipe,
                        "at": _at(minute),
                        "detector": d,
                        "fired": fired,
                        "silenced": False,
                    }
                )
                session.add(
                    VerdictRow(
                        turn_id=turn_id,
                        detector=d,
                        kind="rule",
                        score=1.0,
                        fired=fired,
                        severity="high",
                        evidence={},
                    )
                )
            evidence: dict[str, Any] = (
                {
                    "features": [
                        {"index": f[0], "label": f[1], "value": f[2], "cutoff": f[3]} for f in feats
                    ],
                    "tokens": [],
                }
                if kind == "rule"
                else {"fires": 3, "window_seconds": 600}
            )
            alert_id = str(uuid.uuid4())
            verdict = SEED_VERDICTS.get(i)
            session.add(
                Alert(
                    id=alert_id,
                    turn_id=turn_id,
                    tenant=tenant,
                    conversation_id=conv,
                    pipeline=pipe,
                    detector=det,
                    kind=kind,
                    severity=sev,
                    score=1.5,
                    summary="s",
                    suppressed=supp,
                    created_at=_at(minute),
                    evidence=evidence,
                    verdict=verdict,
                )
            )
            alerts.append(
                {
                    "id": alert_id,
                    "tenant": tenant,
                    "pipeline": pipe,
                    "detector": det,
                    "severity": sev,
                    "kind": kind,
                    "at": _at(minute),
                    "conv": conv,
                    "suppressed": supp,
                    "features": feats,
                    "verdict": verdict,
                }
            )
        silence_ids = {}
        for tenant, det, only, start, end in SEED_SILENCES:
            silence = Silence(
                tenant=tenant,
                detector=det,
                pipeline=only,
                reason="seed",
                created_by="test",
                starts_at=_at(start),
                ends_at=_at(end),
                created_at=_at(start),
            )
            session.add(silence)
            session.flush()
            silence_ids[(tenant, det)] = silence.id
        for tenant, pipe, minute, tokens, silenced in SEED_QUIET:
            turns.append({"tenant": tenant, "pipeline": pipe, "at": _at(minute), "tokens": tokens})
            row = turn_row(tenant, "q", n_tokens=tokens, created_at=_at(minute), pipeline=pipe)
            session.add(row)
            turn_id = row.id
            session.flush()
            for d in DETECTORS:
                verdicts.append(
                    {
                        "tenant": tenant,
                        "pipeline": pipe,
                        "at": _at(minute),
                        "detector": d,
                        "fired": d == silenced,
                        "silenced": d == silenced,
                    }
                )
                session.add(
                    VerdictRow(
                        turn_id=turn_id,
                        detector=d,
                        kind="rule",
                        score=0.1,
                        fired=d == silenced,
                        severity="high",
                        evidence={},
                        silence_id=silence_ids[(tenant, d)] if d == silenced else None,
                    )
                )
        session.commit()
    silences = [
        {"tenant": t, "detector": d, "pipeline": p, "from": _at(a), "to": _at(b)}
        for t, d, p, a, b in SEED_SILENCES
    ]
    return {"alerts": alerts, "turns": turns, "verdicts": verdicts, "silences": silences}


SELECTIONS: list[dict[str, str | list[str]]] = [
    {"tenant": ALL, "pipeline": ALL, "detector": ALL},
    {"tenant": ["acme"], "pipeline": ALL, "detector": ALL},
    {"tenant": ["o'neil"], "pipeline": ALL, "detector": ["scam_email", "deception"]},
    {"tenant": ["acme", "o'neil"], "pipeline": ["gemma"], "detector": ALL},
    {"tenant": ALL, "pipeline": ["smol"], "detector": ["scam_email"]},
]


def _keep(row: dict[str, Any], sel: dict[str, str | list[str]], *, detector: bool = True) -> bool:
    if not T0 <= row["at"] <= T1:
        return False
    keys = ("tenant", "pipeline", "detector") if detector else ("tenant", "pipeline")
    return all(sel[k] == ALL or row[k] in sel[k] for k in keys)


def _bucket(at: dt.datetime) -> int:
    return int(at.timestamp()) // BUCKET * BUCKET


def _plain(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def _run(engine: Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.exec_driver_sql(sql)
        return [{k: _plain(v) for k, v in row._mapping.items()} for row in result]


def _panel_sql(doc: dict[str, Any], title: str) -> str:
    panel = next(p for p in doc["panels"] if p["title"] == title and p["type"] != "row")
    (target,) = panel["targets"]
    sql: str = target["rawSql"]
    return sql


@pytest.mark.integration
def test_sql_panels_count_what_was_seeded(
    seeded: tuple[Engine, dict[str, list[dict[str, Any]]]],
) -> None:
    engine, seed = seeded
    doc = build_all()["safety-overview.json"]

    def run(title: str, sel: dict[str, str | list[str]]) -> list[dict[str, Any]]:
        return _run(engine, expand_sql(_panel_sql(doc, title), doc, sel, T0, T1, "10m"))

    sql_targets = [(p, t) for p, t in _targets(doc) if "rawSql" in t]
    assert len(sql_targets) >= 15
    for sel in SELECTIONS:
        # Every SQL panel runs as Grafana would send it.
        for panel, target in sql_targets:
            try:
                _run(engine, expand_sql(target["rawSql"], doc, sel, T0, T1, "10m"))
            except Exception as exc:  # name the panel that failed
                raise AssertionError(f"{panel['title']} with {sel}: {exc}") from exc

        alerts = [a for a in seed["alerts"] if _keep(a, sel)]
        for column, title in (
            ("detector", "Alerts by detector"),
            ("severity", "Alerts by severity"),
            ("tenant", "Alerts by tenant"),
            ("pipeline", "Alerts by model"),
        ):
            rows = run(title, sel)
            got = Counter({(r["time"], r["metric"]): r["alerts"] for r in rows})
            want = Counter((_bucket(a["at"]), a[column]) for a in alerts)
            assert got == want, (title, sel)
            times = [r["time"] for r in rows]
            assert times == sorted(times), "time series must come ordered by time"

        assert run("Alerts", sel) == [{"alerts": len(alerts)}]
        convs = {(a["tenant"], a["conv"]) for a in alerts}
        assert run("Alerted conversations", sel) == [{"conversations": len(convs)}]
        turns = [t for t in seed["turns"] if _keep(t, sel, detector=False)]
        assert run("Turns", sel) == [{"turns": len(turns)}]
        folded = sum(a["suppressed"] for a in alerts)
        assert run("Fires folded by cooldown", sel) == [{"folded": folded}]

        table = {
            (r["tenant"], r["model"]): r for r in run("Turns and alerts by tenant and model", sel)
        }
        keys = {(t["tenant"], t["pipeline"]) for t in turns} | {
            (a["tenant"], a["pipeline"]) for a in alerts
        }
        assert set(table) == keys, sel
        for key, row in table.items():
            n_turns = sum(1 for t in turns if (t["tenant"], t["pipeline"]) == key)
            n_alerts = sum(1 for a in alerts if (a["tenant"], a["pipeline"]) == key)
            assert row["turns"] == n_turns and row["alerts"] == n_alerts, (key, sel)
            assert row["tokens"] == sum(
                t["tokens"] for t in turns if (t["tenant"], t["pipeline"]) == key
            )
            if n_turns:
                assert row["alerts_per_1k_turns"] == round(1000 * n_alerts / n_turns, 1)

        fires = {r["detector"]: r for r in run("Detector fires per 1,000 turns", sel)}
        verdicts = [v for v in seed["verdicts"] if _keep(v, sel)]
        assert set(fires) == {v["detector"] for v in verdicts}
        for det, row in fires.items():
            mine = [v for v in verdicts if v["detector"] == det]
            assert row["turns"] == len(mine) and row["fired"] == sum(v["fired"] for v in mine)

        latest = run("Latest alerts", sel)
        assert [r["alert_id"] for r in latest] == [
            a["id"] for a in sorted(alerts, key=lambda a: (-a["at"].timestamp(), a["id"]))
        ]

        top = {r["feature"]: r for r in run("Top features in alert evidence", sel)}
        cited: Counter[int] = Counter()
        by: dict[int, set[str]] = {}
        for a in alerts:
            for index, *_rest in a["features"]:
                cited[index] += 1
                by.setdefault(index, set()).add(a["detector"])
        assert {k: r["alerts"] for k, r in top.items()} == dict(cited), sel
        for index, row in top.items():
            assert row["detectors"] == ", ".join(sorted(by[index]))

        # Triage: the 30 days up to the end of the range, whatever its start.
        judged = [
            a
            for a in seed["alerts"]
            if a["verdict"] in ("true_positive", "false_positive")
            and T1 - TRIAGE_WINDOW < a["at"] <= T1
            and all(sel[k] == ALL or a[k] in sel[k] for k in ("tenant", "pipeline", "detector"))
        ]
        share = run("False-positive share by detector (triage, 30 days)", sel)
        want_share = {}
        for det in {a["detector"] for a in judged}:
            mine = [a for a in judged if a["detector"] == det]
            fp = sum(a["verdict"] == "false_positive" for a in mine)
            want_share[det] = (len(mine), fp, round(fp / len(mine), 3))
        got_share = {
            r["detector"]: (r["triaged"], r["false_positive"], r["false_positive_share"])
            for r in share
        }
        assert got_share == want_share, sel
        shares = [r["false_positive_share"] for r in share]
        assert shares == sorted(shares, reverse=True)

        silenced = run("Silenced fires by detector", sel)
        got_silenced = Counter({(r["time"], r["metric"]): r["fires"] for r in silenced})
        want_silenced = Counter(
            (_bucket(v["at"]), v["detector"]) for v in verdicts if v["silenced"]
        )
        assert got_silenced == want_silenced, sel
        active = [
            s
            for s in seed["silences"]
            if s["from"] <= T1 < s["to"]
            and (sel["tenant"] == ALL or s["tenant"] in sel["tenant"])
            and (sel["detector"] == ALL or s["detector"] in sel["detector"])
            and (
                sel["pipeline"] == ALL or s["pipeline"] is None or s["pipeline"] in sel["pipeline"]
            )
        ]
        assert run("Active silences", sel) == [{"silences": len(active)}], sel

    # The seed exercises every case: judged in and out of the window, silenced fires, silences
    # active, expired and pending at the end of the range.
    everything: dict[str, str | list[str]] = {"tenant": ALL, "pipeline": ALL, "detector": ALL}
    assert {
        r["detector"] for r in run("False-positive share by detector (triage, 30 days)", everything)
    } == {"scam_email", "deception", "prompt_injection"}
    assert run("Active silences", everything) == [{"silences": 2}]
    assert sum(r["fires"] for r in run("Silenced fires by detector", everything)) == 3

    # The tenant filter keeps the other tenant out.
    only_acme = run("Alerts by tenant", {"tenant": ["acme"], "pipeline": ALL, "detector": ALL})
    assert only_acme and {r["metric"] for r in only_acme} == {"acme"}
    quoted = run("Alerts by tenant", {"tenant": ["o'neil"], "pipeline": ALL, "detector": ALL})
    assert quoted and {r["metric"] for r in quoted} == {"o'neil"}


@pytest.mark.integration
def test_sql_variables_list_what_was_seeded(
    seeded: tuple[Engine, dict[str, list[dict[str, Any]]]],
) -> None:
    engine, seed = seeded
    doc = build_all()["safety-overview.json"]
    in_range = [a for a in seed["alerts"] if T0 <= a["at"] <= T1]
    want = {
        "tenant": sorted({*TENANTS, "zeta"}),  # keys, or alerts in the range
        "pipeline": sorted({a["pipeline"] for a in in_range}),
        "detector": sorted({a["detector"] for a in in_range}),
    }
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        sql = expand_sql(var["query"], doc, {}, T0, T1, "10m")
        rows = _run(engine, sql)
        assert [next(iter(r.values())) for r in rows] == want[var["name"]], var["name"]
        assert var["allValue"] == "'__all'" and var["multi"] and var["includeAll"]


@pytest.mark.integration
def test_sql_panels_run_on_an_empty_database(
    seeded: tuple[Engine, dict[str, list[dict[str, Any]]]],
) -> None:
    """No tenants yet: All must still give valid SQL (no ``IN ()``)."""
    engine, _seed_rows = seeded
    doc = build_all()["safety-overview.json"]
    far = T0 + dt.timedelta(days=400)
    for panel, target in _targets(doc):
        rows = _run(
            engine, expand_sql(target["rawSql"], doc, {}, far, far + dt.timedelta(hours=1), "1m")
        )
        assert all(v in (0, None) for r in rows for v in r.values()), panel["title"]


# ==== (b) the PromQL panels on a real Prometheus scraping the real sidecar ======================

PIPELINE = "smollm2-135m-instruct"
SCRAPE_S = 1.0


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


class _Receiver:
    """A webhook receiver on loopback that answers 200."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class _Prometheus:
    """``prometheus`` on 127.0.0.1, scraping one target every second, storage in ``root``,
    evaluating the rules of ``rule_files`` every second."""

    def __init__(self, root: Path, target: str, rule_files: tuple[Path, ...] = ()) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).is_file():
            pytest.fail("Prometheus is not installed (Debian: prometheus; scripts/system-deps.sh)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = root / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s"},
                    "rule_files": [str(f) for f in rule_files],
                    "scrape_configs": [
                        {
                            "job_name": "safety-monitor",
                            "scrape_interval": f"{SCRAPE_S:g}s",
                            "scrape_timeout": f"{SCRAPE_S:g}s",
                            "static_configs": [{"targets": [target]}],
                        }
                    ],
                }
            )
        )
        self.log = (root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10)

        def ready() -> bool:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                return self.http.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _wait("Prometheus to start", ready, 30)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = self.http.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", expr
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, metric: str) -> list[str]:
        body = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
        assert body["status"] == "success", body
        values: list[str] = body["data"]
        return values

    def stop(self) -> None:
        self.http.close()
        stop_process(self.proc, timeout=15)
        self.log.close()


@pytest.mark.slow
@pytest.mark.integration
def test_promql_panels_on_prometheus_scraping_the_sidecar(monitored: Any, tmp_path: Path) -> None:
    from monitor.service.app import create_app
    from monitor.service.settings import ServiceSettings, WebhookConfig

    receiver = _Receiver()
    settings = ServiceSettings(
        database_url=f"sqlite:///{tmp_path / 'monitor.db'}",
        kafka_bootstrap=None,
        batch_wait_ms=20,
        dispatch_interval_s=0.2,
        webhook_max_attempts=2,
        webhook_backoff_s=0.2,
        webhook_timeout_s=2,
        webhooks=[
            WebhookConfig(name="ok", url=receiver.url, secrets=[WEBHOOK_SECRET]),
            # Nothing listens there: every attempt fails, and each delivery is dead-lettered.
            WebhookConfig(
                name="down", url=f"http://127.0.0.1:{free_port()}/hook", secrets=[WEBHOOK_SECRET]
            ),
        ],
    )
    app = create_app(settings, [monitored])
    sidecar: ThreadedServer | None = None
    prom: _Prometheus | None = None
    try:
        sidecar = ThreadedServer(app).start(timeout=120)
        started = time.time()
        prom = _Prometheus(tmp_path, f"127.0.0.1:{sidecar.port}")
        engine: Engine = app.state.monitor.engine
        with Session(engine) as session:
            key = create_key(session, "acme", "ingest")
            quiet_key = create_key(session, "quiet", "ingest")
            # Tenant "quiet" has scam_email silenced: its scam turn is a silenced fire.
            silences.create(
                session,
                tenant="quiet",
                detector="scam_email",
                reason="dashboard test",
                created_by="test",
                duration=dt.timedelta(hours=1),
            )
            session.commit()
        headers = {"Authorization": f"Bearer {key}"}
        http = httpx.Client(base_url=sidecar.url, headers=headers, timeout=120)

        def send(
            conv: str, messages: list[dict[str, str]], model: str | None = None, as_: str = key
        ) -> int:
            body: dict[str, Any] = {"conversation_id": conv, "messages": messages}
            if model:
                body["model"] = model
            auth = {"Authorization": f"Bearer {as_}"}
            return http.post("/v1/turns", json=body, headers=auth).status_code

        # Warm-up: every series exists and has been scraped once before the measured traffic.
        assert send("w1", SCAM) == 200 and send("w2", PLAIN) == 200
        assert send("w3", PLAIN, model="no-such-model") == 404
        _wait(
            "the first scrape with turns",
            lambda: prom is not None and prom.value("sum(safety_monitor_turns_total)") == 2,
        )
        # The measured traffic.
        assert [send("t1", SCAM), send("t2", PLAIN), send("t3", PLAIN)] == [200] * 3
        assert send("t4", PLAIN, model="no-such-model") == 404
        assert send("q1", SCAM, as_=quiet_key) == 200  # silenced: stored, counted, no alert
        sent = 6

        def settled() -> bool:
            with Session(engine) as session:
                waiting = session.scalar(
                    select(func.count())
                    .select_from(WebhookDelivery)
                    .where(
                        WebhookDelivery.delivered_at.is_(None), WebhookDelivery.dead_at.is_(None)
                    )
                )
            return waiting == 0

        _wait("webhook deliveries to be delivered or dead-lettered", settled)
        with Session(engine) as session:
            n_alerts = session.scalar(select(func.count()).select_from(Alert)) or 0
            n_scam = (
                session.scalar(
                    select(func.count()).select_from(Alert).where(Alert.detector == "scam_email")
                )
                or 0
            )
            tokens = session.scalar(select(func.sum(Turn.n_tokens))) or 0
            outbox = session.scalar(select(func.count()).select_from(Outbox)) or 0
            assert session.scalar(select(func.count()).select_from(Turn)) == sent
        assert n_scam >= 2 and outbox == n_alerts  # Kafka is off: every alert waits there
        with Session(engine) as session:  # triage: one scam alert true, one false positive
            scam = session.scalars(
                select(Alert).where(Alert.detector == "scam_email").order_by(Alert.created_at)
            ).all()
            scam[0].verdict, scam[1].verdict = "true_positive", "false_positive"
            session.commit()

        p = prom

        def scraped() -> bool:
            return (
                p.value("sum(safety_monitor_turns_total)") == sent
                and p.value('sum(safety_monitor_webhook_deliveries{state="pending"})') == 0
                and p.value('sum(safety_monitor_alerts_published_total{channel="webhook"})')
                == n_alerts
                and p.value('sum(safety_monitor_triaged_alerts{detector="scam_email"})') == 2
            )

        _wait("Prometheus to scrape the final counts", scraped, 30)
        time.sleep(2 * SCRAPE_S)  # one more sample after the last change, for the rates
        now = time.time()
        window = math.ceil(now - started) + 5  # $__interval: the range the test covers
        interval = f"{window}s"
        rate_window = max(window + SCRAPE_S, 4 * SCRAPE_S)

        # The totals the traffic must have produced.
        assert p.value("sum(safety_monitor_turns_total)") == sent
        assert p.value("sum(safety_monitor_tokens_total)") == tokens
        assert p.value("sum(safety_monitor_batch_turns_sum)") == sent
        assert p.value("sum(safety_monitor_batch_tokens_sum)") == tokens
        assert p.value("sum(safety_monitor_alerts_total)") == n_alerts
        assert p.value('sum(safety_monitor_alerts_total{detector="scam_email"})') == n_scam
        assert (
            p.value('sum(safety_monitor_requests_rejected_total{reason="unknown_pipeline"})') == 2
        )
        assert p.value('sum(safety_monitor_webhook_failures_total{webhook="down"})') == 2 * n_alerts
        assert p.value('sum(safety_monitor_webhook_deliveries{webhook="down",state="dead"})') == (
            n_alerts
        )
        assert p.value('sum(safety_monitor_webhook_deliveries{webhook="ok"})') == 0
        assert p.value('sum(safety_monitor_silenced_fires_total{detector="scam_email"})') == 1
        assert p.value('sum(safety_monitor_active_silences{detector="scam_email"})') == 1

        doc = build_all()["service-health.json"]
        assert sorted(p.label_values("pipeline", "safety_monitor_turns_total")) == [PIPELINE]
        assert "scam_email" in p.label_values("detector", "safety_monitor_verdicts_total")
        for var in doc["templating"]["list"]:
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"])
            assert m and m.group(2) == var["name"], var["query"]
            assert p.label_values(m.group(2), m.group(1)), var["name"]

        selections: list[dict[str, str | list[str]]] = [
            {"pipeline": ALL, "detector": ALL},
            {"pipeline": [PIPELINE], "detector": ["scam_email", "deception"]},
        ]
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sel in selections:
            for panel in doc["panels"]:
                for target in panel.get("targets", []):
                    if "safety_monitor_worker_" in target["expr"]:
                        continue  # no worker here: tests/test_worker_http.py runs them
                    if "safety_monitor_guard_" in target["expr"]:
                        continue  # no guard mode here: tests/test_guard.py runs them
                    expr = expand_promql(target["expr"], doc, sel, interval, SCRAPE_S)
                    result = p.query(expr, at=now)
                    assert result, f"{panel['title']} ({target['refId']}) is empty: {expr}"
                    for r in result:
                        assert not math.isnan(float(r["value"][1])) or "histogram" in expr, expr
                    if sel is selections[0]:
                        results[(panel["title"], target["refId"])] = result

        def one(title: str, ref: str = "A", **labels: str) -> float:
            rows = [r for r in results[(title, ref)] if labels.items() <= r["metric"].items()]
            assert len(rows) == 1, (title, labels, results[(title, ref)])
            return float(rows[0]["value"][1])

        measured = sent - 2  # after the warm-up scrape
        turns_rate = one("Turns / s")
        assert 0.8 * measured <= turns_rate * rate_window <= 1.5 * measured, turns_rate
        assert one("Turns per second by model", pipeline=PIPELINE) == turns_rate
        assert one("Tokens / s") > 0
        assert one("Alerts per minute by detector", detector="scam_email") > 0
        assert one("Alerts per minute by severity", severity="high") > 0
        assert one("Detector fires per minute", detector="scam_email") > 0
        assert one("Requests refused per minute", reason="unknown_pipeline") > 0
        assert one("Outbox backlog") == n_alerts
        assert 0 < one("Oldest unpublished alert") <= now - started + 5
        assert one(
            "Webhook deliveries waiting and dead-lettered", webhook="down", state="dead"
        ) == (n_alerts)
        assert one("Webhook failures per minute", webhook="down") > 0
        assert one("Alerts published per minute", channel="webhook") > 0
        assert one("Batch turns waiting") == 0
        fp_share = "False-positive share by detector (triage, 30 days)"
        assert one(fp_share, detector="scam_email") == 0.5
        assert one("Silenced fires per minute", detector="scam_email") >= 0
        assert one("Active silences", detector="scam_email") == 1
        for title in ("Pipeline latency per micro-batch", "Turn request latency"):
            p50, p99 = one(title, "A", pipeline=PIPELINE), one(title, "B", pipeline=PIPELINE)
            assert 0 < p50 <= p99 <= 30, title
        assert one("Turns per micro-batch", "A", pipeline=PIPELINE) >= 1
        assert one("Turns per micro-batch", "B", pipeline=PIPELINE) >= 1
        assert one("Tokens per micro-batch", "A", pipeline=PIPELINE) > 1
        assert one("Resident memory") > 50e6
        assert one("CPU") > 0
        http.close()
    finally:
        if prom is not None:
            prom.stop()
        if sidecar is not None:
            sidecar.stop()
        receiver.close()


# Labels every scraped series has (the target's) or that a histogram's buckets add.
_TARGET_LABELS = {"job", "instance", "le"}
_SELECTOR = re.compile(r"(safety_monitor_\w+)(?:\{([^}]*)\})?")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _queried_metrics(doc: dict[str, Any]) -> set[str]:
    return {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for _panel, target in _targets(doc)
        for m, _selector in _SELECTOR.findall(target.get("expr", ""))
    }


def _exported(wrappers: list[Any], types: dict[str, str]) -> dict[str, set[str]]:
    """Metric name as exposed (counters with ``_total``) → its label names."""
    out: dict[str, set[str]] = {}
    for w in wrappers:
        for n in (w._name, f"{w._name}_total"):
            if n not in types:
                continue
            out[n] = set(w._labelnames)
    return out


def _unexported(docs: dict[str, dict[str, Any]], exported: dict[str, set[str]]) -> list[str]:
    """What a dashboard queries that the service does not export: a safety_monitor_* metric
    it does not register, or a label (in a selector or a ``by``/``without``) none of the
    expression's metrics has."""
    problems = []
    for name, doc in docs.items():
        for panel, target in _targets(doc):
            expr = target.get("expr", "")
            metrics = [
                (re.sub(r"_(bucket|sum|count)$", "", m), sel) for m, sel in _SELECTOR.findall(expr)
            ]
            where = f"{name} / {panel['title']} ({target['refId']})"
            labels = set(_TARGET_LABELS)
            for metric, selector in metrics:
                if metric not in exported:
                    problems.append(f"{where}: {metric} is not exported")
                    continue
                labels |= exported[metric]
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                    if label not in exported[metric]:
                        problems.append(f"{where}: {metric} has no label {label}")
            if not metrics:
                continue
            for group in _BY.findall(expr):
                for label in (g.strip() for g in group.split(",") if g.strip()):
                    if label not in labels:
                        problems.append(f"{where}: no metric of it has the label {label}")
    return problems


def test_the_metric_check_refuses_a_panel_on_a_metric_not_exported() -> None:
    """The check the next test applies to every panel, on panels it must refuse."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from monitor.service.metrics import Metrics

    m = Metrics()
    wrappers = [a for a in vars(m).values() if isinstance(a, MetricWrapperBase)]
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(m.registry).decode(), re.M))
    exported = _exported(wrappers, types)
    assert exported["safety_monitor_triage_precision"] == {"detector"}
    assert exported["safety_monitor_silenced_fires_total"] == {"pipeline", "detector"}

    def doc(expr: str) -> dict[str, dict[str, Any]]:
        target = {"expr": expr, "refId": "A"}
        return {"x.json": {"panels": [{"title": "P", "targets": [target]}]}}

    ok = '1 - max by (detector) (safety_monitor_triage_precision{detector=~"$detector"})'
    assert _unexported(doc(ok), exported) == []
    rate = 'sum by (le, pipeline) (rate(safety_monitor_pipeline_seconds_bucket{pipeline=~"a"}[1m]))'
    assert _unexported(doc(rate), exported) == []
    assert _unexported(doc("max(safety_monitor_false_positive_share)"), exported) == [
        "x.json / P (A): safety_monitor_false_positive_share is not exported"
    ]
    assert _unexported(doc('safety_monitor_triage_precision{tenant="acme"}'), exported) == [
        "x.json / P (A): safety_monitor_triage_precision has no label tenant"
    ]
    assert _unexported(doc("sum by (tenant) (safety_monitor_triaged_alerts)"), exported) == [
        "x.json / P (A): no metric of it has the label tenant"
    ]
    assert _unexported(doc("rate(process_cpu_seconds_total[1m])"), exported) == []


def test_the_active_silences_gauge_counts_silences_in_effect(tmp_path: Path) -> None:
    """``safety_monitor_active_silences{detector}``: silences started and not yet ended, every
    tenant, set with the triage gauges on each scrape (pending and expired ones left out)."""
    from monitor.service.metrics import Metrics

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    now = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    hour = dt.timedelta(hours=1)
    spans = {  # (tenant, detector): (starts, ends)
        ("acme", "scam_email"): (now - hour, now + hour),
        ("beta", "scam_email"): (now - 2 * hour, now + 2 * hour),
        ("acme", "deception"): (now - hour, now + hour),
        ("acme", "prompt_injection"): (now - 2 * hour, now - hour),  # expired
        ("beta", "deception"): (now + hour, now + 2 * hour),  # pending
    }
    with Session(engine) as session:
        for (tenant, det), (start, end) in spans.items():
            session.add(
                Silence(
                    tenant=tenant,
                    detector=det,
                    reason="r",
                    created_by="t",
                    starts_at=start,
                    ends_at=end,
                    created_at=start,
                )
            )
        session.commit()
        m = Metrics()
        m.refresh_triage(session, now)
        (gauge,) = m.active_silences.collect()
        samples = {s.labels["detector"]: s.value for s in gauge.samples}
        assert samples == {"scam_email": 2, "deception": 1}
        m.refresh_triage(session, now + 3 * hour)  # all over: no series left
        assert [s for g in m.active_silences.collect() for s in g.samples] == []
        m.refresh_triage(session, now)
        m.database_unreadable([])
        assert [s for g in m.active_silences.collect() for s in g.samples] == []
    engine.dispose()


def test_metric_names_follow_prometheus_conventions() -> None:
    """Every metric the service registers: counters end in _total, durations in _seconds, and
    no label can carry a tenant or conversation id; the dashboards' metrics all exist."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from monitor.service.guard_metrics import GuardMetrics
    from monitor.service.metrics import Metrics

    m = Metrics()
    guard = GuardMetrics(m.registry)  # registered on the same registry when guard mode is on
    wrappers = [
        a for a in (*vars(m).values(), *vars(guard).values()) if isinstance(a, MetricWrapperBase)
    ]
    labels = {name for w in wrappers for name in w._labelnames}
    assert labels <= {
        *("pipeline", "detector", "severity", "reason", "channel", "webhook", "state"),
        *("outcome", "topic", "partition"),  # the worker's: bounded by the traffic topic
        *("action", "shadow"),  # the guard's
    }
    for w in wrappers:  # a labelled metric is exposed once it has a child
        if w._labelnames:
            w.labels(*["x"] * len(w._labelnames))
    exposition = generate_latest(m.registry).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE))
    ours = {n: k for n, k in types.items() if not n.startswith("process_")}
    assert all(n.startswith("safety_monitor_") for n in ours), ours
    for name, kind in ours.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    assert any(n.startswith("process_resident_memory") for n in types) or not Path("/proc").is_dir()
    # Every safety_monitor_* name a dashboard queries is registered, with the labels it uses.
    exported = _exported(wrappers, ours)
    assert _unexported(build_all(), exported) == []
    assert {
        "safety_monitor_triage_precision",
        "safety_monitor_silenced_fires_total",
        "safety_monitor_active_silences",
        "safety_monitor_guard_exchanges_total",
        "safety_monitor_guard_actions_total",
        "safety_monitor_guard_unrecorded_total",
    } <= {m for doc in build_all().values() for m in _queried_metrics(doc)}
    for name in (
        "safety_monitor_outbox_oldest_age_seconds",
        "safety_monitor_batch_tokens",
        "safety_monitor_webhook_deliveries",
        "safety_monitor_pending_turns",
    ):
        assert name in ours
