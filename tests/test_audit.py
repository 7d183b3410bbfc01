"""The audit API, UI pages, export, backtest, redaction before storage and retention, on the
real model and catalog, over SQLite and a real PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from samples import PLAIN, SCAM
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from detectors.engine import catalog_dir
from monitor.cli import app as cli
from monitor.service import export, retention
from monitor.service.app import create_app
from monitor.service.db import Alert, Outbox, PendingTurn, Turn, TurnFeatures, VerdictRow
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings
from monitor.service.ui_filters import csrf_token

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PII = [
    {
        "role": "user",
        "content": "Please update my account: I am jane.doe@example.com, phone "
        "+1 (415) 555-0132, card 4111 1111 1111 1111. Order 1234567812345678 was wrong.",
    },
    {"role": "assistant", "content": "Thanks, I have updated the account."},
]


@dataclass
class Seeded:
    client: TestClient
    tenant: str
    other: str
    read: dict[str, str]
    other_read: dict[str, str]
    scam_conv: str
    plain_conv: str
    pii_conv: str
    scam_turn: str


def _key(client: TestClient, tenant: str, role: str) -> dict[str, str]:
    with Session(client.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
        k = create_key(session, tenant, role)
        session.commit()
    return {"Authorization": f"Bearer {k}"}


@pytest.fixture(scope="module")
def seeded(backend_url: str, monitored: Monitored) -> Iterator[Seeded]:
    settings = ServiceSettings(database_url=backend_url, batch_wait_ms=20, retention_interval_s=0)
    with TestClient(create_app(settings, [monitored]), base_url="https://testserver") as client:
        run = uuid.uuid4().hex[:8]
        tenant, other = f"audit-{run}", f"other-{run}"
        ingest, other_ingest = _key(client, tenant, "ingest"), _key(client, other, "ingest")
        convs = {name: f"{name}-{run}" for name in ("scam", "plain", "pii")}
        posted = {}
        for name, messages, meta in (
            ("scam", SCAM, {"app": "mail"}),
            ("plain", PLAIN, {"app": "chat"}),
            ("pii", PII, {"app": "support"}),
        ):
            r = client.post(
                "/v1/turns",
                headers=ingest,
                json={"conversation_id": convs[name], "messages": messages, "metadata": meta},
            )
            assert r.status_code == 200, r.text
            posted[name] = r.json()
        r = client.post(
            "/v1/turns",
            headers=other_ingest,
            json={"conversation_id": f"theirs-{run}", "messages": SCAM},
        )
        assert r.status_code == 200 and r.json()["alert_ids"]
        yield Seeded(
            client,
            tenant,
            other,
            _key(client, tenant, "read"),
            _key(client, other, "read"),
            convs["scam"],
            convs["plain"],
            convs["pii"],
            posted["scam"]["turn_id"],
        )


def test_search_alerts_by_detector_metadata_text_and_model(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read
    alerts = c.get(
        "/v1/alerts", headers=read, params={"detector": "scam_email", "counts": True}
    ).json()
    assert [a["conversation_id"] for a in alerts["alerts"]] == [seeded.scam_conv]
    assert alerts["alerts"][0]["links"]["ui"] == f"/ui/conversations/{seeded.scam_conv}"
    assert alerts["counts"]["detector"] == {"scam_email": 1}
    everything = c.get("/v1/alerts", headers=read, params={"counts": True}).json()
    assert sum(everything["counts"]["severity"].values()) == len(everything["alerts"])

    def convs(**params: Any) -> set[str]:
        r = c.get("/v1/alerts", headers=read, params=params)
        assert r.status_code == 200, r.text
        return {a["conversation_id"] for a in r.json()["alerts"]}

    assert convs(meta="app=mail") == {seeded.scam_conv}
    assert convs(meta="app=chat") == set()
    assert convs(q="LOTTERY") == {seeded.scam_conv}
    assert convs(q="library") == set()
    assert convs(model="another-model") == set()
    assert convs(severity="high", detector="scam_email") == {seeded.scam_conv}
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert convs(since=future) == set()
    # Offsets other than UTC name the same instant on every back-end.
    plus5 = dt.timezone(dt.timedelta(hours=5))
    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).astimezone(plus5)
    assert convs(since=hour_ago.isoformat(), detector="scam_email") == {seeded.scam_conv}
    in_an_hour = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).astimezone(plus5)
    assert convs(since=in_an_hour.isoformat()) == set()
    assert convs(q="user") == convs(q="content") == set(), "JSON keys are not text"
    bad = c.get("/v1/alerts", headers=read, params={"meta": "no-equals-sign"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "meta"]


def test_search_conversations_and_tenant_isolation(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read

    def found(**params: Any) -> list[str]:
        r = c.get("/v1/conversations", headers=read, params=params)
        assert r.status_code == 200, r.text
        return [x["conversation_id"] for x in r.json()["conversations"]]

    assert set(found()) == {seeded.scam_conv, seeded.plain_conv, seeded.pii_conv}
    assert found(q="library") == [seeded.plain_conv]
    assert found(detector="scam_email") == [seeded.scam_conv]
    assert found(meta="app=support") == [seeded.pii_conv]
    assert found()[0] == seeded.pii_conv  # newest first
    rows = c.get("/v1/conversations", headers=read, params={"q": "library"}).json()
    assert rows["conversations"][0]["turns"] == 1 and rows["conversations"][0]["alerts"] == 0
    # The other tenant sees none of it, by search, by id or by export.
    other = seeded.other_read
    theirs = c.get("/v1/conversations", headers=other).json()["conversations"]
    assert [x["conversation_id"] for x in theirs] == [f"theirs-{seeded.tenant[6:]}"]
    assert c.get(f"/v1/conversations/{seeded.scam_conv}", headers=other).status_code == 404
    exported = c.get("/v1/export/turns", headers=other).text
    assert seeded.scam_conv not in exported and seeded.tenant not in exported
    assert c.get("/v1/conversations", headers=_key(c, seeded.tenant, "ingest")).status_code == 403


def test_search_non_ascii_text_and_export_quotes_formulas(seeded: Seeded) -> None:
    c = seeded.client
    tenant = f"accents-{uuid.uuid4().hex[:6]}"
    conv = '=HYPERLINK("http://x.example")'
    r = c.post(
        "/v1/turns",
        headers=_key(c, tenant, "ingest"),
        json={
            "conversation_id": conv,
            "messages": [{"role": "user", "content": "Une CRÈME brûlée, s'il vous plaît."}],
        },
    )
    assert r.status_code == 200, r.text
    read = _key(c, tenant, "read")
    found = c.get("/v1/conversations", headers=read, params={"q": "crème BRÛLÉE"}).json()
    assert [x["conversation_id"] for x in found["conversations"]] == [conv]
    exported = c.get("/v1/export/turns", headers=read, params={"format": "csv"}).text
    (row,) = list(csv.DictReader(io.StringIO(exported)))
    assert row["conversation_id"] == "'" + conv, "a formula is never a bare cell"
    sae = c.app.state.monitor.monitored[row["pipeline"]].pipeline.sae  # type: ignore[attr-defined]
    assert row["sae_fingerprint"] == sae.identity, "which dictionary read the exported turn"


def test_conversation_tokens_are_shaded_and_alerts_explained(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read
    doc = c.get(f"/v1/conversations/{seeded.scam_conv}", headers=read).json()
    (turn,) = doc["turns"]
    # By default each turn is shaded by its most severe alert's detector.
    assert turn["shade"]["name"] in {f"detector:{a['detector']}" for a in turn["alerts"]}
    doc = c.get(
        f"/v1/conversations/{seeded.scam_conv}",
        headers=read,
        params={"shade": "detector:scam_email"},
    ).json()
    (turn,) = doc["turns"]
    shades = [t["shade"] for t in turn["tokens"]]
    assert all(0.0 <= s <= 1.0 for s in shades)
    assert max(shades) > 0.5, "the tokens that drove the rule are shaded strongly"
    assert min(shades) == 0.0, "inactive tokens stay white"
    (alert,) = [a for a in turn["alerts"] if a["detector"] == "scam_email"]
    assert alert["score"] >= 1.0 and alert["evidence"]["features"]
    texts = [t["text"] for t in alert["evidence"]["tokens"]]
    assert texts and all(isinstance(t, str) and t for t in texts)
    # The shading ranks tokens as the evidence does: its first token is the most shaded.
    positions = [t["position"] for t in alert["evidence"]["tokens"]]
    assert shades[positions[0]] == max(shades)
    feature = alert["evidence"]["features"][0]["index"]
    by_feature = c.get(
        f"/v1/conversations/{seeded.scam_conv}",
        headers=read,
        params={"shade": f"feature:{feature}"},
    ).json()["turns"][0]
    assert by_feature["shade"]["name"] == f"feature:{feature}"
    assert any(t["shade"] > 0 for t in by_feature["tokens"])
    plain = c.get(f"/v1/conversations/{seeded.plain_conv}", headers=read).json()["turns"][0]
    assert plain["shade"] is None and all(t["shade"] == 0 for t in plain["tokens"])
    plain = c.get(
        f"/v1/conversations/{seeded.plain_conv}",
        headers=read,
        params={"shade": "detector:scam_email"},
    ).json()["turns"][0]
    plain_shades = [t["shade"] for t in plain["tokens"]]
    assert sum(plain_shades) / len(plain_shades) < sum(shades) / len(shades) / 2
    for bad in ("feature:99999999", "detector:nope", "colour:red"):
        r = c.get(f"/v1/conversations/{seeded.scam_conv}", headers=read, params={"shade": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "shade"]


def test_feature_card(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read
    rule = yaml.safe_load((catalog_dir() / "scam_email.yaml").read_text())
    index = rule["features"][0]["index"]
    card = c.get(f"/v1/features/{index}", headers=read).json()
    assert card["label"] == rule["features"][0]["label"]
    assert card["density"] > 0 and card["max_activation"] > 0 and card["contexts"]
    assert any(d["detector"] == "scam_email" for d in card["detectors"])
    recent = [r["conversation_id"] for r in card["recent"]]
    assert seeded.scam_conv in recent and seeded.plain_conv not in recent
    assert c.get("/v1/features/99999999", headers=read).status_code == 404
    assert (
        c.get(f"/v1/features/{index}", headers=seeded.other_read).json()["recent"] != card["recent"]
    )


def test_export_streams_jsonl_and_csv(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    c, read = seeded.client, seeded.read
    monkeypatch.setattr(export, "EXPORT_PAGE", 1)  # every row its own page: keyset paging
    listed = c.get("/v1/alerts", headers=read, params={"limit": 500}).json()["alerts"]
    r = c.get("/v1/export/alerts", headers=read)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in r.headers["content-disposition"]
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert sorted(x["alert_id"] for x in rows) == sorted(a["alert_id"] for a in listed)
    assert [x["created_at"] for x in rows] == sorted(x["created_at"] for x in rows)
    r = c.get("/v1/export/turns", headers=read, params={"format": "csv", "meta": "app=mail"})
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [t["conversation_id"] for t in table] == [seeded.scam_conv]
    assert json.loads(table[0]["messages"]) == SCAM
    assert c.get("/v1/export/everything", headers=read).status_code == 422
    assert c.get("/v1/export/turns", headers=read, params={"format": "xml"}).status_code == 422


def test_redaction_before_storage(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read
    doc = c.get(f"/v1/conversations/{seeded.pii_conv}", headers=read).json()
    (turn,) = doc["turns"]
    stored = turn["messages"][0]["content"]
    assert "[EMAIL]" in stored and "[PHONE]" in stored and "[CARD]" in stored
    assert "jane.doe" not in stored and "4111" not in stored and "555-0132" not in stored
    assert "1234567812345678" in stored, "an order number failing the Luhn check stays"
    tokens = "".join(t["token"] for t in turn["tokens"])
    assert "jane" not in tokens and "4111" not in tokens and "[EMAIL]" in tokens
    exported = c.get("/v1/export/turns", headers=read).text
    assert "jane.doe@example.com" not in exported


def test_backtest_api_against_stored_features(seeded: Seeded) -> None:
    c, read = seeded.client, seeded.read
    r = c.post("/v1/backtest", headers=read, json={"detector": "scam_email"})
    assert r.status_code == 200, r.text
    same = r.json()
    assert same["turns"] == 3 and same["from_storage"] == 3 and same["reencoded"] == 0
    assert same["new"] == same["current"] == 1, "stored features reproduce the live verdicts"
    assert same["samples"][0]["conversation_id"] == seeded.scam_conv
    assert sum(d["turns"] for d in same["per_day"]) == 3
    # An edited rule: the same features with every cut-off at a hundredth fires on everything.
    rule = yaml.safe_load((catalog_dir() / "scam_email.yaml").read_text())
    loose = _scaled(rule, 0.01)
    r = c.post("/v1/backtest", headers=read, json={"rule": yaml.safe_dump(loose)})
    assert r.status_code == 200, r.text
    edited = r.json()
    assert edited["compared_with_current"] and edited["new"] == 3 and edited["current"] == 1
    assert edited["newly_firing"] == 2 and edited["no_longer_firing"] == 0
    # A dense probe reads the residual stream: storage lacks it, so the text is re-encoded.
    dense = c.post("/v1/backtest", headers=read, json={"detector": "scam_email_dense_probe"}).json()
    assert dense["reencoded"] == 3 and dense["from_storage"] == 0
    broken = {**rule, "aggregation": {"method": "count_above"}}
    r = c.post("/v1/backtest", headers=read, json={"rule": yaml.safe_dump(broken)})
    assert r.status_code == 422 and "aggregation" in r.json()["detail"][0]["loc"]
    probe = yaml.safe_load((catalog_dir() / "scam_email_sae_probe.yaml").read_text())
    probe["probe"]["weights"] = "/etc/passwd"
    r = c.post("/v1/backtest", headers=read, json={"rule": yaml.safe_dump(probe)})
    assert r.status_code == 422 and "kind" in r.json()["detail"][0]["loc"]
    assert "passwd" not in r.text
    both = c.post("/v1/backtest", headers=read, json={"rule": "x", "detector": "scam_email"})
    assert both.status_code == 422
    assert c.post("/v1/backtest", headers=read, json={"detector": "nope"}).status_code == 422


def _scaled(rule: dict[str, Any], factor: float) -> dict[str, Any]:
    """The rule with every activation cut-off multiplied by ``factor``, and without its
    negative-weight features (which would make a lower cut-off count more against it)."""
    out = json.loads(json.dumps(rule))
    out["features"] = [f for f in out["features"] if f.get("weight", 1.0) > 0]
    for f in [out, *out["features"]]:
        t = f.get("threshold")
        if t and "absolute" in t:
            t["absolute"] *= factor
        elif t:
            t["relative"] *= factor
    return out


def test_ui_login_cookie_pages_and_isolation(seeded: Seeded) -> None:
    c = seeded.client
    c.cookies.clear()
    r = c.get("/ui/alerts", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    r = c.post("/ui/login", data={"key": "smk_wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "not valid" in r.text
    ingest = _key(c, seeded.tenant, "ingest")["Authorization"].removeprefix("Bearer ")
    assert c.post("/ui/login", data={"key": ingest}).status_code == 401
    key = seeded.read["Authorization"].removeprefix("Bearer ")
    r = c.post("/ui/login", data={"key": key, "next": "//evil.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/alerts"
    cookie = r.headers["set-cookie"].lower()
    for attribute in ("httponly", "secure", "samesite=strict", "path=/ui"):
        assert attribute in cookie
    page = c.get("/ui/alerts").text
    assert seeded.scam_conv in page and 'data-detector="scam_email"' in page
    assert seeded.scam_conv in c.get("/ui/alerts", params={"detector": "scam_email"}).text
    assert "No alerts match" in c.get("/ui/alerts", params={"detector": "none-such"}).text
    assert "is not a date" in c.get("/ui/alerts", params={"since": "yesterday"}).text
    conv = c.get(f"/ui/conversations/{seeded.scam_conv}?shade=detector:scam_email").text
    shaded = re.findall(r'style="background: rgba\(234, 88, 12, ([0-9.]+)\)"', conv)
    assert shaded and 0.45 < max(float(x) for x in shaded) <= 0.9  # 0.9 × the shade
    assert "scam_email</strong> fired" in conv and "Tokens that drove it" in conv
    index = yaml.safe_load((catalog_dir() / "scam_email.yaml").read_text())["features"][0]
    feature = c.get(f"/ui/features/{index['index']}").text
    assert html.unescape(feature).count(index["label"]) and "Top-activating contexts" in feature
    assert seeded.plain_conv in c.get("/ui/conversations", params={"q": "library"}).text
    # Another tenant's key sees nothing of this tenant.
    c.cookies.clear()
    other = seeded.other_read["Authorization"].removeprefix("Bearer ")
    c.post("/ui/login", data={"key": other})
    assert seeded.scam_conv not in c.get("/ui/alerts").text
    assert c.get(f"/ui/conversations/{seeded.scam_conv}").status_code == 404
    assert c.post("/ui/logout").status_code == 403, "logging out takes the CSRF token too"
    c.post("/ui/logout", data={"csrf": csrf_token(other)})
    assert c.get("/ui/alerts", follow_redirects=False).status_code == 303


def test_retention_prunes_turns_and_keeps_alert_metadata(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = seeded.client
    state = c.app.state.monitor  # type: ignore[attr-defined]
    sessions = sessionmaker(state.engine)
    tenant = f"prune-{uuid.uuid4().hex[:8]}"
    ingest = _key(c, tenant, "ingest")
    ids = []
    for i, messages in enumerate((SCAM, PLAIN, PLAIN)):
        r = c.post(
            "/v1/turns", headers=ingest, json={"conversation_id": f"p{i}", "messages": messages}
        )
        ids.append(r.json()["turn_id"])
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    with sessions() as session:
        session.execute(update(Turn).where(Turn.id.in_(ids[:2])).values(created_at=old))
        # A batch turn that never got evaluated (raw text), left by the drainer after 5 tries.
        session.add(
            PendingTurn(
                id=str(uuid.uuid4()),
                tenant=tenant,
                body={"raw": "x"},
                created_at=old,
                available_at=old,
                attempts=5,
            )
        )
        session.commit()
    monkeypatch.setattr(retention, "PRUNE_BATCH", 1)
    dry = retention.prune(sessions, 30, {}, dry_run=True)
    assert dry.turns.get(tenant) == 2, "a dry run counts every expired turn"
    kept_for_others = retention.prune(sessions, None, {tenant: 60})
    assert tenant not in kept_for_others.turns, "a 60-day tenant override keeps 40-day turns"
    report = retention.prune(sessions, None, {tenant: 30})
    assert report.turns == {tenant: 2} and report.alerts_kept >= 1 and report.pending == 1
    with sessions() as session:
        left = session.scalars(select(Turn.id).where(Turn.tenant == tenant)).all()
        assert left == [ids[2]]
        for gone in ids[:2]:
            assert session.get(TurnFeatures, gone) is None
            assert not session.scalars(select(VerdictRow).where(VerdictRow.turn_id == gone)).all()
        alerts = session.scalars(select(Alert).where(Alert.tenant == tenant)).all()
        assert alerts and all(a.turn_id is None for a in alerts)
        assert all(a.detector and a.severity and a.conversation_id == "p0" for a in alerts)
        assert all(a.evidence["pruned"] for a in alerts)
        assert all("token_id" not in t for a in alerts for t in a.evidence["tokens"])
        outbox = session.scalars(
            select(Outbox).where(Outbox.alert_id.in_([a.id for a in alerts]))
        ).all()
        assert outbox and all(o.payload["evidence"]["pruned"] for o in outbox)
        assert all(o.payload["metadata"] == {} for o in outbox)
    assert retention.prune(sessions, None, {tenant: 30}).total == 0


def test_cli_backtest_prune_and_export(
    seeded: Seeded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = seeded.client.app.state.monitor  # type: ignore[attr-defined]
    url = state.engine.url.render_as_string(hide_password=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", url)
    runner = CliRunner()
    rule = yaml.safe_load((catalog_dir() / "scam_email.yaml").read_text())
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(_scaled(rule, 0.01)))
    r = runner.invoke(
        cli, ["detectors", "backtest", "--rule", str(path), "--tenant", seeded.tenant, "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["turns"] == 3 and report["new"] == 3 and report["current"] == 1
    r = runner.invoke(
        cli, ["detectors", "backtest", "--rule", "scam_email", "--since", "not-a-date"]
    )
    assert r.exit_code == 2 and "--since" in r.output
    r = runner.invoke(cli, ["detectors", "backtest", "--rule", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "missing.yaml" in r.output
    out = tmp_path / "alerts.csv"
    r = runner.invoke(
        cli,
        ["db", "export", "alerts", "--tenant", seeded.tenant, "--format", "csv", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert {x["conversation_id"] for x in rows} >= {seeded.scam_conv}
    assert not (tmp_path / "alerts.csv.part").exists()
    r = runner.invoke(cli, ["db", "prune", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dry_run"] is True


def test_the_service_prunes_periodically(tmp_path: Path, monitored: Monitored) -> None:
    settings = ServiceSettings(
        database_url=f"sqlite:///{tmp_path / 'm.db'}",
        retention_days=30,
        tenant_retention_days={"short": 1},
        retention_interval_s=0.2,
    )
    with TestClient(create_app(settings, [monitored])) as c:
        ids = {}
        for tenant in ("short", "long"):
            r = c.post(
                "/v1/turns",
                headers=_key(c, tenant, "ingest"),
                json={"conversation_id": "c", "messages": PLAIN},
            )
            ids[tenant] = r.json()["turn_id"]
        sessions = sessionmaker(c.app.state.monitor.engine)  # type: ignore[attr-defined]
        two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        with sessions() as session:
            session.execute(update(Turn).values(created_at=two_days_ago))
            session.commit()
        deadline = time.monotonic() + 30
        while True:
            with sessions() as session:
                left = set(session.scalars(select(Turn.tenant)).all())
            if left == {"long"}:
                break
            assert time.monotonic() < deadline, f"not pruned: {left}"
            time.sleep(0.2)
        assert "safety_monitor_pruned_turns_total 1.0" in c.get("/metrics").text


def test_ui_exports_the_current_filter_and_links_alerts_to_grafana(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = seeded.client
    c.cookies.clear()
    c.post("/ui/login", data={"key": seeded.read["Authorization"].removeprefix("Bearer ")})
    page = c.get("/ui/alerts", params={"detector": "scam_email"}).text
    link = html.unescape(re.search(r'id="export-csv" href="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    assert link == "/ui/export/alerts?detector=scam_email&format=csv"
    r = c.get(link)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="alerts.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and {row["detector"] for row in rows} == {"scam_email"}
    assert {row["conversation_id"] for row in rows} == {seeded.scam_conv}, "this tenant's only"
    turns = c.get("/ui/export/turns", params={"q": "library", "format": "jsonl"})
    docs = [json.loads(line) for line in turns.text.splitlines()]
    assert [d["conversation_id"] for d in docs] == [seeded.plain_conv]
    assert c.get("/ui/export/secrets").status_code == 404
    assert "grafana-link" not in page, "no link without grafana_url"
    state = c.app.state.monitor  # type: ignore[attr-defined]
    monkeypatch.setattr(state.settings, "grafana_url", "https://grafana.example")
    page = c.get("/ui/alerts", params={"detector": "scam_email"}).text
    href = html.unescape(re.search(r'class="grafana-link" href="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    assert href.startswith("https://grafana.example/d/sm-safety-overview?var-detector=scam_email")
    assert f"var-tenant={seeded.tenant}" in href and "&from=" in href and "&to=" in href
    c.cookies.clear()
    assert c.get("/ui/export/alerts", follow_redirects=False).status_code == 303
