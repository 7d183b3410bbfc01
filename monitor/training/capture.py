"""Activation capture: the residual stream at layer L of every corpus token, in fp16 shards.

Documents are tokenized (conversations through the chat template), cut into windows of
``ctx`` tokens, and run through the truncated forward. Position 0 of every window is left out:
it is the attention sink, whose residual is ~100x the norm of any other token's and says
nothing about the text. Shard ``k`` holds windows ``k*S .. (k+1)*S-1``; shards are written to a
temporary name and renamed, so an interrupted capture resumes at the first missing shard.

Layout of ``OUT/SPLIT/``: ``windows.npy`` int32 [n_windows, ctx] (token ids, -1 padded),
``acts_K.npy`` float16 [rows, d_model], ``rows_K.npy`` int32 [rows, 2] (window, position),
``capture.json`` once complete.
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


def capture_split(
    corpus_dir: Path,
    split: str,
    out_dir: Path,
    model: LoadedModel,
    opts: CaptureOptions,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Capture one corpus split (``train`` or ``heldout``) into ``out_dir/split``; resumable."""
    dest = out_dir / split
    done_file = dest / "capture.json"
    if done_file.exists():
        return dict(json.loads(done_file.read_text()))
    dest.mkdir(parents=True, exist_ok=True)
    windows_file = dest / "windows.npy"
    if windows_file.exists():
        windows = np.load(windows_file)
    else:
        windows = document_windows(
            read_documents(corpus_dir / f"{split}.jsonl"), model.tokenizer, opts.ctx
        )
        _save_atomic(windows_file, windows)
    lengths = (windows >= 0).sum(axis=1)
    total_rows = int((lengths - 1).sum())
    forward = TruncatedForward(model.adapter, opts.layer)
    n_shards = -(-len(windows) // opts.shard_windows)
    started = time.monotonic()
    rows_done = 0
    for k in range(n_shards):
        lo, hi = k * opts.shard_windows, min((k + 1) * opts.shard_windows, len(windows))
        shard_rows = int((lengths[lo:hi] - 1).sum())
        acts_file = dest / f"acts_{k:05d}.npy"
        if not acts_file.exists():
            acts, rows = _capture_windows(windows, lengths, lo, hi, forward, model, opts)
            _save_atomic(dest / f"rows_{k:05d}.npy", rows)
            _save_atomic(acts_file, acts)  # last: its presence marks the shard complete
        rows_done += shard_rows
        if progress:
            progress(rows_done, total_rows)
    summary = {
        "model": model.name,
        "layer": opts.layer,
        "ctx": opts.ctx,
        "d_model": model.adapter.d_model,
        "windows": len(windows),
        "rows": total_rows,
        "shards": n_shards,
        "skipped_positions": [0],
        "seconds_this_run": round(time.monotonic() - started, 1),
    }
    done_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.inference_mode()
def _capture_windows(
    windows: np.ndarray,
    lengths: np.ndarray,
    lo: int,
    hi: int,
    forward: TruncatedForward,
    model: LoadedModel,
    opts: CaptureOptions,
) -> tuple[np.ndarray, np.ndarray]:
    acts, rows = [], []
    order = sorted(range(lo, hi), key=lambda w: -int(lengths[w]))
    pad = model.tokenizer.pad_token_id or 0
    for b in range(0, len(order), opts.batch_size):
        batch = order[b : b + opts.batch_size]
        width = int(lengths[batch[0]])
        ids, mask = window_tensors(windows[batch, :width], pad, model.device)
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

    def load_all(self) -> np.ndarray:
        """Every row in one in-memory fp16 array (for training)."""
        return np.concatenate([np.asarray(a) for a in self.acts])

    def iter_chunks(self, chunk: int) -> Iterator[torch.Tensor]:
        """All rows in order, ``chunk`` at a time, as fp32."""
        for start in range(0, self.n_rows, chunk):
            yield self.gather(np.arange(start, min(start + chunk, self.n_rows)))
