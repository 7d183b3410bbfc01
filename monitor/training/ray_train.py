"""Data-parallel SAE training on Ray Train: one ``TopKTrainer`` per worker, gradients averaged.

Ray Train's ``TorchTrainer`` starts the workers and their torch process group (gloo on CPU,
NCCL on GPU). Worker ``r`` of ``n`` loads shards ``r, r+n, r+2n, ...`` of the capture, takes
``batch_size / n`` rows a step, and joins the others through ``TorchCollective`` at the points
where the recipe needs the whole batch (input scale, b_dec's initial median, gradients, which
latents fired, the massive-activation limit). The state is the same on every worker after every
step, so rank 0 alone writes the run's ``checkpoint.pt`` — the local run's format; every worker
reads it on resume. The run directory must be one every worker sees.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monitor.training.ray_cluster import WorkerShape
from monitor.training.trainer import StepStats, TrainOptions

CHECKPOINT = "checkpoint.pt"
RESULT = "ray-result.json"


class TorchCollective:
    """The ``Collective`` of an initialised ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def mean_(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
            t.div_(self.world)

    def max_(self, tensor: Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX)

    def broadcast_(self, tensor: Tensor) -> None:
        self._dist.broadcast(tensor, src=0)


def train_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    from monitor.training.capture import ActivationShards
    from monitor.training.trainer import TopKTrainer, drop_massive_activations

    torch.set_num_threads(int(config["threads"]))
    collective = TorchCollective()
    device = str(ray.train.torch.get_device()) if config["gpu"] else "cpu"
    shards = ActivationShards(Path(config["activations"]))
    mine = list(range(collective.rank, len(shards.acts), collective.world))
    data, limit = drop_massive_activations(shards.load_all(mine), collective)
    opts = TrainOptions(**config["opts"])
    trainer = TopKTrainer(data, opts, collective, device)
    checkpoint = Path(config["run_dir"]) / CHECKPOINT
    if checkpoint.exists():
        trainer.load_checkpoint(checkpoint)
    extra = {"exclude_norm_above": limit, "rows": shards.n_rows, "kept_rows": len(data)}
    report_every = int(config["report_every"])
    started, last = time.monotonic(), list[StepStats]()

    def on_step(stats: StepStats) -> None:
        last[:] = [stats]
        if collective.rank == 0 and (stats.step % report_every == 0 or stats.step == stop):
            rate = (stats.step - first) / max(1e-9, time.monotonic() - started)
            # workers' stdout reaches the driver's terminal through Ray's log forwarding
            print(
                f"step {stats.step}/{trainer.total_steps}  loss {stats.loss:.4f}  "
                f"FVU {stats.fvu:.4f}  dead {stats.dead_fraction:.3f}  {rate:.1f} steps/s",
                flush=True,
            )

    first = trainer.step
    stop = min(trainer.total_steps, config["max_steps"] or trainer.total_steps)
    trainer.train(checkpoint, on_step, config["max_steps"], extra)
    result = {"step": trainer.step, "final": asdict(last[-1]) if last else None}
    ray.train.report(result)
    if collective.rank == 0:  # the driver reads it from the run directory, as the checkpoint
        (Path(config["run_dir"]) / RESULT).write_text(json.dumps(result, indent=2) + "\n")


def train_on_ray(
    activations: Path,
    run_dir: Path,
    opts: TrainOptions,
    workers: int,
    shape: WorkerShape,
    report_every: int = 50,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Run ``train_loop`` on ``workers`` Ray Train workers; returns the last step's figures.

    ``max_steps`` stops early (checkpointed), as a run cut short would; run again to resume."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = {
        "activations": str(activations.resolve()),
        "run_dir": str(run_dir.resolve()),
        "opts": asdict(opts),
        "threads": shape.cpus,
        "gpu": shape.gpu,
        "report_every": report_every,
        "max_steps": max_steps,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if shape.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=shape.gpu,
            resources_per_worker={"CPU": float(shape.cpus)},
        ),
        run_config=RunConfig(storage_path=str((run_dir / "ray").resolve()), name="train"),
    )
    (run_dir / RESULT).unlink(missing_ok=True)
    trainer.fit()
    metrics: dict[str, Any] = json.loads((run_dir / RESULT).read_text())
    return metrics
