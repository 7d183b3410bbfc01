"""Silences over SQLite and a real PostgreSQL: while one is active, a fire of its detector is
stored and counted but makes no alert, outbox row or delivery; it expires on its own or early.
One with a feature pattern withholds only fires with a matching evidence feature; one of all
tenants (the operator's, from the CLI: no key may make one) withholds every tenant's and is
listed for each (API, CLI, UI form).
Also the labels export of triaged alerts, read back by `detectors calibrate --data`."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samples import PLAIN, SCAM, alert_row, turn_row
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session
from test_browser_triage import csrf_of, logged_in, new_key
from test_triage import _engine, client
from typer.testing import CliRunner

from detectors.dataset import read_set
from monitor.cli import app as cli
from monitor.service.alerting import Alerts, AlertSpec
from monitor.service.db import Alert, Outbox, Silence, Turn, VerdictRow, utcnow
from monitor.service.keys import create_key
from monitor.service.silences import SilenceError, create, expire, parse_duration

pytestmark = pytest.mark.integration
__all__ = ["client"]  # the fixture, used by name


def key(c: TestClient, tenant: str, role: str) -> dict[str, str]:
    with Session(_engine(c)) as session:
        k = create_key(session, tenant, role, f"{role}-person")
        session.commit()
    return {"Authorization": f"Bearer {k}"}


def _fire(
    session: Session,
    tenant: str,
    pipeline: str = "smollm2-135m-instruct",
    features: list[dict[str, Any]] | None = None,
) -> list[str]:
    """One stored turn whose scam_email verdict fired (with these evidence features), through
    the recording's alerting."""
    turn = turn_row(tenant, f"c-{uuid.uuid4().hex[:6]}", messages=SCAM, pipeline=pipeline)
    session.add(turn)
    session.flush()
    session.add(
        VerdictRow(
            turn_id=turn.id,
            detector="scam_email",
            kind="rule",
            score=2.0,
            fired=True,
            severity="high",
            evidence={},
        )
    )
    session.flush()
    alerts = Alerts(session, tenant, turn.conversation_id, turn.id, utcnow(), pipeline, {}, [])
    evidence = {"features": features or [], "tokens": []}
    made = alerts.fired(AlertSpec("scam_email", "rule", "high", 2.0, "", evidence), None)
    session.commit()
    return made


def test_a_silence_withholds_alerts_and_counts_the_fires(client: TestClient) -> None:
    tenant, other = f"s-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    with Session(_engine(client)) as session:
        assert len(_fire(session, tenant)) == 1, "no silence: an alert"
        silence = create(
            session,
            tenant=tenant,
            detector="scam_email",
            reason="upstream prompt change",
            created_by="ops",
            duration=parse_duration("1h"),
        )
        only_p2 = create(
            session,
            tenant=other,
            detector="scam_email",
            pipeline="p2",
            reason="p2 only",
            created_by="ops",
            duration=parse_duration("1h"),
        )
        session.commit()
        assert _fire(session, tenant) == [] and _fire(session, tenant) == []
        assert len(_fire(session, other)) == 1, "a silence of another pipeline does not apply"
        assert _fire(session, other, pipeline="p2") == []
        assert len(_fire(session, f"third-{tenant}")) == 1, "nor to another tenant"
        alerts = session.scalar(
            select(func.count()).select_from(Alert).where(Alert.tenant == tenant)
        )
        outbox = session.scalar(
            select(func.count()).select_from(Outbox).join(Alert).where(Alert.tenant == tenant)
        )
        assert alerts == 1 and outbox == 1
        silenced = session.scalars(
            select(VerdictRow.silence_id)
            .join(Turn, Turn.id == VerdictRow.turn_id)
            .where(Turn.tenant.in_([tenant, other]), VerdictRow.silence_id.is_not(None))
        ).all()
        assert sorted(silenced) == sorted([silence.id, silence.id, only_p2.id])
        session.refresh(silence)
        assert silence.fires == 2
        expire(session, tenant, silence.id, "ops")
        session.commit()
        assert len(_fire(session, tenant)) == 1, "expired: alerts again"
        # one that ended on its own
        session.execute(
            update(Silence)
            .where(Silence.id == only_p2.id)
            .values(ends_at=utcnow() - dt.timedelta(seconds=1))
        )
        session.commit()
        assert len(_fire(session, other, pipeline="p2")) == 1


def test_silences_api_roles_tenants_and_validation(client: TestClient) -> None:
    c = client
    tenant = f"s-{uuid.uuid4().hex[:8]}"
    read, triage, admin = key(c, tenant, "read"), key(c, tenant, "triage"), key(c, tenant, "admin")
    outsider = key(c, f"x-{tenant}", "admin")
    body = {"detector": "scam_email", "duration": "2h", "reason": "noisy after the prompt change"}
    r = c.post("/v1/silences", headers=read, json=body)
    assert r.status_code == 403 and "needs triage" in r.json()["detail"]
    assert c.post("/v1/silences", headers=key(c, tenant, "ingest"), json=body).status_code == 403
    r = c.post("/v1/silences", headers=triage, json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["state"] == "active" and made["created_by"] == "triage-person"
    assert made["fires"] == 0 and made["pipeline"] is None
    start, end = (dt.datetime.fromisoformat(made[k]) for k in ("starts_at", "ends_at"))
    assert end - start == dt.timedelta(hours=2)
    later = (utcnow() + dt.timedelta(days=1)).isoformat()
    pending = c.post(
        "/v1/silences",
        headers=admin,
        json={**body, "starts_at": later, "duration": "1d", "pipeline": "smollm2-135m-instruct"},
    )
    assert pending.status_code == 201 and pending.json()["state"] == "pending", pending.text

    def refused(extra: dict[str, Any]) -> list[Any]:
        r = c.post("/v1/silences", headers=triage, json={**body, **extra})
        assert r.status_code == 422, r.text
        return [d["loc"] for d in r.json()["detail"]]

    assert refused({"detector": "no_such_detector"}) == [["body", "detector"]]
    assert refused({"pipeline": "nope"}) == [["body", "pipeline"]]
    assert refused({"duration": "forever"}) == [["body", "duration"]]
    assert refused({"duration": "91d"}) == [["body", "duration"]]
    assert refused({"reason": "  "}) == [["body", "reason"]]
    assert refused({"duration": None, "ends_at": "2020-01-01T00:00Z"}) == [["body", "ends_at"]]
    assert refused({"ends_at": later}) == [["body", "ends_at"]], "both ends_at and duration"
    for bad in ("7100-7000", "6168,,7000", "-3", "*", " , ", "x" * 201):
        assert refused({"features": bad}) == [["body", "features"]], bad
    r = c.post("/v1/silences", headers=triage, json={"detector": "scam_email", "duration": "1h"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "reason"]

    listed = c.get("/v1/silences", headers=read).json()["silences"]
    assert {s["id"] for s in listed} == {made["id"], pending.json()["id"]}
    assert c.get("/v1/silences", headers=outsider).json()["silences"] == []
    assert c.delete(f"/v1/silences/{made['id']}", headers=outsider).status_code == 404
    assert c.delete(f"/v1/silences/{made['id']}", headers=read).status_code == 403
    r = c.delete(f"/v1/silences/{made['id']}", headers=triage)
    assert r.status_code == 200 and r.json()["state"] == "expired", r.text
    assert r.json()["expired_by"] == "triage-person"
    r = c.delete(f"/v1/silences/{pending.json()['id']}", headers=admin)
    assert r.json()["state"] == "expired", "a pending one never starts"
    states = c.get("/v1/silences", headers=read, params={"state": "expired"}).json()["silences"]
    assert len(states) == 2
    assert c.get("/v1/silences", headers=read, params={"state": "active"}).json()["silences"] == []
    assert c.get("/v1/silences", headers=read, params={"state": "gone"}).status_code == 422
    assert c.delete("/v1/silences/999999", headers=triage).status_code == 404


def test_a_silenced_turn_through_the_api_alerts_nothing(client: TestClient) -> None:
    """The real model and catalog: a scam turn fires scam_email; silenced, it is stored with its
    fired verdict and counted, and makes no alert."""
    c = client
    tenant = f"s-{uuid.uuid4().hex[:8]}"
    ingest, triage = key(c, tenant, "ingest"), key(c, tenant, "triage")
    body = {"detector": "scam_email", "duration": "10m", "reason": "test"}
    silence = c.post("/v1/silences", headers=triage, json=body).json()
    r = c.post("/v1/turns", headers=ingest, json={"conversation_id": "c", "messages": SCAM})
    assert r.status_code == 200, r.text
    fired = {v["detector"] for v in r.json()["verdicts"] if v["fired"]}
    assert "scam_email" in fired
    alerts = c.get("/v1/alerts", headers=triage, params={"detector": "scam_email"}).json()
    assert alerts["alerts"] == []
    (listed,) = c.get("/v1/silences", headers=triage).json()["silences"]
    assert listed["id"] == silence["id"] and listed["fires"] == 1
    metrics = c.get("/metrics").text
    assert re.search(
        r'^safety_monitor_silenced_fires_total\{detector="scam_email",pipeline="[^"]+"\} 1\.0$',
        metrics,
        re.MULTILINE,
    ), [line for line in metrics.splitlines() if "silenced" in line]


def test_cli_silences_add_list_expire(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _engine(client).url.render_as_string(hide_password=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", url)
    runner = CliRunner()
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    r = runner.invoke(
        cli,
        [
            *("silences", "add", "--tenant", tenant, "--detector", "scam_email"),
            *("--duration", "3h", "--reason", "maintenance", "--by", "oncall", "--json"),
        ],
    )
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert made["state"] == "active" and made["created_by"] == "oncall"
    r = runner.invoke(
        cli,
        [
            *("silences", "add", "--tenant", tenant, "--detector", "nope"),
            *("--duration", "3h", "--reason", "x"),
        ],
    )
    assert r.exit_code == 2 and "--detector" in r.output
    r = runner.invoke(
        cli,
        ["silences", "add", "--tenant", tenant, "--detector", "scam_email", "--reason", "x"],
    )
    assert r.exit_code == 2 and "--ends-at" in r.output
    r = runner.invoke(cli, ["silences", "list", "--tenant", tenant, "--json"])
    assert [s["id"] for s in json.loads(r.stdout)["silences"]] == [made["id"]]
    r = runner.invoke(cli, ["silences", "expire", str(made["id"]), "--tenant", tenant])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["silences", "list", "--tenant", tenant, "--state", "expired", "--json"])
    (expired,) = json.loads(r.stdout)["silences"]
    assert expired["expired_by"].startswith("cli")
    assert runner.invoke(cli, ["silences", "expire", "424242"]).exit_code == 2


def feature(index: int, label: str) -> dict[str, Any]:
    """An evidence feature as a detector writes one (``detectors.engine.FeatureEvidence``)."""
    return {"index": index, "label": label, "value": 7.1, "cutoff": 3.9}


PRAISE = feature(7321, "Excessive PRAISE of the user")
LOTTERY = feature(6168, "lottery and prize winnings")
IN_RANGE = feature(7050, "urgent calls to act")
OTHER = feature(12, "greetings")


@pytest.fixture
def scoped(client: TestClient) -> Iterator[TestClient]:
    """The client; the all-tenant silences the test made are deleted after it: they would be
    listed for, and withhold the fires of, every later test's tenants in the shared database."""
    yield client
    with Session(_engine(client)) as session:
        session.execute(delete(Silence).where(Silence.tenant.is_(None)))
        session.commit()


def test_a_feature_pattern_silence_withholds_only_fires_with_a_matching_feature(
    client: TestClient,
) -> None:
    """By index, by inclusive range, by case-insensitive label glob; a fire without a matching
    feature, or without evidence features at all, alerts."""
    cases = {
        "6168": (LOTTERY, IN_RANGE),
        "7000 - 7100": (IN_RANGE, PRAISE),
        "*Praise*": (PRAISE, LOTTERY),
        "12, 7000-7100, *prize*": (LOTTERY, PRAISE),
    }
    with Session(_engine(client)) as session:
        for pattern, (matching, other) in cases.items():
            tenant = f"f-{uuid.uuid4().hex[:8]}"
            silence = create(
                session,
                tenant=tenant,
                detector="scam_email",
                features=pattern,
                reason="one noisy feature",
                created_by="ops",
                duration=parse_duration("1h"),
            )
            session.commit()
            assert _fire(session, tenant, features=[other, matching]) == [], pattern
            assert len(_fire(session, tenant, features=[other])) == 1, pattern
            assert len(_fire(session, tenant)) == 1, f"{pattern}: no evidence features"
            session.refresh(silence)
            assert silence.fires == 1, pattern
        assert silence.features == "12, 7000-7100, *prize*", "stored normalised"
        assert create(
            session,
            tenant="t",
            detector="scam_email",
            features=" 0012 ,7000- 7100, *Praise*, 12",
            reason="r",
            created_by="ops",
            duration=parse_duration("1h"),
        ).features == ("12, 7000-7100, *praise*")
        session.rollback()
        for bad, named in [
            ("7100-7000", "'7100-7000'"),
            ("6168,,7000", "item 2 is empty"),
            ("-3", "'-3'"),
            ("**", "'**'"),
            ("6168,", "item 2 is empty"),
        ]:
            with pytest.raises(SilenceError) as caught:
                create(
                    session,
                    tenant="t",
                    detector="scam_email",
                    features=bad,
                    reason="r",
                    created_by="ops",
                    duration=parse_duration("1h"),
                )
            assert caught.value.field == "features" and named in caught.value.message, bad


def _operators_silence(c: TestClient, features: str) -> int:
    """An all-tenant silence, as the operator's CLI makes one (no key may)."""
    with Session(_engine(c)) as session:
        made = create(
            session,
            tenant=None,
            detector="scam_email",
            features=features,
            reason="bad rollout everywhere",
            created_by="cli:ops",
            duration=parse_duration("1h"),
        )
        session.commit()
        return made.id


def test_an_all_tenant_silence_is_the_operators_and_listed_for_every_tenant(
    scoped: TestClient,
) -> None:
    c = scoped
    one, two = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    admin, triage = key(c, one, "admin"), key(c, one, "triage")
    read_two, triage_two = key(c, two, "read"), key(c, two, "triage")
    body = {"detector": "scam_email", "duration": "1h", "reason": "bad rollout everywhere"}
    # No key can silence another tenant, an admin's neither: every key is one tenant's.
    r = c.post("/v1/silences", headers=admin, json={**body, "all_tenants": True})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "all_tenants"]
    r = c.post("/v1/silences", headers=triage, json={**body, "features": "6168,"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "features"]
    made_id = _operators_silence(c, "6168, *PRAISE*")
    own = c.post("/v1/silences", headers=triage_two, json={**body, "features": "12"}).json()
    assert (own["tenant"], own["all_tenants"], own["features"]) == (two, False, "12"), own
    with Session(_engine(c)) as session:
        assert _fire(session, one, features=[LOTTERY]) == []
        # another tenant's too; its own silence (made later) matches as well: the earliest counts
        assert _fire(session, two, features=[OTHER, PRAISE]) == []
        assert _fire(session, f"third-{one}", pipeline="p2", features=[LOTTERY]) == []
        assert len(_fire(session, two, features=[IN_RANGE])) == 1, "no matching feature"
        assert len(_fire(session, one)) == 1, "no evidence features"
        assert _fire(session, two, features=[OTHER]) == [], "only two's own one matches"
        assert session.get(Silence, made_id).fires == 3  # type: ignore[union-attr]
        assert session.get(Silence, own["id"]).fires == 1  # type: ignore[union-attr]
    for who, tenant in [(admin, one), (read_two, two)]:
        listed = {s["id"]: s for s in c.get("/v1/silences", headers=who).json()["silences"]}
        assert made_id in listed, f"listed for {tenant}"
        assert listed[made_id]["all_tenants"] and listed[made_id]["tenant"] is None
        assert listed[made_id]["features"] == "6168, *praise*"
        # its 3 fires were one, two and a third tenant's: each sees its own count only
        assert listed[made_id]["fires"] == 1, f"{tenant} sees its own fires, not every tenant's"
    listed_one = c.get("/v1/silences", headers=admin).json()["silences"]
    assert own["id"] not in {s["id"] for s in listed_one}, "another tenant's own one is not"
    for who in (triage_two, admin):
        r = c.delete(f"/v1/silences/{made_id}", headers=who)
        assert r.status_code == 403 and "only the operator" in r.json()["detail"], r.text
    assert c.delete(f"/v1/silences/{own['id']}", headers=triage_two).status_code == 200
    with Session(_engine(c)) as session:
        expire(session, None, made_id, "cli:ops")  # the operator's CLI
        session.commit()
        assert len(_fire(session, two, features=[LOTTERY])) == 1, "expired: alerts again"


def test_cli_all_tenant_and_feature_silences(
    scoped: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _engine(scoped).url.render_as_string(hide_password=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", url)
    runner = CliRunner()
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    add = ["silences", "add", "--detector", "scam_email", "--duration", "1h", "--reason", "x"]
    for scope in ([], ["--tenant", tenant, "--all-tenants"]):
        r = runner.invoke(cli, [*add, *scope])
        assert r.exit_code == 2 and "exactly one of --tenant and --all-tenants" in r.output, scope
    r = runner.invoke(cli, [*add, "--tenant", tenant, "--features", "7100-7000"])
    assert r.exit_code == 2 and "--features" in r.output and "7100-7000" in r.output, r.output
    r = runner.invoke(cli, [*add, "--all-tenants", "--features", "6168, *Praise*", "--json"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert (made["tenant"], made["all_tenants"], made["features"]) == (None, True, "6168, *praise*")
    # globs print as typed: rich would read [ab] as a style and [/x] as a closing tag
    r = runner.invoke(cli, [*add, "--tenant", tenant, "--features", "12, *[ab]c*, [/x]*"])
    assert r.exit_code == 0 and tenant in r.output, r.output
    assert "(features 12, *[ab]c*, [/x]*)" in " ".join(r.output.split()), r.output
    r = runner.invoke(cli, ["silences", "list", "--tenant", tenant, "--json"])
    listed = json.loads(r.stdout)["silences"]
    assert made["id"] in [s["id"] for s in listed] and len(listed) == 2
    r = runner.invoke(cli, ["silences", "list", "--tenant", tenant, "--detector", "scam_email"])
    text = " ".join(r.stdout.split())  # rich wraps long lines
    assert f"{made['id']} active scam_email all tenants " in text, r.stdout
    assert "features 6168, *praise* by" in text and f"scam_email {tenant} " in text, r.stdout
    assert "features 12, *[ab]c*, [/x]* by" in text, r.stdout
    r = runner.invoke(cli, ["silences", "expire", str(made["id"]), "--tenant", tenant])
    assert r.exit_code == 0, r.output


def test_the_ui_form_takes_a_feature_pattern_and_shows_the_operators_silences(
    scoped: TestClient,
) -> None:
    app, engine = scoped.app, _engine(scoped)
    two = f"ub-{uuid.uuid4().hex[:8]}"
    admin = logged_in(app, new_key(engine, two, "admin", "root"))
    triager = logged_in(app, new_key(engine, two, "triage", "bob"))
    page = triager.get("/ui/silences")
    assert 'id="s-features"' in page.text and "all_tenants" not in page.text
    form = {"csrf": csrf_of(page.text), "detector": "scam_email", "duration": "1h", "reason": "r"}
    r = triager.post("/ui/silences", data={**form, "features": "7100-7000"})
    assert r.status_code == 422 and 'id="silence-error"' in r.text and "features:" in r.text
    # the refused form comes back as typed, to fix the one mistake
    assert 'id="s-features" value="7100-7000"' in r.text and 'value="1h"' in r.text
    assert '<option value="scam_email" selected>' in r.text
    r = triager.post(
        "/ui/silences",
        data={**form, "features": "6168, *Praise*", "all_tenants": "1"},  # no such field
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    everyone = _operators_silence(scoped, "7000-7100")
    with Session(engine) as session:
        rows = session.scalars(
            select(Silence).where(or_(Silence.tenant == two, Silence.tenant.is_(None)))
        ).all()
        scopes = {(s.tenant, s.features, s.created_by): s.id for s in rows}
    assert set(scopes) == {(two, "6168, *praise*", "bob"), (None, "7000-7100", "cli:ops")}
    own = scopes[(two, "6168, *praise*", "bob")]
    for who in (triager, admin):
        text = who.get("/ui/silences").text
        found = re.findall(r'(<tr class="silence-row" data-silence="(\d+)".*?</tr>)', text, re.S)
        by_id = {int(i): row for row, i in found}
        assert "all tenants" in by_id[everyone]
        assert "7000-7100" in by_id[everyone] and "Expire now" not in by_id[everyone]
        assert "6168, *praise*" in by_id[own] and "Expire now" in by_id[own]
    token = csrf_of(admin.get("/ui/silences").text)
    r = admin.post(f"/ui/silences/{everyone}/expire", data={"csrf": token})
    assert r.status_code == 403 and "only the operator" in r.text
    with Session(engine) as session:
        assert session.get(Silence, everyone).expired_by is None  # type: ignore[union-attr]


LEGIT = [
    {
        "role": "user",
        "content": "Subject: Your order has shipped\n\nHi Sam, your order #4411 left our "
        "warehouse today and should arrive on Thursday. You can track it in your account. "
        "Thanks for shopping with us!",
    }
]


def test_labels_export_round_trips_into_calibrate(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Triaged alerts exported as a labelled set that `detectors calibrate --data` reads."""
    c = client
    tenant = f"lab-{uuid.uuid4().hex[:8]}"
    triage = key(c, tenant, "triage")
    verdicts = {
        "true_positive": SCAM,
        "false_positive": LEGIT,
        "unsure": PLAIN,
    }
    ids = {}
    with Session(_engine(c)) as session:
        for verdict, messages in [*verdicts.items(), ("false_positive", PLAIN)]:
            turn = turn_row(tenant, f"c-{verdict}-{len(ids)}", messages=messages)
            session.add(turn)
            session.flush()
            alert = alert_row(turn, score=1.2, summary="")
            session.add(alert)
            alert_id = alert.id
            ids[alert_id] = verdict
        session.add(turn_row(tenant, "quiet", messages=PLAIN))  # traffic, never alerted
        session.commit()
    for alert_id, verdict in ids.items():
        r = c.patch(
            f"/v1/alerts/{alert_id}", headers=triage, json={"version": 1, "verdict": verdict}
        )
        assert r.status_code == 200, r.text
    url = _engine(c).url.render_as_string(hide_password=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", url)
    runner = CliRunner()
    labels = tmp_path / "scam_email.triage.jsonl"
    r = runner.invoke(
        cli,
        [
            *("detectors", "labels", "export", "--detector", "scam_email", "--out", str(labels)),
            *("--tenant", tenant, "--traffic-sample", "10", "--json"),
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["positives"], report["negatives"]) == (1, 2)
    assert report["left_out"]["unsure"] == 1 and report["traffic"] == 5
    read = read_set(labels, True)
    assert not read.problems
    assert sorted(e.labels["scam_email"] for e in read.examples) == [0, 0, 1]
    traffic = read_set(Path(report["traffic_out"]), False)
    assert len(traffic.examples) == 5 and not traffic.problems
    assert sum("scam_email" in e.labels for e in traffic.examples) == 3, "judged ones labelled"
    r = runner.invoke(
        cli, ["detectors", "calibrate", "scam_email", "--data", str(labels), "--dry-run"]
    )
    assert r.exit_code == 0, r.output
    assert "labelled data: recall" in r.output and "(1 pos, 2 neg)" in r.output, r.output
    r = runner.invoke(
        cli,
        [
            *("detectors", "labels", "export", "--detector", "deception", "--out", str(labels)),
            *("--tenant", tenant),
        ],
    )
    assert r.exit_code == 2 and "no alerts of 'deception'" in r.output
