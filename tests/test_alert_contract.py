"""The published alert contract, on real messages: every Kafka message and webhook body validates
against the served JSON Schema; deliveries carry Standard Webhooks signatures that the standard
library and our helper verify (several secrets, replays refused); webhook filters by tenant,
detector and severity; dead-lettered deliveries retried from the CLI and the API; times with
their UTC offset."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import ValidationError
from samples import WEBHOOK_SECRET
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook
from test_alert_delivery import Receiver, app_client, consume, post_scam, receiver, wait_for
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.localservices import Broker, free_port
from monitor.service.contract import AlertPayload, alert_schema
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.runtime import Runtime, SettingsError
from monitor.service.settings import ServiceSettings, WebhookConfig
from monitor.service.sinks.webhook import signed_headers
from monitor.webhooks import WebhookVerificationError, verify

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
OTHER_SECRET = "whsec_" + base64.b64encode(b"a second, rotated-in secret 32b!").decode()
__all__ = ["receiver"]  # the fixture, used by name


def _key(client: Any, tenant: str, role: str) -> dict[str, str]:
    with Session(client.app.state.monitor.engine) as session:
        k = create_key(session, tenant, role)
        session.commit()
    return {"Authorization": f"Bearer {k}"}


def test_real_messages_match_the_served_schema_and_verify(
    pg_url: str, monitored: Monitored, broker: Broker, receiver: Receiver
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    hook = {"name": "ops", "url": receiver.url, "secrets": [WEBHOOK_SECRET, OTHER_SECRET]}
    with app_client(pg_url, monitored, kafka_bootstrap=broker.bootstrap, webhooks=[hook]) as c:
        served = c.get("/v1/schemas/alert")  # no key
        assert served.status_code == 200
        doc = c.get("/v1/schemas/asyncapi").json()
        ids = post_scam(c, tenant, "conv-1")
        wait_for(lambda: len(receiver.calls) >= len(ids))
        wait_for(lambda: len(_on_kafka(broker, tenant)) >= len(ids))
        api = c.get("/v1/alerts", headers=_key(c, tenant, "read")).json()
    schema = served.json()
    assert schema == alert_schema() and schema["$id"].endswith("/alert/v1.json")
    validator = jsonschema.Draft202012Validator(schema)
    on_kafka = _on_kafka(broker, tenant)
    bodies = [json.loads(body) for _h, body in receiver.calls]
    assert sorted(m["alert_id"] for m in on_kafka) == sorted(ids)
    for message in on_kafka + bodies:
        validator.validate(message)
        assert dt.datetime.fromisoformat(message["created_at"]).utcoffset() == dt.timedelta(0)
    bad = {**on_kafka[0], "severity": "urgent"}
    assert not validator.is_valid(bad), "the schema is not vacuous"
    assert (
        doc["asyncapi"].startswith("3.") and doc["channels"]["alerts"]["address"] == "safety.alerts"
    )
    assert "Alert" in doc["components"]["schemas"] and "TrafficTurn" in doc["components"]["schemas"]

    for headers, body in receiver.calls:
        assert headers["webhook-id"] == json.loads(body)["alert_id"]
        assert len(headers["webhook-signature"].split(" ")) == 2, "one signature per secret"
        # The standard library verifies with either secret (rotation), and so does our helper.
        for secret in (WEBHOOK_SECRET, OTHER_SECRET):
            Webhook(secret).verify(body, headers)
        assert verify(body, headers, [OTHER_SECRET]).alert_id == headers["webhook-id"]
        with pytest.raises(WebhookVerificationError):
            verify(body + b" ", headers, [WEBHOOK_SECRET])  # a body changed on the way
        with pytest.raises(WebhookVerificationError):
            verify(body, headers, ["whsec_" + base64.b64encode(b"x" * 32).decode()])
    for alert in api["alerts"]:  # the API's times carry their offset too
        assert dt.datetime.fromisoformat(alert["created_at"]).utcoffset() == dt.timedelta(0)


def _on_kafka(broker: Broker, tenant: str) -> list[dict[str, Any]]:
    return [v for _k, v in consume(broker.bootstrap) if v["tenant"] == tenant]


def test_a_replayed_delivery_is_refused() -> None:
    body = json.dumps(_payload()).encode()
    fresh = signed_headers([WEBHOOK_SECRET], "a-1", body)
    assert verify(body, fresh, [WEBHOOK_SECRET]).alert_id == "a-1"
    ten_minutes_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    old = signed_headers([WEBHOOK_SECRET], "a-1", body, at=ten_minutes_ago)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(body, old, [WEBHOOK_SECRET])
    with pytest.raises(WebhookVerificationError, match="webhook-id"):
        verify(body, signed_headers([WEBHOOK_SECRET], "other-id", body), [WEBHOOK_SECRET])


def _payload() -> dict[str, Any]:
    return AlertPayload.model_validate(
        {
            "alert_id": "a-1",
            "tenant": "t",
            "conversation_id": "c",
            "turn_id": "u",
            "pipeline": "p",
            "detector": "scam_email",
            "kind": "escalation",
            "severity": "high",
            "score": 3.0,
            "summary": "s",
            "created_at": dt.datetime.now(dt.UTC),
            "evidence": {"fires": 3, "window_seconds": 60},
            "metadata": {},
        }
    ).model_dump(mode="json")


def test_filters_choose_the_webhook_and_bad_ones_refuse_to_start(
    pg_url: str, monitored: Monitored, receiver: Receiver
) -> None:
    wanted, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    hooks = [
        {"name": "mine", "url": receiver.url, "secrets": [WEBHOOK_SECRET], "tenants": [wanted]},
        {
            "name": "critical-only",
            "url": receiver.url,
            "secrets": [WEBHOOK_SECRET],
            "min_severity": "critical",
        },
        {
            "name": "no-scams",
            "url": receiver.url,
            "secrets": [WEBHOOK_SECRET],
            "detectors": ["sycophancy"],
        },
    ]
    with app_client(pg_url, monitored, webhooks=hooks) as c:
        mine = post_scam(c, wanted, "c1")
        post_scam(c, other, "c2")
        wait_for(lambda: len(receiver.calls) >= len(mine))
        others = c.get("/v1/alerts", headers=_key(c, other, "read")).json()["alerts"]
        listed = c.get("/v1/webhooks/deliveries", headers=_key(c, other, "read")).json()
    # The scam turn's alerts are high and not sycophancy: only the tenant filter lets them in.
    assert others and all(a["severity"] == "high" for a in others), others
    assert "sycophancy" not in {a["detector"] for a in others}
    assert sorted(h["webhook-id"] for h, _b in receiver.calls) == sorted(mine)
    assert listed["deliveries"] == [], "nothing of the other tenant matched a filter"

    typo = WebhookConfig(
        name="x", url=receiver.url, secrets=[WEBHOOK_SECRET], detectors=["scam_emial"]
    )
    settings = ServiceSettings(database_url=pg_url, webhooks=[typo])
    with pytest.raises(SettingsError, match=r"webhooks\[0\] \(x\).detectors: .* 'scam_emial'"):
        Runtime(settings, [monitored])
    for bad, why in (
        ("s3cret-for-tests", "whsec_"),
        ("whsec_###", "base64"),
        ("whsec_YWJj", "24-64"),
    ):
        with pytest.raises(ValidationError) as info:
            WebhookConfig(name="x", url=receiver.url, secrets=[bad])
        (problem,) = info.value.errors()
        assert problem["loc"] == ("secrets",) and why in problem["msg"], problem
        assert bad not in problem["msg"], "the secret is named, not echoed"


def test_dead_deliveries_are_retried_from_the_api_and_the_cli(
    pg_url: str, monitored: Monitored, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = Receiver(status=500)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    hook = {"name": f"flaky-{tenant}", "url": failing.url, "secrets": [WEBHOOK_SECRET]}
    try:
        with app_client(pg_url, monitored, webhooks=[hook], webhook_max_attempts=1) as c:
            ids = post_scam(c, tenant, "c1")
            read, admin = _key(c, tenant, "read"), _key(c, tenant, "admin")

            def status() -> list[str]:
                rows = c.get("/v1/webhooks/deliveries", headers=read).json()["deliveries"]
                return sorted(d["status"] for d in rows)

            wait_for(lambda: status() == ["dead"] * len(ids))
            assert c.post("/v1/webhooks/deliveries/retry", json={}, headers=read).status_code == 403
            bad = c.post(
                "/v1/webhooks/deliveries/retry", json={"since": "yesterday"}, headers=admin
            )
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "since"]
            failing.status = 200  # the receiver is fixed
            r = c.post("/v1/webhooks/deliveries/retry", json={}, headers=admin)
            assert r.status_code == 200 and r.json() == {"retried": len(ids)}
            wait_for(lambda: status() == ["delivered"] * len(ids))

            # Dead again, then retried by an operator from the command line.
            failing.status = 500
            ids2 = post_scam(c, tenant, "c2")
            wait_for(lambda: status().count("dead") == len(ids2))
            failing.status = 200
            monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", pg_url)
            refused = CliRunner().invoke(cli, ["deliveries", "retry"])
            assert refused.exit_code == 2 and "--dead" in refused.output
            done = CliRunner().invoke(cli, ["deliveries", "retry", "--dead", "--tenant", tenant])
            assert done.exit_code == 0, done.output
            assert f"{len(ids2)} dead-lettered deliveries due again" in done.output
            wait_for(lambda: status() == ["delivered"] * (len(ids) + len(ids2)))
    finally:
        failing.close()


def test_the_example_receiver_accepts_signed_alerts_once_and_refuses_others() -> None:
    port = free_port()
    env = {**os.environ, "WEBHOOK_SECRETS": f"{OTHER_SECRET},{WEBHOOK_SECRET}"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "webhook_receiver.py"), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/hook"
        body = json.dumps(_payload()).encode()
        for _ in range(100):  # until it listens
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        headers = signed_headers([WEBHOOK_SECRET], "a-1", body)
        assert httpx.post(url, content=body, headers=headers).status_code == 204
        assert httpx.post(url, content=body, headers=headers).status_code == 204  # a retry
        forged = {**headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
        assert httpx.post(url, content=body, headers=forged).status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [a["alert_id"] for a in lines] == ["a-1"], "printed once, the retry de-duplicated"
    assert "refused" in err
