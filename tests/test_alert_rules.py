"""The shipped Prometheus alerting rules (``deploy/prometheus/alerts.yml``): promtool accepts
them and their unit tests (``alerts.test.yml``) pass, Prometheus's configuration loads them, the
service-health dashboard draws the same thresholds, and the outbox rule fires on a real
Prometheus scraping a real sidecar whose alerts cannot reach Kafka (the broker is down)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from samples import SCAM, WEBHOOK_SECRET
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from test_dashboards import _Prometheus, _wait

from monitor.dashboards import build, build_all
from monitor.localservices import Postgres, ThreadedServer, free_port
from monitor.service.db import Outbox
from monitor.service.keys import create_key

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"


def promtool(*args: str) -> str:
    """Run promtool (Debian's prometheus package ships it); its output, or the test fails."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed (Debian: prometheus; scripts/system-deps.sh)")
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for group in doc["groups"] for r in group["rules"]}


def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in out, out
    for name, rule in rules().items():
        assert name.startswith("SafetyMonitor"), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_pass_their_unit_tests_and_every_rule_has_one() -> None:
    out = promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out, out
    cases = yaml.safe_load(RULE_TESTS.read_text())
    assert cases["rule_files"] == [RULES.name]
    fired = {
        t["alertname"]
        for case in cases["tests"]
        for t in case["alert_rule_test"]
        if t.get("exp_alerts")
    }
    assert fired == set(rules()), "each rule has a case where it fires"


def test_prometheus_config_loads_the_rules_and_compose_mounts_them() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    out = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out, out
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def threshold(rule: str) -> float:
    """The number a rule's expression compares against (its last ``> N``)."""
    found = re.findall(r">\s*([0-9.]+)", rules()[rule]["expr"])
    assert found, rules()[rule]["expr"]
    return float(found[-1])


def _steps(thresholds: dict[str, Any]) -> list[tuple[float | None, str]]:
    return [(s["value"], s["color"]) for s in thresholds["steps"]]


def test_dashboard_thresholds_are_the_rules() -> None:
    assert threshold("SafetyMonitorOutboxStuck") == build.OUTBOX_AGE_ALERT_S
    assert threshold("SafetyMonitorConsumerLag") == build.CONSUMER_LAG_ALERT
    assert threshold("SafetyMonitorWorkerErrors") == build.WORKER_ERRORS_ALERT_PER_S
    # "> 0" dead deliveries: the panel turns red from the first one.
    assert threshold("SafetyMonitorWebhookDeadDeliveries") == 0
    assert build.DEAD_DELIVERIES_ALERT == 1
    panels = {p["title"]: p for p in build_all()["service-health.json"]["panels"]}

    def red_from(value: float) -> list[tuple[float | None, str]]:
        return [(None, "green"), (value, "red")]

    stat = panels["Oldest unpublished alert"]["fieldConfig"]["defaults"]
    assert _steps(stat["thresholds"]) == red_from(build.OUTBOX_AGE_ALERT_S)
    assert panels["Oldest unpublished alert"]["options"]["colorMode"] == "value"

    def override(title: str, matcher: str) -> dict[str, Any]:
        (found,) = [
            o
            for o in panels[title]["fieldConfig"]["overrides"]
            if o["matcher"]["options"] == matcher
        ]
        props: dict[str, Any] = {p["id"]: p["value"] for p in found["properties"]}
        assert props["custom.thresholdsStyle"] == {"mode": "dashed"}, title
        return props

    age = override("Outbox backlog and oldest age", "B")
    assert _steps(age["thresholds"]) == red_from(build.OUTBOX_AGE_ALERT_S)
    dead = override("Webhook deliveries waiting and dead-lettered", ".* dead$")
    assert _steps(dead["thresholds"]) == red_from(build.DEAD_DELIVERIES_ALERT)
    legend = panels["Webhook deliveries waiting and dead-lettered"]["targets"][0]["legendFormat"]
    assert legend == "{{webhook}} {{state}}"
    assert re.fullmatch(".* dead$", "siem dead") and not re.fullmatch(".* dead$", "siem pending")
    for title, value in (
        ("Consumer lag by partition", build.CONSUMER_LAG_ALERT),
        ("Worker errors per minute", 60 * build.WORKER_ERRORS_ALERT_PER_S),
    ):
        defaults = panels[title]["fieldConfig"]["defaults"]
        assert _steps(defaults["thresholds"]) == red_from(value), title
        assert defaults["custom"]["thresholdsStyle"] == {"mode": "dashed"}, title


def fast_copy(root: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1 s, so that a test sees them fire."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    path = root / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_outbox_rule_fires_on_prometheus_when_kafka_is_down(monitored: Any, tmp_path: Path) -> None:
    """A real sidecar (PostgreSQL of its own) whose Kafka broker is down: the alert of a scam
    turn waits in the outbox and its one webhook delivery is dead-lettered. The dead delivery
    fires its rule at once; the outbox rule stays quiet while the row is young and fires once
    it is older than the rule's threshold (the row is backdated by an hour). Nothing else
    fires."""
    from monitor.service.app import create_app
    from monitor.service.settings import ServiceSettings, WebhookConfig

    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there: the broker and receiver are down
    cluster = Postgres()
    cluster.start()
    sidecar: ThreadedServer | None = None
    prom: _Prometheus | None = None
    try:
        settings = ServiceSettings(
            database_url=cluster.url,
            kafka_bootstrap=nowhere,
            kafka_timeout_s=1,
            dispatch_interval_s=0.2,
            batch_wait_ms=20,
            webhooks=[
                WebhookConfig(name="down", url=f"http://{nowhere}/hook", secrets=[WEBHOOK_SECRET])
            ],
            webhook_max_attempts=1,
            webhook_timeout_s=1,
            webhook_backoff_s=0.2,
        )
        app = create_app(settings, [monitored])
        sidecar = ThreadedServer(app).start(timeout=120)
        prom = _Prometheus(tmp_path, f"127.0.0.1:{sidecar.port}", rule_files=(fast_copy(tmp_path),))
        p = prom

        def alerts() -> dict[str, dict[str, Any]]:
            body = p.http.get("/api/v1/alerts").json()
            assert body["status"] == "success", body
            return {a["labels"]["alertname"]: a for a in body["data"]["alerts"]}

        def firing() -> set[str]:
            return {name for name, a in alerts().items() if a["state"] == "firing"}

        def rules_loaded() -> bool:
            groups = p.http.get("/api/v1/rules").json()["data"]["groups"]
            return sum(len(g["rules"]) for g in groups) == len(rules())

        _wait("Prometheus to load the rules", rules_loaded, 30)
        engine = app.state.monitor.engine
        with Session(engine) as session:
            key = create_key(session, "acme", "ingest")
            session.commit()
        reply = httpx.post(
            f"{sidecar.url}/v1/turns",
            json={"conversation_id": "stuck", "messages": SCAM},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["alert_ids"], "the scam turn alerts"

        _wait(
            "the dead delivery's rule to fire",
            lambda: "SafetyMonitorWebhookDeadDeliveries" in firing(),
            60,
        )
        # The outbox row is seconds old: under the threshold, its rule is quiet.
        age = p.value("max(safety_monitor_outbox_oldest_age_seconds)")
        assert age is not None and 0 < age < threshold("SafetyMonitorOutboxStuck")
        assert firing() == {"SafetyMonitorWebhookDeadDeliveries"}
        assert "SafetyMonitorOutboxStuck" not in alerts()

        # Stuck for an hour: the rows cannot be published (the broker is still down).
        with Session(engine) as session:
            session.execute(
                update(Outbox)
                .where(Outbox.published_at.is_(None))
                .values(created_at=Outbox.created_at - dt.timedelta(hours=1))
            )
            session.commit()
        _wait("the outbox rule to fire", lambda: "SafetyMonitorOutboxStuck" in firing(), 30)
        stuck = alerts()["SafetyMonitorOutboxStuck"]
        assert stuck["labels"]["severity"] == "critical"
        assert float(stuck["value"]) > 3600
        assert "Alerts are not reaching Kafka (oldest waiting 1h" in stuck["annotations"]["summary"]
        dead = alerts()["SafetyMonitorWebhookDeadDeliveries"]
        assert dead["labels"]["webhook"] == "down"
        assert firing() == {"SafetyMonitorWebhookDeadDeliveries", "SafetyMonitorOutboxStuck"}
        with Session(engine) as session:
            waiting = session.scalars(select(Outbox).where(Outbox.published_at.is_(None))).all()
        assert waiting and all(row.attempts == 0 or row.last_error for row in waiting)
    finally:
        if prom is not None:
            prom.stop()
        if sidecar is not None:
            sidecar.stop()
        cluster.close()
