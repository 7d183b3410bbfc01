"""Activation capture: the residual stream at layer L of every corpus token, in fp16 shards.

Documents are tokenized (conversations through the chat template), cut into windows of
``ctx`` tokens, and run through the truncated forward. Position 0 of every window is left out:
it is the attention sink, whose residual is ~100x the norm of any other token's and says
nothing about the text. Shard ``k`` holds windows ``k*S .. (k+1)*S-1``; shards are written to a
temporary name and renamed, so an interrupted capture resumes at the first missing shard.

Layout of ``OUT/SPLIT/``: ``windows.npy`` int32 [n_windows, ctx] (token ids, -1 padded),
``acts_K.npy`` float16 [rows, d_model], ``rows_K.npy`` int32 [rows, 2] (window, position),
``capture-settings.json`` (model, layer, window and shard size) from the start, ``capture.json``
once complete. A directory begun with other settings is refused, never mixed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.forward import TruncatedForward
from monitor.models.loading import LoadedModel
from monitor.tokenization import InputTokenizer
from monitor.training.corpus import read_documents

MIN_WINDOW = 8


@dataclass(frozen=True)
class CaptureOptions:
    layer: int = 15
    ctx: int = 256
    shard_windows: int = 256
    batch_size: int = 8


def document_windows(docs: Iterator[dict[str, Any]], tokenizer: Any, ctx: int) -> np.ndarray:
    """Token windows of every document: int32 ``[n_windows, ctx]``, right-padded with -1."""
    tok = InputTokenizer(tokenizer, max_tokens=1 << 30)
    windows = []
    for doc in docs:
        ids = tok.tokenize(doc["messages"] if "messages" in doc else doc["text"]).ids
        for start in range(0, len(ids), ctx):
            piece = ids[start : start + ctx]
            if len(piece) >= MIN_WINDOW:
                windows.append(piece + [-1] * (ctx - len(piece)))
    return np.asarray(windows, dtype=np.int32).reshape(-1, ctx)


def window_tensors(windows: np.ndarray, pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (-1 padding replaced by ``pad``) and attention mask of -1-padded windows."""
    ids = torch.from_numpy(windows.astype(np.int64))
    mask = ids >= 0
    ids[~mask] = pad
    return ids.to(device), mask.long().to(device)


class CaptureMismatchError(ValueError):
    """An activation directory already holds a capture made with other settings."""


@dataclass
class CapturePlan:
    """One split's windows and shard layout, fixed once (``windows.npy``) and shared by every
    capture of it, local or on Ray, so that a resumed run writes the same shards."""

    dest: Path
    windows: np.ndarray
    lengths: np.ndarray
    opts: CaptureOptions
    model_name: str
    d_model: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.windows) // self.opts.shard_windows)

    @property
    def total_rows(self) -> int:
        return int((self.lengths - 1).sum())

    def bounds(self, k: int) -> tuple[int, int]:
        lo = k * self.opts.shard_windows
        return lo, min(lo + self.opts.shard_windows, len(self.windows))

    def shard_rows(self, k: int) -> int:
        lo, hi = self.bounds(k)
        return int((self.lengths[lo:hi] - 1).sum())

    def shard_done(self, k: int) -> bool:
        return (self.dest / f"acts_{k:05d}.npy").exists()

    def finish(self, seconds: float) -> dict[str, Any]:
        summary = {
            "model": self.model_name,
            "layer": self.opts.layer,
            "ctx": self.opts.ctx,
            "d_model": self.d_model,
            "windows": len(self.windows),
            "rows": self.total_rows,
            "shards": self.n_shards,
            "skipped_positions": [0],
            "seconds_this_run": round(seconds, 1),
        }
        (self.dest / "capture.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def plan_split(
    corpus_dir: Path,
    split: str,
    out_dir: Path,
    model_name: str,
    tokenizer: Any,
    d_model: int,
    opts: CaptureOptions,
) -> CapturePlan | dict[str, Any]:
    """The plan of ``out_dir/split`` (windows tokenized on first use), or its summary when
    already complete. CaptureMismatchError when the directory was begun with another model or
    other options: shards of two captures never mix."""
    dest = out_dir / split
    settings = {
        "model": model_name,
        "layer": opts.layer,
        "ctx": opts.ctx,
        "shard_windows": opts.shard_windows,
        "d_model": d_model,
    }
    meta_file = dest / "capture-settings.json"
    done_file = dest / "capture.json"
    # a capture made before the settings file existed is checked against its summary
    begun_file = meta_file if meta_file.exists() else done_file
    if begun_file.exists():
        begun = json.loads(begun_file.read_text())
        differ = {k: (begun.get(k), v) for k, v in settings.items() if k in begun and begun[k] != v}
        if differ:
            said = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differ.items())
            raise CaptureMismatchError(
                f"{dest} holds a capture begun with {said}; use another --out, or the same "
                "model and options to resume it"
            )
    if done_file.exists():
        return dict(json.loads(done_file.read_text()))
    dest.mkdir(parents=True, exist_ok=True)
    if not meta_file.exists():
        meta_file.write_text(json.dumps(settings, indent=2) + "\n")
    windows_file = dest / "windows.npy"
    if windows_file.exists():
        windows = np.load(windows_file)
    else:
        windows = document_windows(
            read_documents(corpus_dir / f"{split}.jsonl"), tokenizer, opts.ctx
        )
        _save_atomic(windows_file, windows)
    lengths = (windows >= 0).sum(axis=1)
    return CapturePlan(dest, windows, lengths, opts, model_name, d_model)


def capture_shard(
    plan: CapturePlan, k: int, forward: TruncatedForward, pad: int, device: str
) -> int:
    """Capture shard ``k`` of ``plan`` (its rows file first, its acts file last: the acts file's
    presence marks the shard complete); returns its row count."""
    lo, hi = plan.bounds(k)
    acts, rows = _capture_windows(plan, lo, hi, forward, pad, device)
    _save_atomic(plan.dest / f"rows_{k:05d}.npy", rows)
    _save_atomic(plan.dest / f"acts_{k:05d}.npy", acts)
    return len(rows)


def capture_split(
    corpus_dir: Path,
    split: str,
    out_dir: Path,
    model: LoadedModel,
    opts: CaptureOptions,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Capture one corpus split (``train`` or ``heldout``) into ``out_dir/split``; resumable."""
    plan = plan_split(
        corpus_dir, split, out_dir, model.name, model.tokenizer, model.adapter.d_model, opts
    )
    if isinstance(plan, dict):
        return plan
    forward = TruncatedForward(model.adapter, opts.layer)
    pad = model.tokenizer.pad_token_id or 0
    started = time.monotonic()
    rows_done = 0
    for k in range(plan.n_shards):
        if not plan.shard_done(k):
            capture_shard(plan, k, forward, pad, model.device)
        rows_done += plan.shard_rows(k)
        if progress:
            progress(rows_done, plan.total_rows)
    return plan.finish(time.monotonic() - started)


@torch.inference_mode()
def _capture_windows(
    plan: CapturePlan, lo: int, hi: int, forward: TruncatedForward, pad: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    acts, rows = [], []
    windows, lengths, batch_size = plan.windows, plan.lengths, plan.opts.batch_size
    order = sorted(range(lo, hi), key=lambda w: -int(lengths[w]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = int(lengths[batch[0]])
        ids, mask = window_tensors(windows[batch, :width], pad, device)
        hidden = forward(ids, mask).float().cpu()
        for r, w in enumerate(batch):
            n = int(lengths[w])
            acts.append(hidden[r, 1:n].numpy().astype(np.float16))
            pos = np.arange(1, n, dtype=np.int32)
            rows.append(np.stack([np.full_like(pos, w), pos], axis=1))
    # restore window order inside the shard, so rows are sorted by (window, position)
    perm = np.argsort(np.concatenate([r[:, 0] for r in rows]), kind="stable")
    return np.concatenate(acts)[perm], np.concatenate(rows)[perm]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
    tmp.replace(path)


class ActivationShards:
    """Read-only view of a captured split: memory-mapped shards, addressed by global row."""

    def __init__(self, split_dir: Path) -> None:
        info_file = split_dir / "capture.json"
        if not info_file.exists():
            raise FileNotFoundError(f"{split_dir}: capture not complete (no capture.json)")
        self.info = json.loads(info_file.read_text())
        self.dir = split_dir
        self.acts = [
            np.load(split_dir / f"acts_{k:05d}.npy", mmap_mode="r")
            for k in range(self.info["shards"])
        ]
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.acts])
        self.n_rows = int(self.offsets[-1])
        self.d_model = int(self.info["d_model"])

    def rows_meta(self) -> np.ndarray:
        """int32 ``[n_rows, 2]``: window index and position of every row."""
        rows: np.ndarray = np.concatenate(
            [np.load(self.dir / f"rows_{k:05d}.npy") for k in range(len(self.acts))]
        )
        return rows

    def windows(self) -> np.ndarray:
        windows: np.ndarray = np.load(self.dir / "windows.npy")
        return windows

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """fp32 activations of the given global rows, in the order given."""
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.d_model), dtype=np.float32)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            out[sel] = self.acts[k][rows[sel] - self.offsets[k]]
        return torch.from_numpy(out)

    def load_all(self, shards: list[int] | None = None) -> np.ndarray:
        """Every row (or those of ``shards``) in one in-memory fp16 array (for training)."""
        chosen = range(len(self.acts)) if shards is None else shards
        return np.concatenate([np.asarray(self.acts[k]) for k in chosen])

    def iter_chunks(self, chunk: int) -> Iterator[torch.Tensor]:
        """All rows in order, ``chunk`` at a time, as fp32."""
        for start in range(0, self.n_rows, chunk):
            yield self.gather(np.arange(start, min(start + chunk, self.n_rows)))
