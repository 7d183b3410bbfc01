"""``bench --faults`` at small size: each fault scenario on a real PostgreSQL (stopped and started
with pg_ctl), a real Tansu broker (SIGKILLed and restarted), a webhook receiver (down, then up)
and a real ``safety-monitor worker`` process (SIGKILLed mid-batch, restarted); no acknowledged
turn lost, none stored twice, every alert published once the sink is back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from monitor.bench_faults import SCENARIOS, FaultBenchOptions, run_fault_bench
from monitor.service.monitored import Monitored

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TURNS = 6


@pytest.fixture(scope="module")
def report(monitored: Monitored) -> dict[str, Any]:
    """All four scenarios in one run (one PostgreSQL cluster), as ``bench --faults`` runs them."""
    opts = FaultBenchOptions(turns=TURNS, down_s=1.5, timeout_s=150)
    return run_fault_bench(monitored, opts)


def scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [s for s in report["scenarios"] if s["name"] == name]
    return found


def test_every_scenario_is_reported_with_its_fields(report: dict[str, Any]) -> None:
    assert [s["name"] for s in report["scenarios"]] == list(SCENARIOS)
    fields = {
        "name",
        "acknowledged",
        "stored",
        "lost",
        "duplicate_rows",
        "alerts_published",
        "kafka_duplicates",
        "dead_lettered",
        "recovery_s",
        "timed_out",
    }
    for s in report["scenarios"]:
        assert fields <= set(s), s
    json.dumps(report)  # what --json prints


@pytest.mark.parametrize("name", SCENARIOS)
def test_nothing_acknowledged_is_lost_or_doubled_and_every_alert_goes_out(
    report: dict[str, Any], name: str
) -> None:
    s = scenario(report, name)
    assert not s["timed_out"], s
    assert s["acknowledged"] == TURNS, s
    assert s["stored"] == TURNS and s["lost"] == 0, s
    assert s["duplicate_rows"] == 0, s
    assert s["alerts"] > 0, "the replay traffic makes alerts"
    assert s["alerts_published"] == s["alerts"], s
    assert s["kafka_duplicates"] >= 0 and s["webhook_duplicates"] == 0, s
    assert s["dead_lettered"] == 0, s
    assert isinstance(s["recovery_s"], float) and s["recovery_s"] >= 0, s


def test_the_faults_really_happened(report: dict[str, Any]) -> None:
    """The outage was seen where it should be: clients got 503 while PostgreSQL was down, the
    killed broker lost nothing it had acknowledged, and the worker died mid-batch."""
    assert scenario(report, "postgres")["http_errors"].get("503", 0) > 0
    assert scenario(report, "broker")["lost_in_broker"] == 0
    worker = scenario(report, "worker")
    assert 0 < worker["stored_at_kill"] < TURNS, worker
    assert worker["worker_ready_s"] <= worker["recovery_s"]


def test_the_command_refuses_service_and_faults_together() -> None:
    from monitor.cli import app

    for pair in (
        ["--service", "--faults"],
        ["--guard", "--steering"],
        ["--faults", "--guard"],
        ["--ray", "--steering"],
    ):
        result = CliRunner().invoke(app, ["bench", *pair])
        assert result.exit_code == 2, pair
        assert "give one of --service, --faults, --guard, --steering and --ray" in result.output
    result = CliRunner().invoke(app, ["bench", "--upstream", "http://127.0.0.1:1/v1"])
    assert result.exit_code == 2 and "--upstream goes with --guard" in result.output
