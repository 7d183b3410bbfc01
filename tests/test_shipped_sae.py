"""The SAE shipped with the package: loads, matches its files, reproduces its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monitor.sae import TopKSAE, load_sae
from monitor.sae.builtin import default_sae, shipped_eval_sample, shipped_sae_dir

MODEL = "smollm2-135m-instruct"
CLI = str(Path(sys.executable).parent / "safety-monitor")
SHIPPED = shipped_sae_dir(MODEL)

pytestmark = pytest.mark.skipif(SHIPPED is None, reason="no SAE shipped for the built-in model")


def test_shipped_sae_loads_and_matches_its_cfg():
    assert SHIPPED is not None
    cfg = json.loads((SHIPPED / "cfg.json").read_text())
    sae = load_sae(SHIPPED, expected_d_in=576)
    assert isinstance(sae, TopKSAE)
    assert (sae.d_in, sae.d_sae, sae.k) == (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (576, 8192, 32)
    assert cfg["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in sae.stored.values())
    assert sae.hook_layer == 15
    norms = sae.stored["W_dec"].float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8192), rtol=0, atol=2e-3)  # fp16 rounding
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size <= 25 * 2**20


def test_the_pipeline_default_is_the_shipped_sae():
    sae = default_sae(MODEL, 576)
    assert torch.equal(sae.stored["W_enc"], load_sae(SHIPPED).stored["W_enc"])  # type: ignore[arg-type]


@pytest.mark.slow
def test_eval_on_the_bundled_sample_reproduces_the_shipped_metrics():
    assert SHIPPED is not None and shipped_eval_sample(MODEL) is not None
    shipped = json.loads((SHIPPED / "metrics.json").read_text())["bundled_sample"]
    proc = subprocess.run(
        [CLI, "sae", "eval", "--json", "--loss-windows", str(shipped["loss_windows"])],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert measured["tokens"] == shipped["tokens"]
    # same weights, same text: equal up to float summation order
    assert measured["fvu"] == pytest.approx(shipped["fvu"], rel=1e-3)
    assert measured["l0"] == pytest.approx(shipped["l0"], rel=1e-3)
    assert measured["dead_features"] == pytest.approx(shipped["dead_features"], abs=2)
    assert measured["loss_recovered"] == pytest.approx(shipped["loss_recovered"], abs=5e-3)


@pytest.mark.slow
def test_features_show_prints_a_card_with_contexts():
    proc = subprocess.run(
        [CLI, "features", "show", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    card = json.loads(proc.stdout)
    assert card["feature"] == 0
    assert 0.0 <= card["density"] <= 1.0
    if card["density"] > 0:
        assert card["contexts"], "a feature that fires has contexts"
        top = card["contexts"][0]
        assert top["activation"] == pytest.approx(card["max_activation"], rel=2e-2)
    proc = subprocess.run(
        [CLI, "features", "show", "999999"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert "outside 0..8191" in proc.stderr
