"""Triage in the audit UI: in headless Chromium a triage key acknowledges an alert from the
list, marks it false positive, adds a note on the conversation page and silences a detector,
and the database shows each; over a TestClient, a POST without the CSRF token or from a read
key is 403, a stale version is 409, the inbox and the triage filters select what they say.

Alerts are seeded straight into the database (no model run); the app holds the real default
pipeline, loaded once per session. The browser fixture is the one of ``test_browser``."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from samples import SCAM, alert_row, turn_row
from selenium.webdriver.remote.webdriver import WebDriver
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_browser import browser  # noqa: F401 (the fixture, shared)

from monitor.localservices import ThreadedServer
from monitor.service.app import create_app
from monitor.service.db import Alert, AlertNote, Silence
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.settings import ServiceSettings


def seed(engine: Any, tenant: str, severities: list[str]) -> list[str]:
    """One alert of scam_email per severity, each on a conversation of its own, oldest first."""
    ids = []
    with Session(engine) as session:
        for sev in severities:
            turn = turn_row(tenant, f"{tenant}-{sev}-{uuid.uuid4().hex[:6]}", messages=SCAM)
            session.add(turn)
            session.flush()
            alert = alert_row(turn, severity=sev)
            session.add(alert)
            alert_id = alert.id
            ids.append(alert_id)
        session.commit()
    return ids


def alert(engine: Any, alert_id: str) -> Alert:
    with Session(engine) as session:
        found = session.get(Alert, alert_id)
        assert found is not None
        session.expunge(found)
        return found


def new_key(engine: Any, tenant: str, role: str, name: str | None = None) -> str:
    with Session(engine) as session:
        k = create_key(session, tenant, role, name)
        session.commit()
    return k


# --- forms over a TestClient -------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, monitored: Monitored) -> Iterator[Any]:
    db = tmp_path_factory.mktemp("ui-triage") / "monitor.db"
    settings = ServiceSettings(database_url=f"sqlite:///{db}", retention_interval_s=0)
    application = create_app(settings, [monitored])
    with TestClient(application):  # started once; each user's client below shares it
        yield application


def logged_in(app: Any, key: str) -> TestClient:
    c = TestClient(app, base_url="https://testserver")  # the cookie is Secure
    r = c.post("/ui/login", data={"key": key}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


@pytest.mark.slow
def test_forms_need_the_csrf_token_and_the_triage_role(app: Any) -> None:
    engine = app.state.monitor.engine
    (a,) = seed(engine, "initech", ["high"])
    triager = logged_in(app, new_key(engine, "initech", "triage", "bob"))
    page = triager.get("/ui/alerts")
    assert page.status_code == 200 and 'class="ack"' in page.text
    token = csrf_of(page.text)
    form = {"version": "1", "status": "acknowledged", "next": "/ui/alerts"}
    for bad in ({}, {"csrf": "0" * 64}):
        r = triager.post(f"/ui/alerts/{a}/triage", data={**form, **bad}, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
    r = triager.post("/ui/silences", data={"detector": "scam_email", "duration": "1h"})
    assert r.status_code == 403
    assert alert(engine, a).status == "open"

    reader = logged_in(app, new_key(engine, "initech", "read"))
    page = reader.get("/ui/alerts")
    assert "open" in page.text and 'class="ack"' not in page.text  # state, no controls
    r = reader.post(
        f"/ui/alerts/{a}/triage", data={**form, "csrf": csrf_of(page.text)}, follow_redirects=False
    )
    assert r.status_code == 403 and "needs triage" in r.text
    r = reader.post(f"/ui/alerts/{a}/notes", data={"text": "x", "csrf": csrf_of(page.text)})
    assert r.status_code == 403
    assert alert(engine, a).status == "open"
    # the token is the session's: another session's token does not do
    r = reader.post(f"/ui/alerts/{a}/triage", data={**form, "csrf": token})
    assert r.status_code == 403 and "CSRF" in r.text

    r = triager.post(f"/ui/alerts/{a}/triage", data={**form, "csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/alerts"
    assert alert(engine, a).status == "acknowledged" and alert(engine, a).version == 2
    stale = triager.post(
        f"/ui/alerts/{a}/triage", data={**form, "verdict": "unsure", "csrf": token}
    )
    assert stale.status_code == 409 and "Changed by someone else" in stale.text
    assert alert(engine, a).verdict is None


@pytest.mark.slow
def test_inbox_and_triage_filters(app: Any) -> None:
    engine = app.state.monitor.engine
    low, critical, medium = seed(engine, "umbrella", ["low", "critical", "medium"])
    c = logged_in(app, new_key(engine, "umbrella", "triage"))
    token = csrf_of(c.get("/ui/alerts").text)
    c.post(f"/ui/alerts/{medium}/triage", data={"csrf": token, "version": 1, "status": "resolved"})
    c.post(f"/ui/alerts/{low}/triage", data={"csrf": token, "version": 1, "verdict": "unsure"})

    def rows(query: str) -> list[str]:
        return re.findall(r'data-alert="([^"]+)"', c.get(f"/ui/alerts?{query}").text)

    assert rows("status=open&sort=severity") == [critical, low]  # most severe first
    assert rows("") == [medium, critical, low]  # newest first
    assert rows("status=resolved") == [medium]
    assert rows("verdict=unsure") == [low]
    assert rows("verdict=none") == [medium, critical]
    assert rows("assignee=nobody") == []
    assert "is not one of" in c.get("/ui/alerts?status=closed").text


@pytest.mark.slow
def test_bulk_triage_and_assignment_from_the_list(app: Any) -> None:
    engine = app.state.monitor.engine
    older, newer, third = seed(engine, "hooli", ["low", "high", "medium"])
    c = logged_in(app, new_key(engine, "hooli", "triage", "gavin"))
    page = c.get("/ui/alerts?status=open")
    assert 'id="bulk"' in page.text and 'id="bulk-filter"' in page.text
    assert f'value="{older}:1" form="bulk"' in page.text
    token = csrf_of(page.text)
    base = {"csrf": token, "next": "/ui/alerts?status=open", "filter": "status=open"}

    def post(**form: Any) -> Any:
        return c.post("/ui/alerts/triage", data={**base, **form}, follow_redirects=False)

    # refused whole, naming what was wrong
    for form, says in (
        ({"scope": "picked", "status": "closed", "pick": [f"{older}:1"]}, "status: 'closed'"),
        ({"scope": "picked", "status": "resolved"}, "pick: tick at least one"),
        ({"scope": "picked", "pick": [f"{older}:1"]}, "choose a status"),
        ({"scope": "picked", "status": "resolved", "pick": ["nonsense"]}, "is not ALERT:VERSION"),
        ({"scope": "filter", "status": "resolved", "filter": "sort=severity"}, "empty filter"),
        ({"scope": "filter", "status": "resolved", "filter": "since=yesterday"}, "since:"),
    ):
        r = post(**form)
        assert r.status_code == 422 and says in html.unescape(r.text), (form, r.text)
    r = c.post("/ui/alerts/triage", data={**base, "csrf": "0" * 64, "status": "resolved"})
    assert r.status_code == 403
    reader = logged_in(app, new_key(engine, "hooli", "read"))
    r = reader.post(
        "/ui/alerts/triage",
        data={**base, "csrf": csrf_of(reader.get("/ui/alerts").text), "status": "resolved"},
    )
    assert r.status_code == 403 and "needs triage" in r.text
    assert 'id="bulk"' not in reader.get("/ui/alerts").text

    # two ticked rows: both changed, assigned to the key's name, the note on each
    r = post(
        scope="picked",
        pick=[f"{older}:1", f"{newer}:1"],
        status="acknowledged",
        assign="me",
        note="same campaign",
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/alerts?status=open"
    for a in (older, newer):
        assert (alert(engine, a).status, alert(engine, a).assignee) == ("acknowledged", "gavin")
    assert alert(engine, third).status == "open"
    with Session(engine) as session:
        notes = session.scalars(select(AlertNote.alert_id).where(AlertNote.text == "same campaign"))
        assert sorted(notes) == sorted([older, newer])
    # a ticked row someone changed meanwhile: 409 and nothing applied, the other row included
    r = post(scope="picked", pick=[f"{older}:1", f"{third}:1"], verdict="unsure")
    assert r.status_code == 409 and "Nothing was applied" in r.text
    assert alert(engine, third).verdict is None and alert(engine, older).verdict is None

    # every alert of the filter, as many as the page showed; the filter grew since: 409
    r = post(scope="filter", filter="status=acknowledged", expect=1, verdict="false_positive")
    assert r.status_code == 409 and "now matches 2 alerts, not the 1" in r.text
    assert alert(engine, older).verdict is None
    r = post(scope="filter", filter="status=acknowledged", expect=2, verdict="false_positive")
    assert r.status_code == 303
    assert {alert(engine, a).verdict for a in (older, newer)} == {"false_positive"}
    assert alert(engine, third).verdict is None

    # one alert: take it, hand it on, unassign it
    for assign, expected in (("me", "gavin"), ("Monica", "Monica"), ("none", None)):
        version = alert(engine, third).version
        r = c.post(
            f"/ui/alerts/{third}/triage",
            data={"csrf": token, "version": version, "assign": assign},
            follow_redirects=False,
        )
        assert r.status_code == 303 and alert(engine, third).assignee == expected, r.text
    assert 'class="take"' in c.get("/ui/alerts?status=open").text  # not mine: Take shown


# --- the flow in a real browser ----------------------------------------------------------


@dataclass
class Site:
    base: str
    engine: Any
    key: str
    alerts: list[str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, monitored: Monitored) -> Iterator[Site]:
    db = tmp_path_factory.mktemp("browser-triage") / "monitor.db"
    settings = ServiceSettings(database_url=f"sqlite:///{db}", retention_interval_s=0)
    application = create_app(settings, [monitored])
    server = ThreadedServer(application).start()
    try:
        engine = application.state.monitor.engine
        ids = seed(engine, "acme", ["medium", "high"])
        key = new_key(engine, "acme", "triage", "alice")
        yield Site(f"http://localhost:{server.port}", engine, key, ids)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.browser
def test_auditor_triages_from_the_list_and_the_conversation(
    site: Site,
    browser: WebDriver,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_browser import _login

    d = browser
    d.delete_all_cookies()
    _login(d, site.base, site.key)
    d.find_element(By.ID, "inbox").click()
    WebDriverWait(d, 30).until(lambda drv: "status=open" in drv.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, "tr.alert-row")
    high = site.alerts[1]
    assert rows[0].get_attribute("data-alert") == high  # most severe first

    # acknowledge from the list: back on the same list, the row acknowledged
    rows[0].find_element(By.CSS_SELECTOR, "button.ack").click()
    WebDriverWait(d, 30).until(lambda drv: alert(site.engine, high).status == "acknowledged")
    assert "status=open" in d.current_url
    ids = [r.get_attribute("data-alert") for r in d.find_elements(By.CSS_SELECTOR, "tr.alert-row")]
    assert ids == [site.alerts[0]]  # it left the inbox

    # mark it false positive from the list of acknowledged alerts
    Select(d.find_element(By.ID, "f-status")).select_by_value("acknowledged")
    d.find_element(By.ID, "apply").click()
    WebDriverWait(d, 30).until(lambda drv: "status=acknowledged" in drv.current_url)
    row = d.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-alert="{high}"]')
    row.find_element(By.CSS_SELECTOR, "button.fp").click()
    WebDriverWait(d, 30).until(lambda drv: alert(site.engine, high).verdict == "false_positive")
    row = d.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-alert="{high}"]')
    assert "false positive" in row.text

    # a note on the conversation page
    row.find_element(By.CSS_SELECTOR, "a.conv-link").click()
    box = d.find_element(By.CSS_SELECTOR, f'.triage-box[data-alert="{high}"]')
    box.find_element(By.NAME, "text").send_keys("newsletter, not a scam (alice@example.com)")
    box.find_element(By.CSS_SELECTOR, "button.add-note").click()
    note = d.find_element(By.CSS_SELECTOR, ".alert-note .note-text")
    assert "newsletter, not a scam" in note.text
    with Session(site.engine) as session:
        notes = session.scalars(select(AlertNote).where(AlertNote.alert_id == high)).all()
        assert [(n.author, n.text.startswith("newsletter")) for n in notes] == [("alice", True)]

    # a silence, then expired
    d.find_element(By.ID, "silences-link").click()
    Select(d.find_element(By.ID, "s-detector")).select_by_value("scam_email")
    duration = d.find_element(By.ID, "s-duration")
    duration.clear()
    duration.send_keys("2h")
    d.find_element(By.ID, "s-reason").send_keys("newsletter campaign")
    d.find_element(By.ID, "s-add").click()
    row = d.find_element(By.CSS_SELECTOR, "#active-silences tr.silence-row")
    assert "newsletter campaign" in row.text and "alice" in row.text
    with Session(site.engine) as session:
        (silence,) = session.scalars(select(Silence)).all()
        assert (silence.tenant, silence.detector, silence.created_by) == (
            "acme",
            "scam_email",
            "alice",
        )
    row.find_element(By.CSS_SELECTOR, "button.expire").click()
    d.find_element(By.CSS_SELECTOR, "#expired-silences tr.silence-row")
    with Session(site.engine) as session:
        assert session.scalars(select(Silence.expired_by)).all() == ["alice"]


@pytest.mark.slow
@pytest.mark.browser
def test_auditor_triages_ticked_alerts_at_once(
    site: Site,
    browser: WebDriver,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_browser import _login

    ids = seed(site.engine, "acme-bulk", ["low", "medium", "high"])
    d = browser
    d.delete_all_cookies()
    _login(d, site.base, new_key(site.engine, "acme-bulk", "triage", "carol"))
    d.get(f"{site.base}/ui/alerts?status=open")
    for alert_id in ids[:2]:
        row = d.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-alert="{alert_id}"]')
        row.find_element(By.CSS_SELECTOR, "input.pick").click()
    Select(d.find_element(By.ID, "b-verdict")).select_by_value("true_positive")
    d.find_element(By.ID, "b-assign").send_keys("me")
    d.find_element(By.ID, "bulk-picked").click()
    WebDriverWait(d, 30).until(lambda drv: alert(site.engine, ids[1]).verdict == "true_positive")
    for alert_id in ids[:2]:
        assert (alert(site.engine, alert_id).assignee, alert(site.engine, alert_id).status) == (
            "carol",
            "open",
        )
    assert alert(site.engine, ids[2]).verdict is None
    row = d.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-alert="{ids[0]}"]')
    assert "true positive" in row.text and "@carol" in row.text
    # the last one taken with its own button, then all of the filter resolved
    row = d.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-alert="{ids[2]}"]')
    row.find_element(By.CSS_SELECTOR, "button.take").click()
    WebDriverWait(d, 30).until(lambda drv: alert(site.engine, ids[2]).assignee == "carol")
    Select(d.find_element(By.ID, "b-status")).select_by_value("resolved")
    d.find_element(By.ID, "bulk-filter").click()
    WebDriverWait(d, 30).until(
        lambda drv: {alert(site.engine, a).status for a in ids} == {"resolved"}
    )
    assert d.find_element(By.ID, "no-alerts")  # the open list is empty now
