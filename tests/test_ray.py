"""Capture and SAE training on a real local Ray cluster (2 CPUs): same shards, same quality,
resumable, and clear errors before any work for a bad address, too many workers, other shards."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_dictionary import DOCS, MODEL
from test_training import options, synthetic_activations
from typer.testing import CliRunner

from monitor.cli import app
from monitor.models import LoadedModel
from monitor.training.capture import (
    ActivationShards,
    CaptureMismatchError,
    CaptureOptions,
    _save_atomic,
    capture_split,
)
from monitor.training.ray_capture import capture_split_ray
from monitor.training.ray_cluster import RayClusterError, WorkerShape, check_room, connect
from monitor.training.ray_train import train_on_ray
from monitor.training.trainer import TopKTrainer, export_checkpoint, read_checkpoint

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster() -> Any:
    module, _ = connect(None, 1, 1, gpu=False)
    yield module
    module.shutdown()


def _corpus(root: Path) -> Path:
    root.mkdir()
    docs = DOCS * 3
    (root / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


def _fake_capture(dest: Path, data: np.ndarray, shards: int, model: str = "synthetic") -> Path:
    """A capture directory in ``sae capture``'s layout holding ``data``, in ``shards`` shards."""
    dest.mkdir(parents=True)
    for k, part in enumerate(np.array_split(data, shards)):
        _save_atomic(dest / f"acts_{k:05d}.npy", part)
        rows = np.stack([np.arange(len(part)), np.ones(len(part))], 1).astype(np.int32)
        _save_atomic(dest / f"rows_{k:05d}.npy", rows)
    info = {"model": model, "layer": 1, "ctx": 16, "d_model": data.shape[1], "shards": shards}
    (dest / "capture.json").write_text(json.dumps(info | {"rows": len(data)}))
    return dest


def _fvu(sae: Any, data: np.ndarray) -> float:
    x = torch.from_numpy(data.astype(np.float32))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return float((x_hat - x).pow(2).sum(1).mean() / (x - x.mean(0)).pow(2).sum(1).mean())


@pytest.mark.slow
def test_ray_capture_writes_the_local_capture_and_resumes(
    cluster: Any, tmp_path: Path, full_models: dict[str, LoadedModel], cache_dir: Path
):
    model = full_models[MODEL]
    corpus = _corpus(tmp_path / "corpus")
    opts = CaptureOptions(layer=4, ctx=32, shard_windows=2)
    local = capture_split(corpus, "train", tmp_path / "local", model, opts)
    shape = WorkerShape(1, False)
    args = (model.name, model.tokenizer, model.adapter.d_model, cache_dir, "cpu", opts)
    remote = capture_split_ray(cluster, corpus, "train", tmp_path / "ray", *args, 2, shape)
    assert remote["rows"] == local["rows"] and remote["shards"] == local["shards"] >= 3
    a, b = ActivationShards(tmp_path / "local/train"), ActivationShards(tmp_path / "ray/train")
    np.testing.assert_array_equal(a.rows_meta(), b.rows_meta())
    np.testing.assert_allclose(
        a.load_all().astype(np.float32), b.load_all().astype(np.float32), rtol=0.01, atol=0.02
    )
    # interrupted: one shard missing and no completion marker; the rerun writes only that shard
    dest = tmp_path / "ray/train"
    (dest / "capture.json").unlink()
    (dest / "acts_00001.npy").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("acts_*.npy")}
    capture_split_ray(cluster, corpus, "train", tmp_path / "ray", *args, 2, shape)
    after = {p.name: p.stat().st_mtime_ns for p in dest.glob("acts_*.npy")}
    assert set(after) - set(before) == {"acts_00001.npy"}
    assert all(after[n] == t for n, t in before.items())
    np.testing.assert_array_equal(ActivationShards(dest).load_all(), b.load_all())


@pytest.mark.slow
def test_a_capture_of_another_model_or_layer_is_refused(
    tmp_path: Path, full_models: dict[str, LoadedModel]
):
    model = full_models[MODEL]
    corpus = _corpus(tmp_path / "corpus")
    capture_split(corpus, "train", tmp_path / "a", model, CaptureOptions(layer=4, ctx=32))
    with pytest.raises(CaptureMismatchError, match="layer 4"):
        capture_split(corpus, "train", tmp_path / "a", model, CaptureOptions(layer=5, ctx=32))


def test_data_parallel_training_matches_single_process_quality_and_resumes(
    cluster: Any, tmp_path: Path
):
    both = synthetic_activations(rows=8192 + 2048)  # one dictionary, one offset
    data, held_out = both[:8192], both[8192:]
    acts = _fake_capture(tmp_path / "acts" / "train", data, shards=4)
    opts = options(epochs=2.0)
    single = TopKTrainer(data, opts)
    single.train()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    result = train_on_ray(acts, straight, opts, 2, WorkerShape(1, False))
    assert result["step"] == single.total_steps == 64
    fvu_single = _fvu(single.export(), held_out)
    fvu_ray = _fvu(export_checkpoint(read_checkpoint(straight / "checkpoint.pt")), held_out)
    assert fvu_single < 0.3
    assert abs(fvu_ray - fvu_single) < 0.01, (fvu_ray, fvu_single)
    # every worker held the same parameters: rank 0's checkpoint decodes unit-norm rows
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    w_dec = a["params"]["W_dec"]
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(len(w_dec)), rtol=0, atol=1e-5)
    # a run cut short at step 25 (checkpoints every 10) resumes to the same bits
    assert train_on_ray(acts, resumed, opts, 2, WorkerShape(1, False), max_steps=25)["step"] == 25
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["step"] == 25
    train_on_ray(acts, resumed, opts, 2, WorkerShape(1, False))
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert b["step"] == 64 and b["workers"] == 2
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=0, atol=0)
    torch.testing.assert_close(a["tokens_since_fired"], b["tokens_since_fired"], rtol=0, atol=0)


def test_bad_cluster_requests_fail_before_any_work(cluster: Any, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody answers there
    runner = CliRunner()
    corpus = _corpus(tmp_path / "corpus")
    cluster.shutdown()  # --address must be tried from a fresh driver
    try:
        result = runner.invoke(
            app,
            ["sae", "capture", "--corpus", str(corpus), "--out", str(tmp_path / "o"),
             "--split", "train", "--ray", "--address", f"127.0.0.1:{port}"],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"nothing answers at the Ray address 127.0.0.1:{port}" in result.output
        assert not (tmp_path / "o").exists()
    finally:
        connect(None, 1, 1, gpu=False)
    with pytest.raises(RayClusterError, match="need 8 CPU, but the local cluster has 2"):
        connect(None, 4, 2, gpu=False)
    with pytest.raises(RayClusterError, match="GPU"):
        check_room({"CPU": 16.0}, 1, WorkerShape(1, True), "here")


def test_training_refuses_shards_of_another_model(tmp_path: Path):
    _fake_capture(tmp_path / "acts" / "train", synthetic_activations(rows=512), 1, "other-model")
    result = CliRunner().invoke(
        app,
        ["sae", "train", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "run"),
         "--model", "smollm2-135m-instruct", "--ray"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "captured from model 'other-model'" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_llama3_end_to_end_on_ray(cluster: Any, tmp_path: Path, cache_dir: Path):
    """A Llama 3 model directory: Ray capture and Ray training through the CLI, then the pipeline
    reads the trained SAE at the layer its cfg names, with roles from Llama 3's template."""
    from monitor.config import Settings
    from monitor.messages import Role
    from monitor.models.llama3 import build_random_llama3
    from monitor.pipeline import Pipeline

    model_dir = build_random_llama3(tmp_path / "llama3", cache_dir)
    corpus = _corpus(tmp_path / "corpus")
    (corpus / "heldout.jsonl").write_text((corpus / "train.jsonl").read_text())
    acts, run = tmp_path / "acts", tmp_path / "run"
    runner = CliRunner()
    common = ["--model", str(model_dir), "--ray", "--workers", "1", "--threads", "1"]
    result = runner.invoke(
        app,
        ["sae", "capture", "--corpus", str(corpus), "--out", str(acts), "--layer", "2",
         "--ctx", "32", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((acts / "train" / "capture.json").read_text())
    assert info["model"] == str(model_dir) and info["d_model"] == 64 and info["layer"] == 2
    result = runner.invoke(
        app,
        ["sae", "train", "--activations", str(acts), "--out", str(run), "--d-sae", "128",
         "--k", "8", "--batch-size", "64", "--epochs", "1", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["model_name"] == str(model_dir)
    settings = Settings(model=str(model_dir), sae=run / "sae", cache_dir=cache_dir)
    pipeline = Pipeline.from_settings(settings)
    assert pipeline.layer == 2
    conversation = [
        {"role": "user", "content": "Is this e-mail legit?"},
        {"role": "assistant", "content": "No, it asks for your bank password."},
    ]
    (encoded,) = pipeline.encode([conversation])
    assistant = [i for i, r in enumerate(encoded.roles) if r == Role.ASSISTANT]
    assert assistant and encoded.features.indptr[-1] > 0
    assert "".join(encoded.tokens[i] for i in assistant).strip() == conversation[1]["content"]
