"""Alert triage over SQLite and a real PostgreSQL: status, verdict and assignee changes with
optimistic concurrency and a history of each, append-only notes, bulk changes that apply to
all or none, the triage role, tenant isolation, and the triage gauges on /metrics.

Alerts are seeded straight into the database (no model run); the app holds the real default
pipeline, loaded once per session."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samples import SCAM, alert_row, turn_row
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from monitor.service import triage
from monitor.service.app import create_app
from monitor.service.db import AlertHistory, AlertNote
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(backend_url: str, monitored: Monitored) -> Iterator[TestClient]:
    settings = ServiceSettings(database_url=backend_url, batch_wait_ms=20, retention_interval_s=0)
    with TestClient(create_app(settings, [monitored])) as c:
        yield c


def _engine(c: TestClient) -> Any:
    return c.app.state.monitor.engine  # type: ignore[attr-defined]


def key(c: TestClient, tenant: str, role: str, name: str | None = None) -> dict[str, str]:
    with Session(_engine(c)) as session:
        k = create_key(session, tenant, role, name)
        session.commit()
    return {"Authorization": f"Bearer {k}"}


def seed(c: TestClient, tenant: str, n: int = 1, detector: str = "scam_email") -> list[str]:
    """``n`` alerts of ``detector`` for ``tenant``, each on a turn of its own."""
    ids = []
    with Session(_engine(c)) as session:
        for i in range(n):
            turn = turn_row(tenant, f"conv-{uuid.uuid4().hex[:6]}-{i}", messages=SCAM)
            session.add(turn)
            session.flush()
            alert = alert_row(turn, detector=detector, summary="")
            session.add(alert)
            alert_id = alert.id
            ids.append(alert_id)
        session.commit()
    return ids


@dataclass
class Tenant:
    name: str
    read: dict[str, str]
    triage: dict[str, str]
    admin: dict[str, str]


@pytest.fixture
def tenant(client: TestClient) -> Tenant:
    name = f"tri-{uuid.uuid4().hex[:8]}"
    return Tenant(
        name,
        key(client, name, "read"),
        key(client, name, "triage", "alice"),
        key(client, name, "admin"),
    )


def history(c: TestClient, alert_id: str) -> list[tuple[str, str | None, str | None, int]]:
    with Session(_engine(c)) as session:
        rows = session.scalars(
            select(AlertHistory).where(AlertHistory.alert_id == alert_id).order_by(AlertHistory.id)
        ).all()
        return [(h.field, h.old, h.new, h.version) for h in rows]


def test_lifecycle_history_and_list_filters(client: TestClient, tenant: Tenant) -> None:
    c = client
    (alert_id,) = seed(c, tenant.name)
    other = seed(c, tenant.name)[0]
    got = c.get(f"/v1/alerts/{alert_id}", headers=tenant.read).json()
    assert (got["status"], got["verdict"], got["assignee"], got["version"]) == (
        "open",
        None,
        None,
        1,
    )
    assert got["notes"] == [] and got["history"] == [] and got["updated_at"] is None
    r = c.patch(
        f"/v1/alerts/{alert_id}",
        headers=tenant.triage,
        json={"version": 1, "status": "acknowledged", "assignee": "alice"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2 and r.json()["status"] == "acknowledged"
    r = c.patch(
        f"/v1/alerts/{alert_id}",
        headers=tenant.admin,
        json={"version": 2, "status": "resolved", "verdict": "false_positive"},
    )
    assert r.status_code == 200, r.text
    # a change that alters nothing makes no version and no history
    same = c.patch(
        f"/v1/alerts/{alert_id}",
        headers=tenant.triage,
        json={"version": 3, "verdict": "false_positive"},
    )
    assert same.status_code == 200 and same.json()["version"] == 3
    # null clears the verdict or the assignee
    r = c.patch(
        f"/v1/alerts/{alert_id}",
        headers=tenant.triage,
        json={"version": 3, "assignee": None, "verdict": "true_positive"},
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["status"], doc["verdict"], doc["assignee"], doc["version"]) == (
        "resolved",
        "true_positive",
        None,
        4,
    )
    assert doc["updated_at"] is not None and doc["links"]["ui"].startswith("/ui/conversations/")
    changes = [(h["field"], h["from"], h["to"], h["version"]) for h in doc["history"]]
    assert changes == [
        ("status", "open", "acknowledged", 2),
        ("assignee", None, "alice", 2),
        ("status", "acknowledged", "resolved", 3),
        ("verdict", None, "false_positive", 3),
        ("verdict", "false_positive", "true_positive", 4),
        ("assignee", "alice", None, 4),
    ]
    authors = {h["author"] for h in doc["history"]}
    assert "alice" in authors and any(a.startswith("smk_") for a in authors), authors
    assert history(c, alert_id) == changes

    def listed(**params: Any) -> set[str]:
        r = c.get("/v1/alerts", headers=tenant.read, params=params)
        assert r.status_code == 200, r.text
        return {a["alert_id"] for a in r.json()["alerts"]}

    assert listed(status="resolved") == {alert_id}
    assert listed(status="open") == {other}
    assert listed(verdict="true_positive") == {alert_id}
    assert listed(verdict="none") == {other}
    assert listed(assignee="none") == {alert_id, other}
    page = c.get("/v1/alerts", headers=tenant.read, params={"counts": True}).json()
    assert page["counts"]["status"] == {"resolved": 1, "open": 1}
    assert {a["status"] for a in page["alerts"]} == {"resolved", "open"}
    assert all("version" in a and "verdict" in a and "assignee" in a for a in page["alerts"])
    bad = c.get("/v1/alerts", headers=tenant.read, params={"status": "closed"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "status"]
    exported = c.get(
        "/v1/export/alerts", headers=tenant.read, params={"format": "csv", "status": "resolved"}
    ).text
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert [(x["alert_id"], x["status"], x["verdict"]) for x in rows] == [
        (alert_id, "resolved", "true_positive")
    ]


def test_a_stale_version_gets_409_never_an_overwrite(client: TestClient, tenant: Tenant) -> None:
    c = client
    first, second = seed(c, tenant.name, 2)
    ok = c.patch(
        f"/v1/alerts/{first}", headers=tenant.triage, json={"version": 1, "verdict": "unsure"}
    )
    assert ok.status_code == 200
    stale = c.patch(
        f"/v1/alerts/{first}",
        headers=tenant.triage,
        json={"version": 1, "verdict": "true_positive"},
    )
    assert stale.status_code == 409 and "version 2" in stale.json()["detail"], stale.text
    assert c.get(f"/v1/alerts/{first}", headers=tenant.read).json()["verdict"] == "unsure"

    # Concurrent: four auditors change the same alert from the version they all read.
    def change(verdict: str) -> int:
        body = {"version": 1, "status": "acknowledged", "verdict": verdict}
        return c.patch(f"/v1/alerts/{second}", headers=tenant.triage, json=body).status_code

    verdicts = ["true_positive", "false_positive", "unsure", "true_positive"]
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(change, verdicts))
    assert codes == [200, 409, 409, 409], codes
    doc = c.get(f"/v1/alerts/{second}", headers=tenant.read).json()
    assert doc["version"] == 2
    assert [(h["field"], h["version"]) for h in doc["history"]] == [("status", 2), ("verdict", 2)]


def test_bad_input_is_refused_naming_the_field(client: TestClient, tenant: Tenant) -> None:
    c = client
    (alert_id,) = seed(c, tenant.name)
    url = f"/v1/alerts/{alert_id}"

    def refused(path: str, body: dict[str, Any], method: str = "PATCH") -> list[Any]:
        r = c.request(method, path, headers=tenant.triage, json=body)
        assert r.status_code == 422, r.text
        return [d["loc"] for d in r.json()["detail"]]

    assert refused(url, {"version": 1, "status": "closed"}) == [["body", "status"]]
    assert refused(url, {"version": 1, "verdict": "maybe"}) == [["body", "verdict"]]
    assert refused(url, {"status": "resolved"}) == [["body", "version"]]
    assert refused(url, {"version": 1, "status": None}) == [["body", "status"]]
    assert refused(url, {"version": 1}) == [["body"]]
    assert refused(url, {"version": 1, "assignee": "x" * 65}) == [["body", "assignee"]]
    assert refused(url, {"version": 1, "status": "open", "priority": 1}) == [["body", "priority"]]
    notes = f"{url}/notes"
    assert refused(notes, {"text": "x" * 4001}, "POST") == [["body", "text"]]
    assert refused(notes, {"text": "   "}, "POST") == [["body", "text"]]
    assert refused(notes, {"text": "a\x00b"}, "POST") == [["body", "text"]]
    bulk = "/v1/alerts/triage"
    assert refused(bulk, {"ids": [alert_id], "change": {"status": "gone"}}, "POST") == [
        ["body", "change", "status"]
    ]
    assert refused(bulk, {"change": {"status": "resolved"}}, "POST") == [["body"]]
    assert refused(bulk, {"filter": {}, "change": {"status": "resolved"}}, "POST") == [
        ["body", "filter"]
    ]
    assert c.get(url, headers=tenant.read).json()["version"] == 1, "nothing was applied"
    ok = c.post(notes, headers=tenant.triage, json={"text": "x" * 4000})
    assert ok.status_code == 201, ok.text


def test_notes_are_appended_with_author_and_redacted(client: TestClient, tenant: Tenant) -> None:
    c = client
    (alert_id,) = seed(c, tenant.name)
    for note in ("Real scam: the sender is jane.doe@example.com", "Escalated to the mail team."):
        r = c.post(f"/v1/alerts/{alert_id}/notes", headers=tenant.triage, json={"text": note})
        assert r.status_code == 201, r.text
        assert r.json()["author"] == "alice"
    doc = c.get(f"/v1/alerts/{alert_id}", headers=tenant.read).json()
    assert [n["text"] for n in doc["notes"]] == [
        "Real scam: the sender is [EMAIL]",
        "Escalated to the mail team.",
    ]
    assert doc["version"] == 1 and doc["history"] == [], "a note is no triage change"
    assert (
        c.post(
            "/v1/alerts/no-such-alert/notes", headers=tenant.triage, json={"text": "hi"}
        ).status_code
        == 404
    )


def test_bulk_applies_to_all_or_none(
    client: TestClient, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = client
    ids = seed(c, tenant.name, 3)
    seed(c, tenant.name, 1, detector="deception")
    foreign = seed(c, f"x-{tenant.name}", 1)[0]
    body = {"ids": [*ids, foreign], "change": {"status": "resolved"}, "note": "batch"}
    r = c.post("/v1/alerts/triage", headers=tenant.triage, json=body)
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "ids", 3]], "another tenant's"
    with Session(_engine(c)) as session:
        assert session.scalar(select(func.count()).where(AlertHistory.alert_id.in_(ids))) == 0
        assert session.scalar(select(func.count()).where(AlertNote.alert_id.in_(ids))) == 0
    # a bulk call names no versions: an alert changed just before is changed too
    r = c.patch(
        f"/v1/alerts/{ids[0]}", headers=tenant.triage, json={"version": 1, "verdict": "unsure"}
    )
    assert r.status_code == 200
    # ... unless it names the versions it read: then the changed one stops the whole call
    stale = {"ids": ids, "versions": [1, 1, 1], "change": {"status": "resolved"}, "note": "x"}
    r = c.post("/v1/alerts/triage", headers=tenant.triage, json=stale)
    assert r.status_code == 409 and "version 2" in r.json()["detail"], r.text
    assert [len(history(c, i)) for i in ids] == [1, 0, 0]
    r = c.post("/v1/alerts/triage", headers=tenant.triage, json={**stale, "versions": [2, 1]})
    assert r.status_code == 422 and "one per id" in r.text
    r = c.post("/v1/alerts/triage", headers=tenant.triage, json={**stale, "versions": [2, 1, 1]})
    assert r.status_code == 200 and r.json()["changed"] == 3, r.text
    r = c.post(
        "/v1/alerts/triage",
        headers=tenant.triage,
        json={"ids": ids, "change": {"status": "acknowledged", "assignee": "bob"}, "note": "mine"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["matched"] == 3 and r.json()["changed"] == 3
    for alert_id in ids:
        doc = c.get(f"/v1/alerts/{alert_id}", headers=tenant.read).json()
        assert (doc["status"], doc["assignee"]) == ("acknowledged", "bob")
        assert [n["text"] for n in doc["notes"]] == ["x", "mine"]
    # a filter, as GET /v1/alerts takes it
    r = c.post(
        "/v1/alerts/triage",
        headers=tenant.triage,
        json={
            "filter": {"detector": "scam_email", "assignee": "bob"},
            "change": {"status": "resolved", "verdict": "false_positive"},
        },
    )
    assert r.status_code == 200 and r.json()["matched"] == 3, r.text
    resolved = c.get("/v1/alerts", headers=tenant.read, params={"status": "resolved"}).json()
    assert {a["alert_id"] for a in resolved["alerts"]} == set(ids)
    # bounded: more alerts than a call may touch is refused whole
    monkeypatch.setattr(triage, "MAX_BULK", 2)
    r = c.post(
        "/v1/alerts/triage",
        headers=tenant.triage,
        json={"filter": {"status": "resolved"}, "change": {"status": "open"}},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "filter"], r.text
    assert c.get("/v1/alerts", headers=tenant.read, params={"status": "open"}).json()["alerts"]
    assert (
        len(
            c.get("/v1/alerts", headers=tenant.read, params={"status": "resolved"}).json()["alerts"]
        )
        == 3
    )


def test_roles_and_tenants_on_every_triage_route(client: TestClient, tenant: Tenant) -> None:
    c = client
    (alert_id,) = seed(c, tenant.name)
    ingest = key(c, tenant.name, "ingest")
    outsider = key(c, f"y-{tenant.name}", "triage")
    patch = {"version": 1, "status": "acknowledged"}
    note = {"text": "n"}
    bulk = {"ids": [alert_id], "change": {"status": "resolved"}}
    writes = [
        ("PATCH", f"/v1/alerts/{alert_id}", patch),
        ("POST", f"/v1/alerts/{alert_id}/notes", note),
        ("POST", "/v1/alerts/triage", bulk),
    ]
    for method, path, body in writes:
        r = c.request(method, path, headers=tenant.read, json=body)
        assert r.status_code == 403 and "needs triage" in r.json()["detail"], (path, r.text)
        assert "(read)" in r.json()["detail"]
        assert c.request(method, path, headers=ingest, json=body).status_code == 403
        assert c.request(method, path, json=body).status_code == 401
        r = c.request(method, path, headers=outsider, json=body)
        assert r.status_code in (404, 422), (path, r.text)  # not theirs: not found
    assert c.get(f"/v1/alerts/{alert_id}", headers=ingest).status_code == 403
    assert c.get(f"/v1/alerts/{alert_id}", headers=outsider).status_code == 404
    assert c.get("/v1/alerts", headers=outsider).json()["alerts"] == []
    doc = c.get(f"/v1/alerts/{alert_id}", headers=tenant.read).json()
    assert doc["version"] == 1 and doc["notes"] == [], "nothing applied by the refused calls"
    # a triage key reads as a read key does (the API; the UI logs it in)
    assert c.get("/v1/alerts", headers=tenant.triage).status_code == 200


def test_precision_from_triage_is_a_gauge(client: TestClient, tenant: Tenant) -> None:
    c = client
    detector = f"det_{uuid.uuid4().hex[:6]}"
    ids = seed(c, tenant.name, 4, detector=detector)
    for alert_id, verdict in zip(
        ids, ["true_positive", "true_positive", "true_positive", "false_positive"], strict=True
    ):
        r = c.patch(
            f"/v1/alerts/{alert_id}", headers=tenant.triage, json={"version": 1, "verdict": verdict}
        )
        assert r.status_code == 200
    text = c.get("/metrics").text
    assert f'safety_monitor_triage_precision{{detector="{detector}"}} 0.75' in text
    assert f'safety_monitor_triaged_alerts{{detector="{detector}"}} 4.0' in text


def test_the_migration_opens_old_alerts_and_matches_the_models(
    client: TestClient, tmp_path: Path
) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext

    from monitor.service.db import MIGRATIONS, Base, make_engine, upgrade

    with _engine(client).connect() as conn:  # this module's database, upgraded at start
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO alerts (id, tenant, conversation_id, pipeline, detector, kind, "
                    "severity, score, summary, suppressed, created_at, evidence) VALUES ('a1', "
                    "'t', 'c', 'p', 'd', 'rule', 'high', 1.0, '', 0, '2026-01-01', '{}')"
                )
            )
        upgrade(engine)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT status, verdict, assignee, version, updated_at FROM alerts")
            ).one()
        assert tuple(row) == ("open", None, None, 1, None)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:  # down again, and up
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0005")
        upgrade(engine)
    finally:
        engine.dispose()
