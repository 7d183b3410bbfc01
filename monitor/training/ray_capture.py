"""Activation capture on Ray: the same shards as ``capture_split``, written by a pool of actors.

The driver fixes the split's plan (``windows.npy`` and the shard layout, exactly as the local
capture does, so either can resume the other). Ray Data then maps the missing shards' indices
over an actor pool: one actor per worker loads the model once, truncated at the capture layer,
and writes each shard it is given with ``capture_shard`` — rows file first, acts file last, so
a shard is complete or absent. The output directory must be one every worker sees (one machine,
or a shared file system).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from monitor.training.capture import CaptureOptions, CapturePlan, capture_shard, plan_split
from monitor.training.ray_cluster import WorkerShape


class ShardWriter:
    """A Ray Data actor: the truncated model, and the plan of the split it captures."""

    def __init__(self, model: str, cache_dir: str, device: str, plan: dict[str, Any]) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from monitor.forward import TruncatedForward
        from monitor.models.loading import load_model

        hf_logging.disable_progress_bar()  # one bar per actor would interleave on the driver
        threads = int(plan.pop("threads"))
        torch.set_num_threads(threads)
        loaded = load_model(model, Path(cache_dir), device)
        opts = CaptureOptions(**plan.pop("opts"))
        dest = Path(plan.pop("dest"))
        windows = np.load(dest / "windows.npy", mmap_mode="r")
        self.plan = CapturePlan(
            dest, windows, (windows >= 0).sum(axis=1), opts, model, loaded.adapter.d_model
        )
        self.forward = TruncatedForward(loaded.adapter, opts.layer, drop_later_layers=True)
        self.pad = loaded.tokenizer.pad_token_id or 0
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for k in batch["shard"].tolist():
            # a retried task may find its shard already written by the first attempt
            done = self.plan.shard_done(k)
            rows.append(
                self.plan.shard_rows(k)
                if done
                else capture_shard(self.plan, k, self.forward, self.pad, self.device)
            )
        return {"shard": batch["shard"], "rows": np.asarray(rows, dtype=np.int64)}


def capture_split_ray(
    ray: Any,
    corpus_dir: Path,
    split: str,
    out_dir: Path,
    model_name: str,
    tokenizer: Any,
    d_model: int,
    cache_dir: Path,
    device: str,
    opts: CaptureOptions,
    workers: int,
    shape: WorkerShape,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Capture one split on the cluster ``ray`` is joined to; resumable like the local one."""
    plan = plan_split(corpus_dir, split, out_dir, model_name, tokenizer, d_model, opts)
    if isinstance(plan, dict):
        return plan
    started = time.monotonic()
    missing = [k for k in range(plan.n_shards) if not plan.shard_done(k)]
    done_rows = plan.total_rows - sum(plan.shard_rows(k) for k in missing)
    if progress:
        progress(done_rows, plan.total_rows)
    if missing:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False  # ours is on the driver
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        spec = {"opts": asdict(opts), "dest": str(plan.dest), "threads": shape.cpus}
        shards = ray.data.from_items([{"shard": k} for k in missing])
        written = shards.map_batches(
            ShardWriter,
            fn_constructor_kwargs={
                "model": model_name,
                "cache_dir": str(cache_dir),
                "device": device,
                "plan": spec,
            },
            batch_size=1,
            compute=ActorPoolStrategy(size=min(workers, len(missing))),
            num_cpus=shape.cpus,
            num_gpus=1 if shape.gpu else 0,
        )
        for row in written.iter_rows():
            done_rows += int(row["rows"])
            if progress:
                progress(done_rows, plan.total_rows)
    incomplete = [k for k in range(plan.n_shards) if not plan.shard_done(k)]
    if incomplete:
        raise RuntimeError(f"{plan.dest}: shards {incomplete[:5]} were not written; run it again")
    return plan.finish(time.monotonic() - started)
