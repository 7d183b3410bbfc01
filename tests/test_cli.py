"""The command line, run as a user runs it: a subprocess of the installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.sae import save_sae
from monitor.sae.builtin import placeholder_topk_sae, shipped_sae_dir

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "safety-monitor")


def run(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def small_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sae = placeholder_topk_sae(576, d_sae=512, k=8)
    sae.cfg.update(hook_name="blocks.5.hook_resid_post", hook_layer=5)
    return save_sae(sae, tmp_path_factory.mktemp("sae"))


def test_encode_json_lists_each_token_with_its_top_features(small_sae: Path):
    proc = run("encode", "Verify your account now", "--sae", str(small_sae), "--top", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["layer"] == 6, "the SAE's hook (resid_post of block 5) sets the layer"
    tokens = doc["inputs"][0]["tokens"]
    assert "".join(t["token"] for t in tokens) == "Verify your account now"
    assert tokens[0]["features"] == [], "the first token is the attention sink"
    for t in tokens[1:]:
        assert t["role"] == "user"
        assert 1 <= len(t["features"]) <= 3
        values = [v for _, v in t["features"]]
        assert values == sorted(values, reverse=True)
        assert all(0 <= i < 512 for i, _ in t["features"])


def test_encode_messages_file_marks_roles(small_sae: Path, tmp_path: Path):
    chat = tmp_path / "chat.json"
    chat.write_text(
        json.dumps(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
        )
    )
    proc = run("encode", "--messages", str(chat), "--sae", str(small_sae), "--json")
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)["inputs"][0]["tokens"]
    said = "".join(t["token"] for t in tokens if t["role"] == "assistant")
    assert said == "Hello there"


def test_encode_table_shows_tokens_windows_and_cut_count(small_sae: Path):
    proc = run("encode", "word " * 50, "--sae", str(small_sae), "--max-tokens", "10")
    assert proc.returncode == 0, proc.stderr
    assert "51 tokens in 7 windows" in proc.stdout, "read whole, in windows of 10"
    assert "cut from the front" not in proc.stdout
    proc = run(
        "encode",
        "word " * 50,
        "--sae",
        str(small_sae),
        "--max-tokens",
        "10",
        env={"SAFETY_MONITOR_MAX_INPUT_TOKENS": "20"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "20 tokens in 3 windows, 31 cut from the front by the context limit" in proc.stdout


def test_empty_text_reports_no_tokens(small_sae: Path):
    proc = run("encode", "", "--sae", str(small_sae))
    assert proc.returncode == 0, proc.stderr
    assert "no tokens" in proc.stdout


def test_bad_inputs_exit_non_zero_naming_the_problem(small_sae: Path, tmp_path: Path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    proc = run("encode", "--file", str(binary), "--sae", str(small_sae))
    assert proc.returncode == 2
    assert "not UTF-8 text" in proc.stderr

    chat = tmp_path / "bad.json"
    chat.write_text(json.dumps([{"role": "robot", "content": "beep"}]))
    proc = run("encode", "--messages", str(chat), "--sae", str(small_sae))
    assert proc.returncode == 2
    assert "messages[0].role" in proc.stderr

    proc = run("encode", "hello", "--sae", str(tmp_path / "missing-sae"))
    assert proc.returncode == 2
    assert "no such SAE directory" in proc.stderr

    proc = run("encode", "hello", "--model", "gemma3-270m", "--sae", str(small_sae))
    assert proc.returncode == 2
    assert "d_in is 576 but the model's residual stream is 640 wide" in proc.stderr

    proc = run("encode", "hello", "--layer", "99", "--sae", str(small_sae))
    assert proc.returncode == 2
    assert "layer must be in 1..30" in proc.stderr


def test_demo_encodes_the_bundled_samples():
    proc = run("demo", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    names = [i["name"] for i in doc["inputs"]]
    assert names == [
        "scam email (pasted by a user)",
        "code with a hidden master password",
        "plain text",
    ]
    roles = {t["role"] for i in doc["inputs"] for t in i["tokens"]}
    assert roles == {"template", "system", "user", "assistant"}
    if shipped_sae_dir("smollm2-135m-instruct") is None:
        assert "untrained" in proc.stderr, "the placeholder SAE is announced, not passed off"
    else:
        assert doc["sae"] == {"architecture": "topk", "d_sae": 8192}
        assert "untrained" not in proc.stderr


def test_bench_json_reports_the_agreed_keys(small_sae: Path):
    proc = run(
        "bench",
        "--json",
        "--sae",
        str(small_sae),
        "--batches",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--repeats",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in (
        "pipeline_tokens_per_s",
        "baseline_tokens_per_s",
        "speedup",
        "roofline_fraction",
        "topk_agreement",
        "peak_rss_mb",
    ):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["tokens"] == 64
    assert report["topk_agreement"] >= 0.999
    assert report["max_abs_diff"] < 1e-2
