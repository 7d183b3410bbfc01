"""Rules over time: a cooldown folds repeat fires into one alert per conversation, and a window
raises one escalation alert when a tenant's fires reach its count."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from detectors.engine import catalog_dir
from detectors.rules import Alerting
from monitor.service.alerting import Recent, decide
from monitor.service.app import create_app
from monitor.service.keys import create_key
from monitor.service.monitored import load_monitored
from monitor.service.settings import PipelineConfig, ServiceSettings

pytestmark = pytest.mark.slow

SCAM_TEXT = (
    "Subject: You have WON $1,000,000!!!\n\nCONGRATULATIONS! Your e-mail address has won ONE "
    "MILLION DOLLARS in our international lottery. To claim your FREE prize, send your bank "
    "account number and a fee of $99. Act NOW!"
)
SCAM = [{"role": "user", "content": SCAM_TEXT}]


def test_cooldown_and_window(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    shutil.copytree(catalog_dir(), catalog)
    rule = yaml.safe_load((catalog / "scam_email.yaml").read_text())
    rule["alerting"] = {
        "cooldown_seconds": 600,
        "window": {"count": 3, "seconds": 600, "severity": "critical"},
    }
    (catalog / "scam_email.yaml").write_text(yaml.safe_dump(rule, sort_keys=False))
    settings = ServiceSettings(database_url=f"sqlite:///{tmp_path / 'm.db'}")
    monitored = load_monitored(PipelineConfig(name="p", catalog=[catalog]), settings)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with TestClient(create_app(settings, [monitored])) as c:
        with Session(c.app.state.monitor.engine) as session:  # type: ignore[attr-defined]
            auth = {"Authorization": f"Bearer {create_key(session, tenant, 'admin')}"}
            session.commit()

        def send(conv: str) -> list[str]:
            r = c.post("/v1/turns", headers=auth, json={"conversation_id": conv, "messages": SCAM})
            assert r.status_code == 200, r.text
            fired = {v["detector"] for v in r.json()["verdicts"] if v["fired"]}
            assert "scam_email" in fired
            ids: list[str] = r.json()["alert_ids"]
            return ids

        def scam_alerts() -> list[dict[str, object]]:
            r = c.get("/v1/alerts", headers=auth, params={"detector": "scam_email"})
            alerts: list[dict[str, object]] = r.json()["alerts"]
            return alerts

        send("a")
        assert len(scam_alerts()) == 1
        send("a")
        assert len(scam_alerts()) == 1, "a repeat fire within the cooldown makes no alert"
        third = send("a")  # third fire for the tenant: the window escalates, once
        alerts = scam_alerts()
        kinds = sorted(str(a["kind"]) for a in alerts)
        assert kinds == ["escalation", "rule"]
        rule_alert = next(a for a in alerts if a["kind"] == "rule")
        escalation = next(a for a in alerts if a["kind"] == "escalation")
        assert rule_alert["suppressed"] == 2, "two repeat fires were counted, not re-sent"
        assert escalation["severity"] == "critical" and escalation["alert_id"] in third
        assert "3 times" in str(escalation["summary"])
        send("b")  # another conversation: not cooled; the window already escalated
        alerts = scam_alerts()
        assert sorted(str(a["kind"]) for a in alerts) == ["escalation", "rule", "rule"]


# ---- the policy alone: no model, no database -------------------------------------------------


def policy(**doc: object) -> Alerting:
    return Alerting.model_validate(doc)


@pytest.mark.parametrize(
    ("alerting", "recent", "expected"),
    [
        (None, Recent(cooling=True, fires_in_window=99), (True, False, False)),
        (policy(), Recent(cooling=True), (True, False, False)),
        (policy(cooldown_seconds=60), Recent(), (True, False, False)),
        (policy(cooldown_seconds=60), Recent(cooling=True), (False, True, False)),
        (
            policy(window={"count": 3, "seconds": 60}),
            Recent(fires_in_window=2),
            (True, False, False),
        ),
        (
            policy(window={"count": 3, "seconds": 60}),
            Recent(fires_in_window=3),
            (True, False, True),
        ),
        (
            policy(window={"count": 3, "seconds": 60}),
            Recent(fires_in_window=5, escalated_in_window=True),
            (True, False, False),
        ),
        (
            policy(cooldown_seconds=60, window={"count": 2, "seconds": 60}),
            Recent(cooling=True, fires_in_window=2),
            (False, True, True),
        ),
    ],
)
def test_decide(alerting: Alerting | None, recent: Recent, expected: tuple[bool, ...]) -> None:
    d = decide(alerting, recent)
    assert (d.alert, d.fold, d.escalate) == expected
