"""Discovery: which SAE features separate two sets of texts, and which fire most on one text.

This is how the curated catalog was built and how an operator extends it: collect positives and
hard negatives, rank features by AUROC of their max activation per example, read each
candidate's top tokens and atlas contexts, then write a rule and calibrate it on a dev split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from detectors.batch import TurnBatch, gather_columns
from detectors.probes import pooled_max_sparse
from detectors.rules import RuleSpec, load_definitions


@dataclass(frozen=True)
class FeatureScore:
    index: int
    auroc: float  # of the per-example max activation, positives against negatives
    mean_pos: float
    mean_neg: float
    fire_pos: float  # share of positives where it fires at all
    fire_neg: float

    @property
    def mean_diff(self) -> float:
        return self.mean_pos - self.mean_neg


def contrast(pos: TurnBatch, neg: TurnBatch, scope: str = "all") -> list[FeatureScore]:
    """Every feature that fires in either set, ranked by AUROC (best separating first)."""
    xp = pooled_max_sparse(pos, scope).tocsc()
    xn = pooled_max_sparse(neg, scope).tocsc()
    active = np.unique(np.r_[xp.nonzero()[1], xn.nonzero()[1]])
    if active.size == 0:
        return []
    dp = xp[:, active].toarray()
    dn = xn[:, active].toarray()
    n_pos, n_neg = dp.shape[0], dn.shape[0]
    ranks = rankdata(np.vstack([dp, dn]), axis=0)  # ties share their mean rank
    u = ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2
    auc = u / (n_pos * n_neg)
    scores = [
        FeatureScore(
            int(f),
            float(auc[j]),
            float(dp[:, j].mean()),
            float(dn[:, j].mean()),
            float((dp[:, j] > 0).mean()),
            float((dn[:, j] > 0).mean()),
        )
        for j, f in enumerate(active)
    ]
    return sorted(scores, key=lambda s: (-s.auroc, -s.mean_diff))


def strongest(batch: TurnBatch, scope: str = "all") -> list[tuple[int, float, int]]:
    """Active features: (index, max activation, tokens where active), strongest first."""
    pooled = pooled_max_sparse(batch, scope).max(axis=0).toarray()[0]
    f = batch.features
    token = torch.repeat_interleave(torch.arange(f.n_tokens), f.indptr[1:] - f.indptr[:-1])
    keep = batch.scope_mask(scope)[token]
    counts = np.bincount(f.indices[keep].numpy(), minlength=f.d_sae)
    order = np.argsort(-pooled)
    return [(int(i), float(pooled[i]), int(counts[i])) for i in order if pooled[i] > 0]


def top_token_ids(batch: TurnBatch, feature: int, n: int = 5, scope: str = "all") -> list[int]:
    """Distinct token ids where ``feature`` peaks in the batch, highest first."""
    col = gather_columns(batch.features, torch.tensor([feature]))[:, 0]
    col = col * batch.scope_mask(scope)
    out: list[int] = []
    for t in torch.argsort(col, descending=True).tolist():
        if col[t] <= 0 or len(out) >= n:
            break
        tid = int(batch.token_ids[t])
        if tid not in out:
            out.append(tid)
    return out


def catalog_labels(paths: Iterable[Path]) -> dict[int, str]:
    """Feature labels given by the rules of a catalog (first rule naming a feature wins)."""
    labels: dict[int, str] = {}
    for _file, spec in load_definitions(paths):
        if isinstance(spec, RuleSpec):
            for f in spec.features:
                labels.setdefault(f.index, f.label)
    return labels


@dataclass(frozen=True)
class Draft:
    features: list[tuple[int, float]]  # (index, cut-off: train positives' median aggregate)
    aggregation: str  # "max" or "mean"
    dev_auroc: dict[tuple[str, int], float]  # (aggregation, features used) -> dev AUROC
    chosen: int


def draft_rule(
    train: TurnBatch,
    y_train: np.ndarray,
    dev: TurnBatch,
    y_dev: np.ndarray,
    scope: str,
    sizes: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 16),
    select_fpr: float | None = None,
) -> Draft:
    """A rule from contrast: the top features on train, summed as ratios to their cut-offs.

    Each feature's cut-off is the median of its aggregate (max or mean over the scope) over the
    train positives where it fires. The aggregation and how many features to sum are chosen by
    AUROC on dev (fewest features wins a tie); with ``select_fpr``, by recall on dev at that
    false-positive rate first (the tail where an alert budget puts the operating point) and
    AUROC second. The operating point itself is left to ``detectors calibrate``.
    """
    from detectors.metrics import auroc, recall_at_fpr

    pos = [i for i, y in enumerate(y_train) if y == 1]
    neg = [i for i, y in enumerate(y_train) if y == 0]
    ranked = [s for s in contrast(train.select(pos), train.select(neg), scope) if s.auroc > 0.5]
    if not ranked:
        raise ValueError("no feature separates the positives from the negatives")
    top = ranked[: max(sizes)]
    columns = torch.tensor([s.index for s in top])
    results: dict[tuple[str, int], float] = {}
    tail: dict[tuple[str, int], float] = {}
    cutoffs: dict[str, list[float]] = {}
    for method in ("max", "mean"):
        pool = train.pooled_max if method == "max" else train.pooled_mean
        agg = pool(columns, scope).numpy()[pos]
        taus = []
        for j in range(len(top)):
            fired = agg[:, j][agg[:, j] > 0]
            taus.append(float(np.median(fired)) if fired.size else 1.0)
        cutoffs[method] = taus
        dev_pool = dev.pooled_max if method == "max" else dev.pooled_mean
        ratios = dev_pool(columns, scope).numpy() / np.asarray(taus)
        for n in sizes:
            if n <= len(top):
                results[(method, n)] = auroc(y_dev, ratios[:, :n].sum(1))
                if select_fpr is not None:
                    tail[(method, n)] = recall_at_fpr(y_dev, ratios[:, :n].sum(1), select_fpr)

    def merit(k: tuple[str, int]) -> tuple[float, float]:
        return (round(tail.get(k, 0.0), 3), round(results[k], 3))

    best = max(merit(k) for k in results)
    method, chosen = min(
        (k for k in results if merit(k) >= best), key=lambda k: (k[1], k[0] != "max")
    )
    taus = cutoffs[method]
    return Draft([(top[j].index, taus[j]) for j in range(chosen)], method, results, chosen)


def draft_scores(batch: TurnBatch, draft: Draft, scope: str) -> np.ndarray:
    """[n_turns] a draft's score before calibration: the sum of its features' ratios to their
    cut-offs (what a drafted weighted-sum rule compares with its ``at_least``)."""
    columns = torch.tensor([i for i, _tau in draft.features])
    pool = batch.pooled_max if draft.aggregation == "max" else batch.pooled_mean
    taus = np.asarray([tau for _i, tau in draft.features])
    scores: np.ndarray = np.asarray(pool(columns, scope).numpy() / taus).sum(1)
    return scores


@dataclass(frozen=True)
class LinearDraft:
    """A weighted-sum rule read off an L1 logistic regression on max-pooled SAE features."""

    features: list[tuple[int, float]]  # (index, weight): each feature's ratio to its atlas max
    at_least: float  # the weighted sum at which it fires (before calibration)
    c: float
    dev_auroc: float
    dev_recall: float | None  # at ``select_fpr`` on dev, when given


LINEAR_C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


def group_weights(y: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Sample weights under which every group's positives weigh the same in total (and all the
    positives together as much as unweighted); negatives weigh 1. So a source with 500
    positives does not drown one with 50 in the fit."""
    y = np.asarray(y)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"{g.size} groups for {y.size} labels")
    w = np.ones(y.size)
    pos = y == 1
    names = sorted(set(g[pos]))
    for name in names:
        sel = pos & (g == name)
        w[sel] = pos.sum() / (len(names) * sel.sum())
    return w


def _group_merit(
    y: np.ndarray, s: np.ndarray, groups: Sequence[str] | None, fpr: float | None
) -> tuple[float | None, float]:
    """(recall at ``fpr``, AUROC) on dev; with groups, each the mean over the positives' groups
    of that group's positives against all the negatives."""
    from detectors.metrics import auroc, recall_at_fpr

    if groups is None:
        return (recall_at_fpr(y, s, fpr) if fpr is not None else None), auroc(y, s)
    g = np.asarray(groups)
    recalls, aucs = [], []
    for name in sorted(set(g[y == 1])):
        keep = (y == 0) | (g == name)
        if fpr is not None:
            recalls.append(recall_at_fpr(y[keep], s[keep], fpr))
        aucs.append(auroc(y[keep], s[keep]))
    return (float(np.mean(recalls)) if fpr is not None else None), float(np.mean(aucs))


def draft_linear_rule(
    train: TurnBatch,
    y_train: np.ndarray,
    dev: TurnBatch,
    y_dev: np.ndarray,
    scope: str,
    atlas_max: np.ndarray,
    select_fpr: float | None = None,
    max_features: int = 128,
    train_groups: Sequence[str] | None = None,
    dev_groups: Sequence[str] | None = None,
) -> LinearDraft:
    """A rule whose features and weights come from an L1 logistic regression fitted against all
    the train negatives (real traffic among them), so each feature's weight says how much it
    counts and features that fire on ordinary traffic get none or a negative one.

    The rule reads each feature's max over the scope divided by its atlas maximum (a relative
    threshold of 1.0), sums them with the regression's weights, and fires at the regression's
    own decision boundary until ``detectors calibrate`` moves it. The penalty is chosen on dev
    among fits that keep at most ``max_features`` features: by recall at ``select_fpr``, then
    AUROC. With ``train_groups`` (each example's source), every source's positives weigh the
    same in the fit; with ``dev_groups``, dev recall and AUROC are each source's, averaged.
    """
    from detectors.metrics import threshold_for_fpr
    from detectors.probes import _fit, atlas_scaled

    _scale, (x_train, x_dev) = atlas_scaled([train, dev], scope, atlas_max)
    weights = group_weights(y_train, train_groups) if train_groups is not None else None
    best: tuple[tuple[float, float], LinearDraft] | None = None
    for c in LINEAR_C_GRID:
        model = _fit(x_train, y_train, c, l1=True, sample_weight=weights)
        coef = model.coef_[0]
        keep = np.nonzero(coef)[0]
        if keep.size == 0 or keep.size > max_features:
            continue
        # The rule is the weighted sum without the intercept (liblinear penalises the intercept,
        # so it is no reliable cut-off): it starts where the dev negatives fire at the target
        # rate, and `detectors calibrate` moves it to the alert budget.
        s = np.asarray(x_dev @ coef).ravel()
        rec, dev_auc = _group_merit(y_dev, s, dev_groups, select_fpr)
        merit = (round(rec or 0.0, 3), round(dev_auc, 3))
        at_least = threshold_for_fpr(s[y_dev == 0], select_fpr or 0.01)
        if at_least < 1e-6:  # the negatives never get above zero: start below every positive
            above = s[(y_dev == 1) & (s > 0)]
            if above.size == 0:
                continue  # it would fire on a turn where none of its features is active
            at_least = float(above.min()) / 2
        draft = LinearDraft([(int(i), float(coef[i])) for i in keep], at_least, c, dev_auc, rec)
        if best is None or merit > best[0]:
            best = (merit, draft)
    if best is None:
        raise ValueError(
            f"no L1 fit kept between 1 and {max_features} features with a positive cut-off"
        )
    return best[1]


def linear_draft_scores(
    batch: TurnBatch, draft: LinearDraft, scope: str, atlas_max: np.ndarray
) -> np.ndarray:
    """[n_turns] a linear draft's weighted sum divided by its ``at_least`` (fires at 1)."""
    columns = torch.tensor([i for i, _w in draft.features])
    ratio = batch.pooled_max(columns, scope).numpy() / atlas_max[columns.numpy()]
    weights = np.asarray([w for _i, w in draft.features])
    return np.asarray(ratio @ weights / draft.at_least)
