"""``bench --ray``: activation capture on Ray against the local capture, in one run.

The same corpus (the documents shipped beside the SAE, repeated to the asked token count), the
same model, layer and window, the same CPU threads: the local capture in this process, then Ray
Data's actor pool on a local cluster (one worker holding every thread). Passes alternate, so a
noisy neighbour slows both; rates are medians. The Ray figure counts everything a user waits for
once the cluster is up: the actor's start and model load, scheduling, and writing the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from monitor.config import Settings


def run_ray_bench(settings: Settings, tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from monitor.models.loading import load_model
    from monitor.sae.builtin import shipped_eval_sample
    from monitor.training.capture import CaptureOptions, capture_split
    from monitor.training.ray_capture import capture_split_ray
    from monitor.training.ray_cluster import connect, shutdown

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_model(settings.model, settings.cache_dir, "cpu")
    sample = shipped_eval_sample(settings.model)
    if sample is None:
        raise ValueError(f"no evaluation sample ships for {settings.model}")
    docs = [json.loads(line) for line in sample.read_text().splitlines()]
    opts = CaptureOptions(layer=model.default_layer, ctx=256, shard_windows=16)
    started = time.monotonic()
    ray, shape = connect(None, 1, threads, gpu=False)
    cluster_start = time.monotonic() - started
    local_rates, ray_rates = [], []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        corpus = _corpus(root / "corpus", docs, model.tokenizer, tokens)
        try:
            for i in range(repeats):
                out = root / f"local-{i}"
                t0 = time.monotonic()
                rows = capture_split(corpus, "train", out, model, opts)["rows"]
                local_rates.append(rows / (time.monotonic() - t0))
                shutil.rmtree(out)
                out = root / f"ray-{i}"
                t0 = time.monotonic()
                rows = capture_split_ray(
                    ray, corpus, "train", out, model.name, model.tokenizer,
                    model.adapter.d_model, settings.cache_dir, "cpu", opts, 1, shape,
                )["rows"]  # fmt: skip
                ray_rates.append(rows / (time.monotonic() - t0))
                shutil.rmtree(out)
        finally:
            shutdown()
    local, remote = statistics.median(local_rates), statistics.median(ray_rates)
    return {
        "model": model.name,
        "layer": opts.layer,
        "tokens": rows,
        "threads": threads,
        "repeats": repeats,
        "local_tokens_per_s": local,
        "ray_tokens_per_s": remote,
        "ratio": remote / local,
        "local_runs": local_rates,
        "ray_runs": ray_rates,
        "cluster_start_s": cluster_start,
        "target_ratio": 0.85,
    }


def _corpus(root: Path, docs: list[dict[str, Any]], tokenizer: Any, tokens: int) -> Path:
    """``train.jsonl`` of the sample documents, repeated until it holds about ``tokens``."""
    root.mkdir(parents=True)
    sizes = [len(tokenizer(d.get("text") or json.dumps(d["messages"]))["input_ids"]) for d in docs]
    lines, total = [], 0
    while total < tokens:
        for doc, size in zip(docs, sizes, strict=True):
            lines.append(json.dumps(doc))
            total += size
            if total >= tokens:
                break
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root
