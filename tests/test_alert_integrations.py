"""Slack, PagerDuty and Alertmanager sinks: a real Alertmanager (Debian's prometheus-alertmanager
on loopback) shows the alerts through its API with their labels and honours a silence; local
receivers check the Slack and PagerDuty payloads against JSON Schemas of their documented
formats; per-sink filters; a failing receiver retried, dead-lettered and sent again as webhooks
are; bad sink settings refused with the field named."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from pydantic import ValidationError
from samples import WEBHOOK_SECRET
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_alert_delivery import Receiver, app_client, post_scam, wait_for
from test_dispatch import add_alert
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.localservices import free_port, stop_process
from monitor.service.contract import AlertPayload
from monitor.service.db import WebhookDelivery, make_engine, upgrade
from monitor.service.deliveries import DeliveryFilter, retry_dead
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.runtime import Runtime, SettingsError
from monitor.service.settings import ServiceSettings
from monitor.service.sinks.alertmanager import postable_alert
from monitor.service.sinks.pagerduty import event
from monitor.service.sinks.slack import message
from monitor.service.sinks.webhook import UnconfiguredWebhooks

ROUTING_KEY = "R0ut1ngKey0f32LettersAndD1g1ts00"  # an integration key's shape
PUBLIC_URL = "https://monitor.example"

# --- The receivers' documented formats, as JSON Schemas ---------------------------------------

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or dt.datetime.fromisoformat(value).tzinfo is not None


@FORMATS.checks("uri")
def _uri(value: object) -> bool:
    parts = urlsplit(str(value))
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in str(value)


def _text(kinds: list[str], limit: int) -> dict[str, Any]:
    """A Block Kit text object (plain_text or mrkdwn) of at most ``limit`` characters."""
    return {
        "type": "object",
        "required": ["type", "text"],
        "properties": {
            "type": {"enum": kinds},
            "text": {"type": "string", "minLength": 1, "maxLength": limit},
            "emoji": {"type": "boolean"},
            "verbatim": {"type": "boolean"},
        },
        "additionalProperties": False,
    }


def _block(kind: str, required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {
            "type": {"const": kind},
            "block_id": {"type": "string", "maxLength": 255},
            **properties,
        },
        "additionalProperties": False,
    }


BOTH = ["plain_text", "mrkdwn"]
BUTTON = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"const": "button"},
        "text": _text(["plain_text"], 75),
        "action_id": {"type": "string", "maxLength": 255},
        "url": {"type": "string", "maxLength": 3000, "format": "uri"},
        "value": {"type": "string", "maxLength": 2000},
        "style": {"enum": ["primary", "danger"]},
    },
    "additionalProperties": False,
}
# Slack incoming webhooks: https://api.slack.com/messaging/webhooks and the Block Kit reference
# (https://api.slack.com/reference/block-kit/blocks): limits per block and text object.
SLACK_MESSAGE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["text"],
    "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 40000},
        "mrkdwn": {"type": "boolean"},
        "blocks": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "oneOf": [
                    _block("header", ["text"], text=_text(["plain_text"], 150)),
                    {
                        **_block(
                            "section",
                            [],
                            text=_text(BOTH, 3000),
                            fields={
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 10,
                                "items": _text(BOTH, 2000),
                            },
                        ),
                        "anyOf": [{"required": ["text"]}, {"required": ["fields"]}],
                    },
                    _block(
                        "actions",
                        ["elements"],
                        elements={"type": "array", "minItems": 1, "maxItems": 25, "items": BUTTON},
                    ),
                    _block(
                        "context",
                        ["elements"],
                        elements={
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 10,
                            "items": _text(BOTH, 3000),
                        },
                    ),
                    _block("divider", []),
                ]
            },
        },
    },
    "additionalProperties": False,
}
STRING = {"type": "string", "minLength": 1}
# PagerDuty Events API v2, "Send an Alert Event":
# https://developer.pagerduty.com/docs/events-api-v2/trigger-events/
PAGERDUTY_EVENT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["routing_key", "event_action", "payload"],
    "properties": {
        "routing_key": {"type": "string", "pattern": "^[A-Za-z0-9]{32}$"},
        "event_action": {"enum": ["trigger", "acknowledge", "resolve"]},
        "dedup_key": {"type": "string", "minLength": 1, "maxLength": 255},
        "client": STRING,
        "client_url": {"type": "string", "format": "uri"},
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["href"],
                "properties": {"href": {"type": "string", "format": "uri"}, "text": STRING},
                "additionalProperties": False,
            },
        },
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["src"],
                "properties": {"src": STRING, "href": STRING, "alt": STRING},
                "additionalProperties": False,
            },
        },
        "payload": {
            "type": "object",
            "required": ["summary", "source", "severity"],
            "properties": {
                "summary": {"type": "string", "minLength": 1, "maxLength": 1024},
                "source": STRING,
                "severity": {"enum": ["critical", "error", "warning", "info"]},
                "timestamp": {"type": "string", "format": "date-time"},
                "component": STRING,
                "group": STRING,
                "class": STRING,
                "custom_details": {"type": "object"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


def check(schema: dict[str, Any], document: Any) -> None:
    errors = [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema, format_checker=FORMATS).iter_errors(
            document
        )
    ]
    assert not errors, errors


# --- Alertmanager ------------------------------------------------------------------------------


class Alertmanager:
    """Debian's ``prometheus-alertmanager`` on a free loopback port, clustering off, its config
    and storage in ``root``; every alert goes to a receiver that notifies nobody."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            pytest.fail("Alertmanager is not installed (Debian: prometheus-alertmanager)")
        config = root / "alertmanager.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "route": {"receiver": "nobody", "group_by": ["alertname", "tenant"]},
                    "receivers": [{"name": "nobody"}],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (root / "alertmanager.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={root / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--cluster.listen-address=",  # no gossip port
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10)

        def ready() -> bool:
            assert self.proc.poll() is None, f"alertmanager exited; see {root}/alertmanager.log"
            try:
                return self.http.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, seconds=30)

    def alerts(self, tenant: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v2/alerts", params={"filter": f'tenant="{tenant}"'})
        r.raise_for_status()
        found: list[dict[str, Any]] = r.json()
        return found

    def silence(self, **labels: str) -> str:
        now = dt.datetime.now(dt.UTC)
        r = self.http.post(
            "/api/v2/silences",
            json={
                "matchers": [
                    {"name": k, "value": v, "isRegex": False, "isEqual": True}
                    for k, v in labels.items()
                ],
                "startsAt": now.isoformat(),
                "endsAt": (now + dt.timedelta(hours=1)).isoformat(),
                "createdBy": "tests",
                "comment": "a known false positive",
            },
        )
        assert r.status_code == 200, r.text
        silence_id: str = r.json()["silenceID"]
        return silence_id

    def stop(self) -> None:
        self.http.close()
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path)
    yield am
    am.stop()


def _key(client: Any, tenant: str, role: str) -> dict[str, str]:
    with Session(client.app.state.monitor.engine) as session:
        k = create_key(session, tenant, role)
        session.commit()
    return {"Authorization": f"Bearer {k}"}


def _deliveries(client: Any, auth: dict[str, str], **params: str) -> list[dict[str, Any]]:
    r = client.get("/v1/webhooks/deliveries", params=params, headers=auth)
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["deliveries"]
    return rows


@pytest.mark.slow
@pytest.mark.integration
def test_alertmanager_shows_the_alerts_with_their_labels_and_honours_a_silence(
    pg_url: str, monitored: Monitored, alertmanager: Alertmanager
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    sink = {
        "type": "alertmanager",
        "name": "am",
        "url": alertmanager.url,
        "detectors": ["scam_email"],
        "ends_after_s": 600,
    }
    with app_client(pg_url, monitored, sinks=[sink], public_url=PUBLIC_URL) as c:
        auth = _key(c, tenant, "read")
        post_scam(c, tenant, "c1")
        wait_for(lambda: len(alertmanager.alerts(tenant)) == 1, seconds=30)
        (first,) = alertmanager.alerts(tenant)
        ours = c.get("/v1/alerts", params={"detector": "scam_email"}, headers=auth).json()
        (alert,) = ours["alerts"]
        assert first["labels"] == {
            "alertname": "SafetyMonitor_scam_email",
            "detector": "scam_email",
            "severity": "high",
            "tenant": tenant,
            "pipeline": "smollm2-135m-instruct",
            "kind": "rule",
            "conversation_id": "c1",
        }
        assert first["annotations"]["alert_id"] == alert["alert_id"]
        assert first["annotations"]["summary"] and "score" in first["annotations"]
        assert first["generatorURL"] == f"{PUBLIC_URL}/ui/conversations/c1"
        assert first["status"]["state"] == "active"
        ends = dt.datetime.fromisoformat(first["endsAt"])
        left = (ends - dt.datetime.now(dt.UTC)).total_seconds()
        assert 500 < left <= 600, "resolved ends_after_s after it was sent"
        assert [(d["webhook"], d["status"]) for d in _deliveries(c, auth)] == [("am", "delivered")]

        # A silence made in Alertmanager mutes what the service sends next.
        silence = alertmanager.silence(detector="scam_email", tenant=tenant)
        post_scam(c, tenant, "c2")

        def second() -> dict[str, Any] | None:
            found = [
                a for a in alertmanager.alerts(tenant) if a["labels"]["conversation_id"] == "c2"
            ]
            return found[0] if found else None

        wait_for(lambda: second() is not None, seconds=30)
        muted = second()
        assert muted is not None
        assert muted["status"]["state"] == "suppressed"
        assert muted["status"]["silencedBy"] == [silence]
        unmuted = alertmanager.http.get(
            "/api/v2/alerts", params={"filter": f'tenant="{tenant}"', "silenced": "false"}
        ).json()
        assert unmuted == [], "both conversations' alerts are silenced"


@pytest.mark.slow
@pytest.mark.integration
def test_slack_and_pagerduty_get_their_documented_payloads_filtered_per_sink(
    pg_url: str, monitored: Monitored
) -> None:
    slack, pagerduty = Receiver(status=200), Receiver(status=202)
    wanted, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    conversation = f"team/{uuid.uuid4().hex[:6]}"  # a "/" in the id: the link quotes it
    sinks = [
        {"type": "slack", "name": "chat", "url": slack.url},
        {
            "type": "pagerduty",
            "name": "pd",
            "routing_key": ROUTING_KEY,
            "url": pagerduty.url,
            "tenants": [wanted],
        },
    ]
    try:
        with app_client(
            pg_url, monitored, sinks=sinks, public_url=PUBLIC_URL, ui_secure_cookie=False
        ) as c:
            mine = post_scam(c, wanted, conversation)
            theirs = post_scam(c, other, "c-other")
            wait_for(lambda: len(slack.calls) >= len(mine) + len(theirs))
            wait_for(lambda: len(pagerduty.calls) >= len(mine))
            other_rows = _deliveries(c, _key(c, other, "read"))
            assert {d["webhook"] for d in other_rows} == {"chat"}, "pd filters the tenant out"
            read_key = _key(c, wanted, "read")["Authorization"].removeprefix("Bearer ")
            c.post("/ui/login", data={"key": read_key})
            link = f"{PUBLIC_URL}/ui/conversations/{conversation.replace('/', '%2F')}"
            page = c.get(link.removeprefix(PUBLIC_URL))
            assert page.status_code == 200 and conversation in page.text
        time.sleep(0.5)
        assert len(slack.calls) == len(mine) + len(theirs)
        assert len(pagerduty.calls) == len(mine)

        for headers, body in slack.calls:
            assert headers["Content-Type"] == "application/json"
            check(SLACK_MESSAGE, json.loads(body))
        texts = [json.loads(b)["text"] for _h, b in slack.calls]
        assert sum(wanted in t for t in texts) == len(mine)
        scam = next(json.loads(b) for _h, b in slack.calls if wanted in json.loads(b)["text"])
        blocks = {b["type"]: b for b in scam["blocks"]}
        assert blocks["actions"]["elements"][0]["url"] == link
        section = next(b for b in scam["blocks"] if b["type"] == "section")
        assert any("*Detector*" in f["text"] for f in section["fields"])

        events = [json.loads(b) for _h, b in pagerduty.calls]
        for e in events:
            check(PAGERDUTY_EVENT, e)
            assert e["routing_key"] == ROUTING_KEY and e["event_action"] == "trigger"
            assert e["dedup_key"] == f"{wanted}/{conversation}/{e['payload']['component']}"
            assert e["payload"]["group"] == wanted
            assert e["links"] == [{"href": link, "text": "The conversation in the audit UI"}]
            assert e["payload"]["custom_details"]["alert_id"] in mine
        severities = {e["payload"]["component"]: e["payload"]["severity"] for e in events}
        assert severities["scam_email"] == "error", "high is PagerDuty's error"
    finally:
        slack.close()
        pagerduty.close()


# PagerDuty Events API v2, "Resolve an alert": routing key, action and the trigger's dedup key.
PAGERDUTY_RESOLVE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["routing_key", "event_action", "dedup_key"],
    "properties": {
        "routing_key": {"type": "string", "pattern": "^[A-Za-z0-9]{32}$"},
        "event_action": {"const": "resolve"},
        "dedup_key": {"type": "string", "minLength": 1, "maxLength": 255},
    },
    "additionalProperties": False,
}


@pytest.mark.slow
@pytest.mark.integration
def test_resolving_an_alert_in_triage_resolves_its_pagerduty_incident(
    pg_url: str, monitored: Monitored
) -> None:
    slack, pagerduty = Receiver(status=200), Receiver(status=202)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    sinks = [
        {"type": "slack", "name": "chat", "url": slack.url},
        {"type": "pagerduty", "name": "pd", "routing_key": ROUTING_KEY, "url": pagerduty.url},
    ]
    try:
        with app_client(pg_url, monitored, sinks=sinks) as c:
            mine = post_scam(c, tenant, "c-resolve")
            wait_for(lambda: len(pagerduty.calls) >= len(mine))
            triage = _key(c, tenant, "triage")
            alert = c.get(f"/v1/alerts/{mine[0]}", headers=triage).json()

            def patch(status: str) -> None:
                nonlocal alert
                body = {"version": alert["version"], "status": status}
                r = c.patch(f"/v1/alerts/{mine[0]}", json=body, headers=triage)
                assert r.status_code == 200, r.text
                alert = r.json()

            def resolves() -> list[dict[str, Any]]:
                docs = [json.loads(b) for _h, b in pagerduty.calls]
                return [d for d in docs if d["event_action"] == "resolve"]

            patch("acknowledged")
            time.sleep(1.5)
            assert resolves() == [], "acknowledging resolves nothing"
            patch("resolved")
            wait_for(lambda: len(resolves()) == 1)
            (resolve,) = resolves()
            check(PAGERDUTY_RESOLVE, resolve)
            trigger = next(
                json.loads(b)
                for _h, b in pagerduty.calls
                if json.loads(b).get("payload", {}).get("custom_details", {}).get("alert_id")
                == mine[0]
            )
            assert resolve["dedup_key"] == trigger["dedup_key"]
            rows = _deliveries(c, triage)
            assert {(d["webhook"], d["event"]) for d in rows if d["alert_id"] == mine[0]} == {
                ("chat", "alert"),
                ("pd", "alert"),
                ("pd", "resolve"),
            }, "Slack is not told of resolutions"
            patch("open")
            patch("resolved")  # reopened, then resolved again: resolved again
            wait_for(lambda: len(resolves()) == 2)
    finally:
        slack.close()
        pagerduty.close()


@pytest.mark.slow
@pytest.mark.integration
def test_a_failing_pagerduty_is_retried_dead_lettered_and_sent_again(
    pg_url: str, monitored: Monitored
) -> None:
    failing = Receiver(status=500)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    name = f"pd-{tenant}"
    sink = {"type": "pagerduty", "name": name, "routing_key": ROUTING_KEY, "url": failing.url}
    try:
        with app_client(
            pg_url, monitored, sinks=[sink], webhook_max_attempts=3, webhook_backoff_s=0.1
        ) as c:
            ids = post_scam(c, tenant, "c1")
            read, admin = _key(c, tenant, "read"), _key(c, tenant, "admin")
            wait_for(lambda: len(_deliveries(c, read, status="dead")) == len(ids))
            for d in _deliveries(c, read, status="dead"):
                assert d["attempts"] == 3 and d["last_status"] == 500
                assert d["webhook"] == name and d["last_error"] == "HTTP 500"
            assert len(failing.calls) == 3 * len(ids)
            metrics = c.get("/metrics").text
            dead = f'safety_monitor_webhook_deliveries{{state="dead",webhook="{name}"}}'
            assert f"{dead} {float(len(ids))}" in metrics
            failures = f'safety_monitor_webhook_failures_total{{webhook="{name}"}}'
            assert f"{failures} {float(3 * len(ids))}" in metrics

            failing.status = 202  # PagerDuty is back
            r = c.post("/v1/webhooks/deliveries/retry", json={"webhook": name}, headers=admin)
            assert r.json() == {"retried": len(ids)}
            wait_for(lambda: len(_deliveries(c, read, status="delivered")) == len(ids))
            assert c.get("/readyz").status_code == 200, "a failing receiver is no outage"
    finally:
        failing.close()


@pytest.mark.slow
def test_bad_sink_settings_refuse_to_start_naming_the_field(
    monitored: Monitored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'monitor.db'}"
    chat = {"type": "slack", "name": "chat", "url": "https://hooks.slack.com/services/x"}
    am = {"type": "alertmanager", "name": "am", "url": "http://am:9093", "detectors": ["scam"]}
    typo = ServiceSettings(database_url=db, sinks=[chat, am])
    with pytest.raises(SettingsError, match=r"sinks\[1\] \(am\)\.detectors: .* 'scam'; the pipe"):
        Runtime(typo, [monitored])

    # From the environment, as `serve` reads it: the field is named, the secret is not echoed.
    monkeypatch.setenv("SAFETY_MONITOR_DATA_DIR", str(tmp_path / "data"))
    for sinks, named in (
        ([{"type": "teams", "name": "x", "url": "https://x"}], "sinks.0: Input tag 'teams'"),
        ([{"name": "x", "url": "https://x"}], "sinks[0] has no type"),
        (
            [{"type": "pagerduty", "name": "x", "routing_key": "s3cr3t-key"}],
            "sinks.0.pagerduty.routing_key: Value error, a PagerDuty routing key",
        ),
    ):
        monkeypatch.setenv("SAFETY_MONITOR_SINKS", json.dumps(sinks))
        r = CliRunner().invoke(cli, ["serve"])
        assert r.exit_code == 2 and named in " ".join(r.output.split()), r.output
        assert "s3cr3t-key" not in r.output


def _payload(**over: Any) -> dict[str, Any]:
    doc = {
        "alert_id": str(uuid.uuid4()),
        "tenant": "acme",
        "conversation_id": "[EMAIL]#0123456789ab",
        "turn_id": str(uuid.uuid4()),
        "pipeline": "smollm2-135m-instruct",
        "detector": "scam_email",
        "kind": "rule",
        "severity": "critical",
        "score": 1.84,
        "summary": "Scam or phishing <e-mail> & more",
        "created_at": dt.datetime.now(dt.UTC),
        "evidence": {
            "features": [
                {"index": i, "label": f"feature {i}", "value": 7.1 - i, "cutoff": 3.9}
                for i in range(8)
            ],
            "tokens": [],
        },
        "metadata": {"app": "mail"},
        **over,
    }
    return AlertPayload.model_validate(doc).model_dump(mode="json")


def test_payloads_keep_the_receivers_limits_and_escape_text() -> None:
    huge = _payload(summary="x" * 5000, conversation_id="c" * 400, tenant="t" * 64)
    pd = event(huge, ROUTING_KEY, PUBLIC_URL)
    check(PAGERDUTY_EVENT, pd)
    assert len(pd["payload"]["summary"]) == 1024 and len(pd["dedup_key"]) == 255
    other = event(_payload(conversation_id="c" * 399 + "d", tenant="t" * 64), ROUTING_KEY, None)
    assert other["dedup_key"] != pd["dedup_key"], "long keys still differ per conversation"
    assert "links" not in other and "client_url" not in other, "no link without public_url"
    check(PAGERDUTY_EVENT, other)
    assert other["payload"]["severity"] == "critical"
    for ours, theirs in (
        ("high", "error"),
        ("medium", "warning"),
        ("low", "info"),
        ("info", "info"),
    ):
        assert event(_payload(severity=ours), ROUTING_KEY, None)["payload"]["severity"] == theirs

    msg = message(huge, PUBLIC_URL)
    check(SLACK_MESSAGE, msg)
    escaped = message(_payload(), None)
    check(SLACK_MESSAGE, escaped)
    assert "&lt;e-mail&gt; &amp; more" in escaped["blocks"][1]["text"]["text"]
    assert "actions" not in {b["type"] for b in escaped["blocks"]}
    features = escaped["blocks"][2]["text"]["text"]
    assert features.count("•") == 5 and "#0 feature 0: 7.1 (cut-off 3.9)" in features
    escalation = _payload(kind="escalation", evidence={"fires": 12, "window_seconds": 3600})
    check(SLACK_MESSAGE, message(escalation, PUBLIC_URL))
    assert "12 fires within 3600 s" in json.dumps(message(escalation, None))

    at = dt.datetime(2026, 12, 3, 7, 0, tzinfo=dt.UTC)
    alert = postable_alert(_payload(), at, None)
    assert alert["endsAt"] == "2026-12-03T07:00:00.000Z" and "generatorURL" not in alert
    assert all(isinstance(v, str) for v in alert["annotations"].values())


def test_housekeeping_counts_sink_names_as_configured(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'monitor.db'}")
    upgrade(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    settings = ServiceSettings(
        database_url=str(engine.url),
        webhooks=[{"name": "hook", "url": "https://x", "secrets": [WEBHOOK_SECRET]}],
        sinks=[{"type": "pagerduty", "name": "pd", "routing_key": ROUTING_KEY}],
    )
    add_alert(sessions, ["hook", "pd", "removed"])
    assert UnconfiguredWebhooks(sessions, settings).round() == 1
    with sessions() as session:
        rows = {d.webhook: d for d in session.query(WebhookDelivery)}
    assert rows["removed"].dead_at is not None
    assert rows["pd"].dead_at is None and rows["hook"].dead_at is None
    engine.dispose()


def test_sink_settings_are_checked_where_they_are_read() -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSettings(sinks=[{"type": "teams", "name": "x", "url": "https://x"}])
    (problem,) = info.value.errors()
    assert problem["loc"] == ("sinks", 0)
    assert "'teams'" in problem["msg"] and "'slack', 'pagerduty', 'alertmanager'" in problem["msg"]
    hook = {"name": "oncall", "url": "https://x", "secrets": [WEBHOOK_SECRET]}
    for webhooks, sinks, taken in (
        ([hook], [{"type": "slack", "name": "oncall", "url": "https://x"}], "webhooks[0]"),
        (
            [],
            [
                {"type": "slack", "name": "oncall", "url": "https://x"},
                {"type": "alertmanager", "name": "oncall", "url": "http://am:9093"},
            ],
            "sinks[0]",
        ),
    ):
        with pytest.raises(
            ValidationError, match=rf"'oncall' is taken by {taken}".replace("[", r"\[")
        ):
            ServiceSettings(webhooks=webhooks, sinks=sinks)
    with pytest.raises(ValidationError) as info:
        ServiceSettings(sinks=[{"type": "slack", "name": "x", "url": "https://x", "channel": "#a"}])
    (problem,) = info.value.errors()
    assert problem["loc"] == ("sinks", 0, "slack") and "'channel'" in problem["msg"]
    s = ServiceSettings(
        public_url="https://monitor.example/",
        sinks=[{"type": "alertmanager", "name": "am", "url": "http://am:9093/"}],
    )
    assert s.public_url == PUBLIC_URL and s.sinks[0].url == "http://am:9093"


@pytest.mark.integration
def test_an_incident_resolves_with_its_last_open_alert_and_an_unsent_trigger_is_never_sent(
    backend_url: str,
) -> None:
    """Seeded rows (no model): the alerts of one tenant, conversation and detector share one
    PagerDuty incident, so only resolving the last open one queues the resolve; an alert
    resolved before its trigger went out gets no trigger and no resolve."""
    from samples import alert_row, turn_row

    from monitor.service.db import utcnow
    from monitor.service.triage import apply_change

    engine = make_engine(backend_url)
    upgrade(engine)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    try:
        with Session(engine) as session:
            turn = turn_row(tenant, "c-shared")
            session.add(turn)
            session.flush()
            first, second, unsent = (alert_row(turn) for _ in range(3))
            unsent.conversation_id = "c-other"
            session.add_all([first, second, unsent])
            session.flush()
            for a in (first, second, unsent):
                sent = None if a is unsent else utcnow()
                session.add(WebhookDelivery(alert_id=a.id, webhook="pd", delivered_at=sent))
            session.commit()

            def resolve(alert: Any) -> list[tuple[str, str, bool, bool]]:
                apply_change(session, alert, {"status": "resolved"}, "me", resolve_to=["pd"])
                session.commit()
                rows = session.scalars(
                    select(WebhookDelivery).where(
                        WebhookDelivery.alert_id.in_([first.id, second.id, unsent.id])
                    )
                ).all()
                return sorted(
                    (d.alert_id, d.event, d.delivered_at is not None, d.dead_at is not None)
                    for d in rows
                )

            after = resolve(first)
            assert "resolve" not in {e for _a, e, _s, _d in after}, "second is still open"
            after = resolve(second)
            assert (second.id, "resolve", False, False) in after, "the last one resolves it"
            assert (first.id, "resolve", False, False) not in after
            after = resolve(unsent)
            assert (unsent.id, "alert", False, True) in after, "its trigger is not sent"
            assert (unsent.id, "resolve", False, False) not in after
            dead = session.scalar(
                select(WebhookDelivery.last_error).where(WebhookDelivery.alert_id == unsent.id)
            )
            assert dead == "resolved before it was sent"
            # retrying the dead-lettered deliveries leaves it dead: it would open an incident
            # for a resolved alert; another dead trigger (a receiver that was down) is retried
            session.add(
                WebhookDelivery(alert_id=second.id, webhook="pd2", dead_at=utcnow(), last_error="x")
            )
            session.commit()
            assert retry_dead(session, DeliveryFilter(tenant=tenant)) == 1
            states = session.execute(
                select(WebhookDelivery.webhook, WebhookDelivery.dead_at.is_not(None)).where(
                    WebhookDelivery.alert_id.in_([unsent.id, second.id]),
                    WebhookDelivery.event == "alert",
                )
            ).all()
            assert sorted(states) == [("pd", False), ("pd", True), ("pd2", False)]
    finally:
        engine.dispose()
