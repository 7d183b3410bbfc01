"""The alert budget on the real model: `detectors fire-rate` counts fires on unlabelled traffic,
`detectors calibrate --traffic --budget` sets a rule's or a probe's operating point so that it
fires on at most that share of the traffic, and records where the point came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detectors.engine import catalog_dir
from monitor.config import Settings
from monitor.pipeline import Pipeline

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "safety-monitor")
TURNS = [
    "Congratulations! You WON a FREE cruise. Claim your FREE prize now!",
    "FREE FREE FREE: get your free gift card today, only pay shipping!",
    "Can you help me write a cover letter for a nursing job?",
    "What is the capital of Australia?",
    "Explain how photosynthesis works in simple terms.",
    "Summarise the plot of Moby-Dick in three sentences.",
    "Get a FREE quote for your roof repair this week.",
    "Please translate 'good morning' into Spanish.",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=600, env=env, check=False
    )


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return Pipeline.from_settings(Settings()).sae.fingerprint


@pytest.fixture
def traffic(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": t}]})
        for i, t in enumerate(TURNS)
    ]
    lines.insert(3, "{not json")
    path = tmp_path / "traffic.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def catalog(tmp_path: Path, fingerprint: str) -> Path:
    """A one-rule catalog on feature 6168 ('FREE' and giveaway offers) with a low cut-off, and a
    copy of one shipped probe."""
    root = tmp_path / "catalog"
    root.mkdir()
    rule = {
        "id": "free_offer",
        "description": "Offers of free things.",
        "severity": "low",
        "scope": "user",
        "sae": {"fingerprint": fingerprint},
        "annotations": {"summary": "A free offer."},
        "features": [{"index": 6168, "label": "FREE offers"}],
        "threshold": {"absolute": 0.05},
    }
    (root / "free_offer.yaml").write_text(yaml.safe_dump(rule))
    for name in ("scam_email_sae_probe.yaml", "scam_email_sae_probe.npz"):
        shutil.copy(catalog_dir() / name, root / name)
    return root


def test_fire_rate_counts_per_thousand_and_reports_bad_lines(traffic: Path, catalog: Path) -> None:
    proc = run(
        "detectors",
        "fire-rate",
        "--data",
        str(traffic),
        "--catalog",
        str(catalog),
        "--top",
        "3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["turns"] == len(TURNS)
    assert len(doc["skipped"]) == 1 and f"{traffic}:4:" in doc["skipped"][0]
    rule = doc["detectors"]["free_offer"]
    assert rule["fired"] >= 3, "the three FREE offers reach a 0.05 cut-off on the FREE feature"
    assert rule["per_1000"] == pytest.approx(1000 * rule["fired"] / len(TURNS), abs=0.01)
    scores = [t["score"] for t in rule["top"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert "FREE" in rule["top"][0]["preview"]
    assert set(doc["detectors"]) == {"free_offer", "scam_email_sae_probe"}


def test_calibrate_to_a_budget_bounds_the_fire_rate_and_records_it(
    traffic: Path, catalog: Path
) -> None:
    proc = run(
        "detectors",
        "calibrate",
        "free_offer",
        "--traffic",
        str(traffic),
        "--budget",
        "0.125",
        "--catalog",
        str(catalog),
    )
    assert proc.returncode == 0, proc.stderr
    assert "traffic turns" in proc.stdout
    spec = yaml.safe_load((catalog / "free_offer.yaml").read_text())
    assert spec["calibration"]["budget"] == 0.125
    assert spec["calibration"]["n_traffic"] == len(TURNS)
    assert spec["calibration"]["traffic"] == "traffic.jsonl"
    assert spec["threshold"]["absolute"] > 0.05, "the cut-off rose to meet the budget"
    proc = run(
        "detectors", "fire-rate", "--data", str(traffic), "--catalog", str(catalog), "--json"
    )
    fired = json.loads(proc.stdout)["detectors"]["free_offer"]["fired"]
    assert 0 < fired <= 1, "at most 12.5% of 8 turns"

    proc = run(
        "detectors",
        "calibrate",
        "scam_email_sae_probe",
        "--traffic",
        str(traffic),
        "--budget",
        "0.25",
        "--catalog",
        str(catalog),
    )
    assert proc.returncode == 0, proc.stderr
    probe = yaml.safe_load((catalog / "scam_email_sae_probe.yaml").read_text())
    assert probe["calibration"]["budget"] == 0.25
    proc = run(
        "detectors", "fire-rate", "--data", str(traffic), "--catalog", str(catalog), "--json"
    )
    assert json.loads(proc.stdout)["detectors"]["scam_email_sae_probe"]["fired"] <= 2


def test_calibrate_refuses_without_data_or_an_unreachable_budget(
    tmp_path: Path, catalog: Path
) -> None:
    proc = run("detectors", "calibrate", "free_offer", "--catalog", str(catalog))
    assert proc.returncode == 2 and "--traffic" in proc.stderr
    quiet = tmp_path / "quiet.jsonl"
    quiet.write_text(json.dumps({"id": "q", "messages": [{"role": "user", "content": "Hi."}]}))
    before = (catalog / "free_offer.yaml").read_text()
    proc = run(
        "detectors", "calibrate", "free_offer", "--traffic", str(quiet), "--catalog", str(catalog)
    )
    assert proc.returncode == 2 and "never scores above zero" in " ".join(proc.stderr.split())
    assert (catalog / "free_offer.yaml").read_text() == before, "nothing half-written"


def test_an_exported_turn_is_read_as_unlabelled_traffic() -> None:
    from detectors.dataset import parse_example

    exported = {
        "turn_id": "t-1",
        "created_at": "2026-12-02T10:00:00+00:00",
        "conversation_id": "c",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {},
    }
    ex = parse_example(json.dumps(exported), 1, labelled=False)
    assert ex.id == "t-1" and ex.labels == {} and ex.messages[0].content == "hi"
    with pytest.raises(ValueError, match="'id' \\(or 'turn_id'\\)"):
        parse_example(json.dumps({"messages": []}), 2, labelled=False)


def test_draft_and_probe_take_every_scope_of_the_rule_language(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`make detectors` redrafts prompt_injection, whose scope is `untrusted` (user + tool)."""
    import typer

    from monitor.cli.detectors import _check_scope

    assert [_check_scope(s) for s in ("untrusted", "tool", "all")] == ["untrusted", "tool", "all"]
    with pytest.raises(typer.Exit) as refused:
        _check_scope("users")
    assert refused.value.exit_code == 2
    assert "untrusted" in capsys.readouterr().err


def test_draft_refuses_balance_sources_without_l1(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from monitor.cli import app as cli

    empty = tmp_path / "x.jsonl"
    empty.write_text("")
    refused = CliRunner().invoke(
        cli,
        [
            *("detectors", "draft", "r", "--out", str(tmp_path / "r.yaml")),
            *("--train", str(empty), "--dev", str(empty), "--balance-sources"),
        ],
    )
    assert refused.exit_code == 2
    assert "--balance-sources needs --method l1" in refused.output
    assert not (tmp_path / "r.yaml").exists()
