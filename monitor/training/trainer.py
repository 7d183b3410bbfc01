"""TopK SAE training after "Scaling and evaluating sparse autoencoders" (Gao et al., 2024).

TopK activation; decoder rows kept unit-norm (the gradient's component along each row is
removed before the step, and rows renormalised after it); encoder initialised as the decoder's
transpose; b_dec initialised at the data's geometric median; AuxK loss on dead latents; Adam
with linear warm-up and a linear decay to zero over the last part of training; fixed seed.

Inputs are scaled by one constant so that their mean squared norm is 1; the scale is folded
into the biases when the SAE is exported, so the shipped SAE takes raw activations.
Checkpoints hold everything the next step depends on, so a resumed run is bit-exact.

Data-parallel training (``monitor.training.ray_train``) runs one trainer per worker on that
worker's own rows, each taking ``batch_size / workers`` rows a step; a ``Collective`` averages
the gradients before the step and merges which latents fired, so every worker holds the same
parameters after every step. With one worker (``LOCAL``) the collective does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812 - the usual name

from monitor.sae.topk import TopKSAE


@dataclass(frozen=True)
class TrainOptions:
    d_sae: int = 8192
    k: int = 32
    aux_k: int = 256
    aux_coef: float = 1 / 32
    batch_size: int = 4096
    epochs: float = 3.0
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_fraction: float = 0.3  # last share of steps over which lr falls linearly to 0
    dead_tokens: int = 250_000  # a latent silent for this many tokens is dead (for AuxK)
    seed: int = 0
    checkpoint_every: int = 100


class Collective(Protocol):
    """What data-parallel training needs from its process group (all calls are in place)."""

    rank: int
    world: int

    def mean_(self, tensors: list[Tensor]) -> None: ...
    def max_(self, tensor: Tensor) -> None: ...
    def broadcast_(self, tensor: Tensor) -> None: ...


class _Alone:
    """One process: nothing to exchange."""

    rank = 0
    world = 1

    def mean_(self, tensors: list[Tensor]) -> None:
        pass

    def max_(self, tensor: Tensor) -> None:
        pass

    def broadcast_(self, tensor: Tensor) -> None:
        pass


LOCAL: Collective = _Alone()


@dataclass
class StepStats:
    step: int
    loss: float
    fvu: float
    aux: float
    dead_fraction: float
    lr: float


class TopKTrainer:
    """Trains a TopK SAE on an in-memory fp16 activation matrix ``[rows, d_in]``."""

    def __init__(
        self,
        data: np.ndarray | Tensor,
        opts: TrainOptions,
        collective: Collective = LOCAL,
        device: str = "cpu",
    ) -> None:
        """``data`` is this worker's share of the rows (all of them when training alone)."""
        if opts.batch_size % collective.world:
            raise ValueError(
                f"batch size {opts.batch_size} does not split over {collective.world} workers"
            )
        self.opts = opts
        self.collective = collective
        self.device = device
        self.data = torch.as_tensor(data)
        self.d_in = int(self.data.shape[1])
        self.rows = int(self.data.shape[0])
        self.local_batch = opts.batch_size // collective.world
        # every worker must take the same number of steps: the smallest share sets the epoch
        steps = torch.tensor([float(max(1, self.rows // self.local_batch))])
        steps.neg_()
        collective.max_(steps)
        self.steps_per_epoch = int(-steps.item())
        self.total_steps = max(1, int(opts.epochs * self.steps_per_epoch))
        torch.manual_seed(opts.seed)
        sample = self._sample_rows(min(self.rows, 16384), seed=opts.seed).float()
        mean_sq = sample.pow(2).sum(1).mean().reshape(1)
        collective.mean_([mean_sq])
        self.scale = float(1.0 / mean_sq.sqrt())
        w_dec = torch.randn(opts.d_sae, self.d_in)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        b_dec = _geometric_median(sample * self.scale)
        collective.broadcast_(b_dec)
        self.params = {
            # the encoder is kept transposed, [d_sae, d_in], so a latent's weights are one
            # contiguous row: gathering the k selected rows per token is then cheap
            "W_enc_T": w_dec.clone().to(device).requires_grad_(True),
            "b_enc": torch.zeros(opts.d_sae, device=device, requires_grad=True),
            "W_dec": w_dec.to(device).requires_grad_(True),
            "b_dec": b_dec.to(device).requires_grad_(True),
        }
        self.optim = torch.optim.Adam(self.params.values(), lr=opts.lr, betas=(0.9, 0.999))
        self.step = 0
        self.tokens_since_fired = torch.zeros(opts.d_sae, dtype=torch.long, device=device)

    # -- the model ------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-activations (no grad), and the top k indices and values (with grad).

        The dense ``[batch, d_sae]`` matmul runs outside autograd; its backward is taken only
        through the k selected entries per token (``_SelectedPreActivations``), a sparse
        product instead of two more full-size matmuls.
        """
        p = self.params
        centred = x - p["b_dec"].detach()  # b_dec learns through the decoder
        with torch.no_grad():
            pre = torch.addmm(p["b_enc"], centred, p["W_enc_T"].t())
            indices = pre.topk(self.opts.k, dim=1).indices
        # torch declares Function.apply without types
        values = _SelectedPreActivations.apply(  # type: ignore[no-untyped-call]
            pre, centred, indices, p["W_enc_T"], p["b_enc"]
        )
        return pre, indices, torch.relu(values)

    def _decode(self, indices: Tensor, values: Tensor) -> Tensor:
        # embedding_bag sums k decoder rows per token without a dense [batch, d_sae] tensor
        rows = F.embedding_bag(indices, self.params["W_dec"], per_sample_weights=values, mode="sum")
        return rows + self.params["b_dec"]

    # -- one step -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.opts
        warm = min(1.0, (step + 1) / o.warmup_steps)
        decay_start = int(self.total_steps * (1 - o.decay_fraction))
        if step < decay_start:
            return o.lr * warm
        remaining = (self.total_steps - step) / max(1, self.total_steps - decay_start)
        return o.lr * warm * max(0.0, remaining)

    def train_step(self) -> StepStats:
        o = self.opts
        x = self._batch(self.step).to(self.device).float() * self.scale
        _, indices, values = self._encode(x)
        x_hat = self._decode(indices, values)
        var = (x - x.mean(0)).pow(2).sum(1).mean()
        mse = (x_hat - x).pow(2).sum(1).mean()
        fvu = mse / var
        dead = self.tokens_since_fired >= o.dead_tokens
        aux = torch.zeros((), device=self.device)
        n_dead = int(dead.sum())
        if n_dead > 0 and o.aux_coef > 0:
            # Only the dead columns, densely and with autograd: few, once training is underway.
            dead_idx = torch.nonzero(dead).squeeze(1)
            centred = x - self.params["b_dec"].detach()
            dead_rows = self.params["W_enc_T"][dead_idx]
            dead_pre = centred @ dead_rows.t() + self.params["b_enc"][dead_idx]
            aux_values, local = dead_pre.topk(min(o.aux_k, n_dead), dim=1)
            error = (x - x_hat).detach()
            # No ReLU here: a latent whose pre-activation is negative on every token must still
            # get a gradient, or it could never come back.
            error_hat = F.embedding_bag(
                dead_idx[local], self.params["W_dec"], per_sample_weights=aux_values, mode="sum"
            )
            aux = (error_hat - error).pow(2).sum(1).mean() / error.pow(2).sum(1).mean()
            aux = torch.nan_to_num(aux, nan=0.0)
        loss = fvu + o.aux_coef * aux
        lr = self.lr_at(self.step)
        for group in self.optim.param_groups:
            group["lr"] = lr
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            self.collective.mean_(grads)
            w_dec = self.params["W_dec"]
            grad = w_dec.grad
            assert grad is not None
            grad -= (grad * w_dec).sum(1, keepdim=True) * w_dec
        self.optim.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)
            fired = torch.zeros(o.d_sae, dtype=torch.uint8, device=self.device)
            fired[indices[values > 0]] = 1
            self.collective.max_(fired)
            self.tokens_since_fired += x.shape[0] * self.collective.world
            self.tokens_since_fired[fired.bool()] = 0
            figures = torch.stack([loss.detach(), fvu.detach(), aux.detach()])
            self.collective.mean_([figures])
        self.step += 1
        loss_v, fvu_v, aux_v = figures.tolist()
        return StepStats(self.step, loss_v, fvu_v, aux_v, n_dead / o.d_sae, lr)

    def train(
        self,
        checkpoint: Path | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        max_steps: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Train to the end (or ``max_steps``), checkpointing every ``checkpoint_every`` steps."""
        stop = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        while self.step < stop:
            stats = self.train_step()
            if on_step:
                on_step(stats)
            if checkpoint and (self.step % self.opts.checkpoint_every == 0 or self.step == stop):
                self.save_checkpoint(checkpoint, extra)

    # -- data order -----------------------------------------------------------------------
    def _batch(self, step: int) -> Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.opts.seed, epoch]).permutation(self.rows)
        sel = perm[within * self.local_batch : (within + 1) * self.local_batch]
        return self.data[torch.from_numpy(np.sort(sel))]

    def _sample_rows(self, n: int, seed: int) -> Tensor:
        sel = np.random.default_rng([seed, 1 << 20]).choice(self.rows, n, replace=False)
        return self.data[torch.from_numpy(np.sort(sel))]

    # -- checkpoints and export -------------------------------------------------------------
    def save_checkpoint(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the state (on rank 0 only, when data-parallel); ``extra`` is kept beside it."""
        if self.collective.rank != 0:
            return
        state = {
            "opts": asdict(self.opts),
            "workers": self.collective.world,
            "d_in": self.d_in,
            "extra": extra or {},
            "step": self.step,
            "scale": self.scale,
            "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
            "optim": _to_device(self.optim.state_dict(), "cpu"),
            "tokens_since_fired": self.tokens_since_fired.cpu().clone(),
            "rng": torch.get_rng_state(),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from ``path``; its options must equal this trainer's."""
        state = read_checkpoint(path)
        check_checkpoint(state, path, self.opts, self.collective.world)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.optim.load_state_dict(state["optim"])
        self.step = int(state["step"])
        self.scale = float(state["scale"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        torch.set_rng_state(state["rng"])

    def export(self, cfg_extra: dict[str, Any] | None = None) -> TopKSAE:
        """The trained SAE for raw (unscaled) activations, fp32; ``save_sae`` it as fp16."""
        params = {n: t.detach().cpu().clone() for n, t in self.params.items()}
        return export_sae(params, self.scale, self.opts, self.step, cfg_extra)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's whole state (what ``save_checkpoint`` wrote)."""
    state: dict[str, Any] = torch.load(path, weights_only=False)
    return state


def check_checkpoint(state: dict[str, Any], path: Path, opts: TrainOptions, workers: int) -> None:
    """ValueError unless ``state`` was made with ``opts`` by ``workers`` workers: a resumed run
    is bit-exact only then."""
    if state["opts"] != asdict(opts):
        raise ValueError(f"{path}: checkpoint was made with other training options")
    made_by = int(state.get("workers", 1))
    if made_by != workers:
        raise ValueError(
            f"{path}: checkpoint was made by {made_by} worker(s), this run has "
            f"{workers}; resume with --workers {made_by}"
        )


def export_checkpoint(state: dict[str, Any], cfg_extra: dict[str, Any] | None = None) -> TopKSAE:
    """The SAE of a checkpoint's state (the end of a local or data-parallel run)."""
    opts = TrainOptions(**state["opts"])
    return export_sae(state["params"], float(state["scale"]), opts, int(state["step"]), cfg_extra)


def export_sae(
    p: dict[str, Tensor],
    s: float,
    opts: TrainOptions,
    steps: int,
    cfg_extra: dict[str, Any] | None = None,
) -> TopKSAE:
    """Training saw ``s * x``. TopK commutes with a positive scale, so dividing the encoder
    bias by ``s`` gives activations ``f / s`` in the residual stream's own units, and the
    decoder rows stay unit-norm: a feature's activation is the length of its contribution.
    """
    tensors = {
        "W_enc": p["W_enc_T"].t().contiguous(),
        "b_enc": p["b_enc"] / s,
        "W_dec": p["W_dec"],
        "b_dec": p["b_dec"] / s,
    }
    cfg = {
        "architecture": "topk",
        "d_in": int(p["W_dec"].shape[1]),
        "d_sae": opts.d_sae,
        "k": opts.k,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "training": {**asdict(opts), "steps": steps, "input_scale": s},
        **(cfg_extra or {}),
    }
    return TopKSAE(cfg, tensors)


def _to_device(obj: Any, device: str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


class _SelectedPreActivations(torch.autograd.Function):
    """``pre[b, indices[b, j]]``, with gradients to ``W_enc_T`` and ``b_enc`` as if ``pre`` had
    been computed under autograd, but costing only the selected entries."""

    @staticmethod
    def forward(
        ctx: Any, pre: Tensor, centred: Tensor, indices: Tensor, w_enc_t: Tensor, b_enc: Tensor
    ) -> Tensor:
        ctx.save_for_backward(centred, indices)
        ctx.d_sae = w_enc_t.shape[0]
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, Tensor, Tensor]:
        centred, indices = ctx.saved_tensors
        batch, k = indices.shape
        tokens = torch.arange(batch, device=indices.device).repeat_interleave(k)
        sparse = torch.sparse_coo_tensor(
            torch.stack([indices.reshape(-1), tokens]),
            grad.reshape(-1),
            (ctx.d_sae, batch),
            check_invariants=False,  # built from topk indices: in range by construction
        )
        grad_w = torch.sparse.mm(sparse, centred)
        grad_b = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return None, None, None, grad_w, grad_b


MASSIVE_NORM_FACTOR = 10.0


def drop_massive_activations(
    data: np.ndarray, collective: Collective = LOCAL
) -> tuple[np.ndarray, float]:
    """Rows without the "massive activations" (secondary attention sinks, ~100x the median norm,
    a few per 100k tokens), and the norm limit used: ``MASSIVE_NORM_FACTOR`` x the median.

    Left in, one such row dominates the variance, and so the loss, of every batch it is in.
    Data-parallel, the median is the mean of the workers' medians (equal to a few parts in a
    thousand on shares of a shuffled corpus), so every worker applies the same limit.
    """
    norms = np.empty(len(data), dtype=np.float32)
    for start in range(0, len(data), 65536):
        norms[start : start + 65536] = np.linalg.norm(
            data[start : start + 65536].astype(np.float32), axis=1
        )
    median = torch.tensor([float(np.median(norms))], dtype=torch.float64)
    collective.mean_([median])
    limit = float(MASSIVE_NORM_FACTOR * median.item())
    keep = norms <= limit
    return (data if keep.all() else data[keep]), limit


def _geometric_median(points: Tensor, iterations: int = 30) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points``."""
    median = points.mean(0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new: Tensor = (points * weights[:, None]).sum(0) / weights.sum()
        if float((new - median).norm()) < 1e-6 * (1 + float(median.norm())):
            return new
        median = new
    return median
