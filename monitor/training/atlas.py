"""The feature atlas: per feature, how often it fires, how strongly, and where it fires most.

Stored as ``atlas.npz`` beside the SAE: ``density`` [d_sae] (share of tokens where it fires),
``max_activation`` [d_sae], and for the top contexts ``context_tokens`` uint16
[d_sae, top_n, width] (token ids, 65535 = none), ``context_peak`` int8 [d_sae, top_n] (the
peak token's index in the window, -1 = none), ``context_value`` float16 [d_sae, top_n]; plus
``tokens`` (how many were scanned). At most one context per feature comes from any one window,
so the examples are not one passage repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.sae.base import SparseAutoencoder
from monitor.training.capture import ActivationShards

ATLAS_FILE = "atlas.npz"
NO_TOKEN = 65535
BEFORE, AFTER = 12, 4  # context tokens around the peak


@dataclass(frozen=True)
class FeatureCard:
    index: int
    density: float
    max_activation: float
    contexts: list[tuple[list[int], int, float]]  # token ids, peak index, activation


def build_atlas(
    sae: SparseAutoencoder,
    shards: ActivationShards,
    top_n: int = 8,
    chunk: int = 65536,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Scan a captured split once and gather every feature's statistics and top contexts."""
    meta = shards.rows_meta()
    windows = shards.windows()
    n_windows = len(windows)
    counts = np.zeros(sae.d_sae, dtype=np.int64)
    maxima = np.zeros(sae.d_sae, dtype=np.float32)
    cand_feat = np.zeros(0, dtype=np.int64)
    cand_val = np.zeros(0, dtype=np.float32)
    cand_row = np.zeros(0, dtype=np.int64)
    for start in range(0, shards.n_rows, chunk):
        stop = min(start + chunk, shards.n_rows)
        x = shards.gather(np.arange(start, stop))
        keep = sae.keep_mask(x)  # massive activations get no features, as in the pipeline
        feats = sae.encode(x[keep]).with_empty_rows(keep).to("cpu")
        per_row = (feats.indptr[1:] - feats.indptr[:-1]).numpy()
        rows = np.repeat(np.arange(start, stop), per_row)
        idx = feats.indices.numpy()
        val = feats.values.numpy().astype(np.float32)
        counts += np.bincount(idx, minlength=sae.d_sae)
        np.maximum.at(maxima, idx, val)
        cand_feat = np.concatenate([cand_feat, idx])
        cand_val = np.concatenate([cand_val, val])
        cand_row = np.concatenate([cand_row, rows])
        best = _top_per_feature(cand_feat, cand_val, meta[cand_row, 0], n_windows, top_n)
        cand_feat, cand_val, cand_row = cand_feat[best], cand_val[best], cand_row[best]
        if progress:
            progress(stop, shards.n_rows)
    width = BEFORE + 1 + AFTER
    ctx_tokens = np.full((sae.d_sae, top_n, width), NO_TOKEN, dtype=np.uint16)
    ctx_peak = np.full((sae.d_sae, top_n), -1, dtype=np.int8)
    ctx_value = np.zeros((sae.d_sae, top_n), dtype=np.float16)
    order = np.lexsort((-cand_val, cand_feat))
    slot = np.zeros(sae.d_sae, dtype=np.int64)
    for i in order:
        f = int(cand_feat[i])
        window, pos = meta[cand_row[i]]
        lo = max(0, int(pos) - BEFORE)
        piece = windows[window, lo : int(pos) + AFTER + 1]
        piece = piece[piece >= 0]
        s = slot[f]
        ctx_tokens[f, s, : len(piece)] = piece
        ctx_peak[f, s] = int(pos) - lo
        ctx_value[f, s] = cand_val[i]
        slot[f] += 1
    return {
        "density": (counts / max(1, shards.n_rows)).astype(np.float32),
        "max_activation": maxima,
        "context_tokens": ctx_tokens,
        "context_peak": ctx_peak,
        "context_value": ctx_value,
        "tokens": np.asarray(shards.n_rows),
    }


def _top_per_feature(
    feat: np.ndarray, val: np.ndarray, window: np.ndarray, n_windows: int, top_n: int
) -> np.ndarray:
    """Indices of the best entry per (feature, window), then the ``top_n`` best per feature."""
    key = feat * n_windows + window
    order = np.lexsort((-val, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    best = order[first]
    order2 = best[np.lexsort((-val[best], feat[best]))]
    f_sorted = feat[order2]
    starts = np.r_[0, np.nonzero(f_sorted[1:] != f_sorted[:-1])[0] + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(f_sorted)]))
    rank = np.arange(len(order2)) - group_start
    top: np.ndarray = order2[rank < top_n]
    return top


def save_atlas(atlas: dict[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **atlas)  # type: ignore[arg-type]
    tmp.replace(path)


def load_card(path: Path, index: int) -> FeatureCard:
    """One feature's statistics and contexts from an ``atlas.npz``."""
    with np.load(path) as atlas:
        d_sae = len(atlas["density"])
        if not 0 <= index < d_sae:
            raise IndexError(f"feature {index} is outside 0..{d_sae - 1}")
        contexts = []
        for tokens, peak, value in zip(
            atlas["context_tokens"][index],
            atlas["context_peak"][index],
            atlas["context_value"][index],
            strict=True,
        ):
            if peak >= 0:
                contexts.append(
                    ([int(t) for t in tokens if t != NO_TOKEN], int(peak), float(value))
                )
        return FeatureCard(
            index, float(atlas["density"][index]), float(atlas["max_activation"][index]), contexts
        )


def atlas_tensor_summary(path: Path) -> dict[str, float]:
    """Counts used in docs and tests: tokens scanned and how many features have contexts."""
    with np.load(path) as atlas:
        return {
            "tokens": int(atlas["tokens"]),
            "features_with_contexts": int((atlas["context_peak"][:, 0] >= 0).sum()),
            "d_sae": len(atlas["density"]),
        }
