"""``safety-monitor bench``: the pipeline against the baseline a user would write, in one process.

(a) the pipeline: truncated forward to layer L, sparse SAE encode;
(b) the baseline: full forward with ``output_hidden_states=True``, dense SAE encode of layer L;
(c) the machine's fp32 matmul rate times the pipeline's analytic FLOPs per token: a roofline.
Both run on the same token ids, alternating repeat by repeat so machine noise hits both alike;
rates are medians over repeats. Tokenization is excluded from both.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monitor.pipeline import Pipeline
from monitor.sae.base import SparseAutoencoder
from monitor.sae.sparse import SparseActivations
from monitor.sae.topk import TopKSAE

log = logging.getLogger(__name__)

# Real text every machine has: the interpreter's own standard-library sources.
_CORPUS_MODULES = ("argparse", "textwrap", "json/decoder", "logging/__init__", "email/message")


@dataclass(frozen=True)
class BenchOptions:
    batches: int = 4
    batch_size: int = 8
    seq_len: int = 128
    repeats: int = 5
    matmul_size: int = 1024


def bench_sequences(pipeline: Pipeline, opts: BenchOptions) -> list[list[int]]:
    """``batches * batch_size`` windows of exactly ``seq_len`` tokens of standard-library source."""
    lib = Path(sys.modules["os"].__file__ or "").parent
    text = "\n".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in _CORPUS_MODULES)
    ids = pipeline.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    need = opts.batches * opts.batch_size
    if len(ids) < need * opts.seq_len:
        raise ValueError(f"bench corpus has {len(ids)} tokens, fewer than {need} x {opts.seq_len}")
    return [ids[i * opts.seq_len : (i + 1) * opts.seq_len] for i in range(need)]


def matmul_gflops(device: str, n: int, repeats: int = 5) -> list[float]:
    """fp32 GFLOP/s of ``repeats`` square ``n``-sized matmuls on ``device``, after a warm-up."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = [_timed(lambda: a @ b, device) for _ in range(repeats + 1)][1:]
    return [2 * n**3 / t / 1e9 for t in times]


def dense_baseline_encode(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """The dense encode a user would write (SAELens style): ``[tokens, d_in] -> [tokens, d_sae]``.

    Written out here rather than calling the SAE's own encoder, so the check is independent.
    """
    pre = sae.encoder_input(x) @ sae.tensor("W_enc") + sae.tensor("b_enc")
    if isinstance(sae, TopKSAE):
        values, indices = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    return sae.activation(pre)


def run_bench(pipeline: Pipeline, opts: BenchOptions) -> dict[str, Any]:
    """Run (a), (b), (c) and the agreement check; return the report."""
    from transformers import AutoModelForCausalLM

    device = pipeline.model.device
    seqs = bench_sequences(pipeline, opts)
    batches = [seqs[i : i + opts.batch_size] for i in range(0, len(seqs), opts.batch_size)]
    n_tokens = sum(len(s) for s in seqs)
    sae = pipeline.sae
    compare_k = sae.k if isinstance(sae, TopKSAE) else 32

    def run_pipeline() -> list[SparseActivations]:
        return [f for batch in batches for f in pipeline.encode_ids(batch)]

    log.info("pipeline: warm-up and memory pass over %d tokens", n_tokens)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = run_pipeline()
    peak_rss_mb = _peak_rss_mb()
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    log.info("baseline: loading the whole model from %s", pipeline.model.source)
    full = AutoModelForCausalLM.from_pretrained(
        pipeline.model.source, dtype=torch.float32, local_files_only=True
    )
    run_baseline = _baseline(full.eval().to(device), batches, pipeline.layer, sae, device)
    theirs = run_baseline()  # warm-up, and the reference for the agreement check
    agreement, max_diff = _agreement(ours, theirs, compare_k, opts.seq_len)

    run_detectors, n_detectors = _detectors(pipeline, ours, opts.batch_size)

    # The matmul rate is sampled inside the same repeats, so a noisy neighbour slows all three.
    ours_s, theirs_s, rates, detector_s = [], [], [], []
    for r in range(opts.repeats):
        log.info("timing repeat %d/%d", r + 1, opts.repeats)
        ours_s.append(_timed(run_pipeline, device))
        theirs_s.append(_timed(run_baseline, device))
        rates.extend(matmul_gflops(device, opts.matmul_size))
        if run_detectors is not None:
            detector_s.append(_timed(run_detectors, "cpu"))
    del full, run_baseline, theirs

    pipeline_tps = n_tokens / statistics.median(ours_s)
    baseline_tps = n_tokens / statistics.median(theirs_s)
    gflops = statistics.median(rates)
    layer = pipeline.layer
    flops = pipeline.model.adapter.forward_flops_per_token(layer, opts.seq_len)
    flops += 2.0 * sae.d_in * sae.d_sae
    roofline_tps = gflops * 1e9 / flops
    return {
        "model": pipeline.model.name,
        "layer": layer,
        "sae": {"architecture": sae.architecture, "d_sae": sae.d_sae, "k": compare_k},
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "batches": opts.batches,
        "repeats": opts.repeats,
        "tokens": n_tokens,
        "pipeline_tokens_per_s": pipeline_tps,
        "baseline_tokens_per_s": baseline_tps,
        "speedup": pipeline_tps / baseline_tps,
        "matmul_gflops": gflops,
        "flops_per_token": flops,
        "roofline_tokens_per_s": roofline_tps,
        "roofline_fraction": pipeline_tps / roofline_tps,
        "topk_agreement": agreement,
        "max_abs_diff": max_diff,
        "peak_rss_mb": peak_rss_mb,
        "peak_gpu_mb": peak_gpu_mb,
        "peak_rss_mb_with_baseline": _peak_rss_mb(),
        "detectors": n_detectors,
        "detector_share": (
            statistics.median(detector_s) / statistics.median(ours_s) if detector_s else None
        ),
    }


def _detectors(
    pipeline: Pipeline, features: list[SparseActivations], batch_size: int
) -> tuple[Callable[[], object] | None, int]:
    """Evaluating the curated catalog on the pipeline's output, batch by batch, with evidence.

    Roles alternate user/assistant by halves of each sequence so every scope has tokens; the
    residual sums are those of the real tokens. None when the catalog is for another SAE.
    """
    from detectors.batch import TurnBatch
    from detectors.engine import catalog_dir, load_engine
    from detectors.rules import RuleError
    from monitor.messages import Role

    try:
        engine = load_engine([catalog_dir()], pipeline.sae)
    except RuleError as exc:
        log.warning("detector timing skipped: %s", exc)
        return None, 0
    d = pipeline.model.adapter.d_model
    batches = []
    for start in range(0, len(features), batch_size):
        feats = features[start : start + batch_size]
        lengths = torch.tensor([f.n_tokens for f in feats])
        roles = torch.cat(
            [
                torch.where(torch.arange(n) < n // 2, int(Role.USER), int(Role.ASSISTANT))
                for n in lengths.tolist()
            ]
        )
        offsets = torch.zeros(len(feats) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        sums = torch.randn(len(feats), len(Role), d)
        counts = torch.full((len(feats), len(Role)), float(lengths.max()))
        batches.append(
            TurnBatch(
                SparseActivations.concat(feats).to("cpu"),
                roles,
                torch.zeros(int(lengths.sum()), dtype=torch.int64),
                offsets,
                sums,
                counts,
            )
        )

    def run() -> None:
        for b in batches:
            engine.evaluate(b, explain=True)

    run()  # warm-up
    return run, len(engine.detectors)


def _baseline(
    full: torch.nn.Module,
    batches: list[list[list[int]]],
    layer: int,
    sae: SparseAutoencoder,
    device: str,
) -> Callable[[], list[Tensor]]:
    """The baseline a user would write: whole forward, every hidden state, dense SAE encode."""

    @torch.inference_mode()
    def run() -> list[Tensor]:
        out = []
        for batch in batches:
            ids = torch.tensor(batch, device=device)
            result = full(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            )
            hidden = result.hidden_states[layer][:, 1:]  # skip the attention sink, as (a) does
            out.append(dense_baseline_encode(sae, hidden.reshape(-1, hidden.shape[-1])))
        return out

    return run


def _agreement(
    ours: list[SparseActivations], theirs: list[Tensor], k: int, seq_len: int
) -> tuple[float, float]:
    """Share of tokens whose top-k index sets match, and the max abs difference of all values.

    Compared over every position but each sequence's first, which neither side encodes.
    """
    same = total = 0
    max_diff = 0.0
    per_batch = len(ours) // len(theirs)
    for b, dense_on_device in enumerate(theirs):
        mine = SparseActivations.concat(ours[b * per_batch : (b + 1) * per_batch]).to_dense()
        mine = mine[torch.arange(mine.shape[0]) % seq_len != 0]
        dense = dense_on_device.cpu()
        max_diff = max(max_diff, float((mine - dense).abs().max()))
        va, ia = mine.topk(k, dim=-1)
        vc, ic = dense.topk(k, dim=-1)
        for t in range(mine.shape[0]):
            same += set(ia[t][va[t] > 0].tolist()) == set(ic[t][vc[t] > 0].tolist())
            total += 1
    return same / total, max_diff


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
