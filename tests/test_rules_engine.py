"""Rule loading (every malformed case names file, rule and field) and engine arithmetic on
crafted sparse inputs, checked against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from detectors.batch import TurnBatch
from detectors.dataset import read_set
from detectors.engine import Engine, RuleDetector, bind, load_engine
from detectors.metrics import recall_at_fpr, threshold_for_fpr
from detectors.rules import RuleError, RuleSpec, load_definitions, parse_definition
from monitor.messages import Role
from monitor.sae.builtin import placeholder_topk_sae
from monitor.sae.sparse import SparseActivations

D_SAE = 64
SAE = placeholder_topk_sae(d_in=16, d_sae=D_SAE, k=4)


def rule_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "test_rule",
        "description": "crafted",
        "severity": "high",
        "sae": {"fingerprint": SAE.fingerprint},
        "features": [{"index": 3, "label": "three"}, {"index": 7, "label": "seven", "weight": 2}],
        "threshold": {"absolute": 1.0},
        "annotations": {"summary": "s"},
    }
    doc.update(over)
    return doc


def write(tmp_path: Path, doc: Any, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"severity": "urgent"}, "severity", "Input should be"),
        ({"features": []}, "features", "at least 1"),
        ({"features": [{"index": -1, "label": "x"}]}, "features.0.index", "greater than"),
        ({"features": [{"index": 1}]}, "features.0.label", "required field is missing"),
        ({"threshold": {"absolute": 1.0, "relative": 0.5}}, "threshold", "exactly one"),
        ({"threshold": {"relative": 1.5}}, "threshold.relative", "less than or equal"),
        ({"aggregation": {"method": "count_above"}}, "aggregation", "needs 'at_least'"),
        ({"aggregation": {"method": "median"}}, "aggregation.method", "Input should be"),
        ({"combine": {"method": "weighted_sum"}}, "combine", "'at_least' is required"),
        ({"scope": "tools"}, "scope", "Input should be"),
        ({"min_tokens": 0}, "min_tokens", "greater than or equal"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"sae": {"fingerprint": "abc"}}, "sae.fingerprint", "should match pattern"),
        ({"id": "Bad Id"}, "id", "should match pattern"),
        ({"kind": "magic"}, "kind", "must be 'rule' or 'probe'"),
        (
            {"features": [{"index": 1, "label": "a"}, {"index": 1, "label": "b"}]},
            "features",
            "appears twice",
        ),
    ],
)
def test_malformed_rules_name_file_rule_and_field(
    tmp_path: Path, change: dict[str, Any], field: str, fragment: str
) -> None:
    path = write(tmp_path, rule_doc(**change))
    with pytest.raises(RuleError) as info:
        load_definitions([path])
    exc = info.value
    assert exc.file == str(path)
    assert exc.field == field
    assert fragment in exc.message
    assert exc.rule in ("test_rule", "Bad Id")
    assert str(path) in str(exc) and field in str(exc)


def test_missing_field_and_bad_yaml_and_duplicates(tmp_path: Path) -> None:
    doc = rule_doc()
    del doc["severity"]
    with pytest.raises(RuleError, match=r"rule 'test_rule': field 'severity': required"):
        load_definitions([write(tmp_path, doc)])
    with pytest.raises(RuleError, match=r"not valid YAML at line 2"):
        load_definitions([write(tmp_path, "id: x\n  bad: [unclosed\n", "bad.yaml")])
    with pytest.raises(RuleError, match="must be a mapping"):
        load_definitions([write(tmp_path, "- just\n- strings\n", "list.yaml")])
    d = tmp_path / "cat"
    d.mkdir()
    write(d, rule_doc(), "a.yaml")
    write(d, rule_doc(), "b.yaml")
    with pytest.raises(RuleError, match=r"b.yaml: rule 'test_rule': field 'id': already defined"):
        load_definitions([d])


def test_rule_for_another_sae_is_refused(tmp_path: Path) -> None:
    other = placeholder_topk_sae(d_in=16, d_sae=D_SAE, k=4, seed=1)
    assert other.fingerprint != SAE.fingerprint
    path = write(tmp_path, rule_doc())
    load_engine([path], SAE)  # its own SAE loads
    with pytest.raises(RuleError) as info:
        load_engine([path], other)
    assert info.value.field == "sae.fingerprint"
    assert SAE.fingerprint in str(info.value) and other.fingerprint in str(info.value)


def test_feature_outside_sae_and_relative_without_atlas(tmp_path: Path) -> None:
    spec = parse_definition(rule_doc(features=[{"index": D_SAE, "label": "x"}]))
    with pytest.raises(RuleError, match=r"features.0.index.*outside"):
        bind("f.yaml", spec, SAE, None)
    spec = parse_definition(rule_doc(threshold={"relative": 0.5}))
    with pytest.raises(RuleError, match="needs the SAE's feature atlas"):
        bind("f.yaml", spec, SAE, None)


# ---- engine arithmetic ---------------------------------------------------------------------


def crafted_batch(seed: int = 0) -> tuple[TurnBatch, list[np.ndarray], list[np.ndarray]]:
    """Three turns of random sparse features; also their dense forms and roles for checking."""
    gen = np.random.default_rng(seed)
    dense_turns, role_turns, parts, roles, ids = [], [], [], [], []
    for n in (6, 9, 4):
        dense = np.zeros((n, D_SAE), dtype=np.float32)
        for t in range(1, n):  # the first token of a turn gets no features, as in the pipeline
            active = gen.choice(D_SAE, size=4, replace=False)
            active[:2] = gen.choice([3, 7, 11], size=2, replace=False)
            dense[t, active] = gen.uniform(0.2, 3.0, size=4).astype(np.float32)
        r = gen.choice(
            [int(Role.SYSTEM), int(Role.USER), int(Role.ASSISTANT), int(Role.TOOL)], size=n
        )
        dense_turns.append(dense)
        role_turns.append(r)
        counts = torch.from_numpy((dense > 0).sum(1))
        nz = np.nonzero(dense)
        parts.append(
            SparseActivations.from_counts(
                counts, torch.from_numpy(nz[1]), torch.from_numpy(dense[nz]), D_SAE
            )
        )
        roles.append(torch.from_numpy(r))
        ids.append(torch.arange(n))
    offsets = torch.tensor([0, 6, 15, 19])
    batch = TurnBatch(SparseActivations.concat(parts), torch.cat(roles), torch.cat(ids), offsets)
    return batch, dense_turns, role_turns


SCOPES: dict[str, tuple[Role, ...] | None] = {
    "all": None,
    "user": (Role.USER,),
    "assistant": (Role.ASSISTANT,),
    "system": (Role.SYSTEM,),
    "tool": (Role.TOOL,),
    "untrusted": (Role.USER, Role.TOOL),
}


def direct_score(spec: RuleSpec, dense: np.ndarray, roles: np.ndarray) -> tuple[float, bool]:
    """The documented semantics, computed the plain way."""
    scope = SCOPES[spec.scope]
    mask = np.ones(len(roles), bool) if scope is None else np.isin(roles, [int(r) for r in scope])
    mask[0] = False
    ratios, weights = [], []
    for f in spec.features:
        a = dense[mask, f.index]
        tau = (f.threshold or spec.threshold).absolute
        assert tau is not None
        m = spec.aggregation.method
        if m == "max":
            v, c = (a.max() if a.size else 0.0), tau
        elif m == "mean":
            v, c = (a.mean() if a.size else 0.0), tau
        elif m == "count_above":
            v, c = float((a >= tau).sum()), spec.aggregation.at_least
        else:
            v, c = (float((a >= tau).mean()) if a.size else 0.0), spec.aggregation.at_least
        assert c is not None
        ratios.append(v / c)
        weights.append(f.weight)
    if spec.combine.method == "any":
        score = max(ratios)
    elif spec.combine.method == "all":
        score = min(ratios)
    else:
        assert spec.combine.at_least is not None
        score = sum(w * r for w, r in zip(weights, ratios, strict=True)) / spec.combine.at_least
    return score, bool(score >= 1.0 and mask.sum() >= spec.min_tokens)


AGGREGATIONS = [
    {"method": "max"},
    {"method": "mean"},
    {"method": "count_above", "at_least": 2},
    {"method": "fraction_above", "at_least": 0.25},
]
COMBINATIONS = [{"method": "any"}, {"method": "all"}, {"method": "weighted_sum", "at_least": 1.5}]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("combine", COMBINATIONS)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_engine_matches_direct_computation(
    aggregation: dict[str, Any], combine: dict[str, Any], scope: str
) -> None:
    batch, dense_turns, role_turns = crafted_batch()
    spec = parse_definition(
        rule_doc(
            aggregation=aggregation,
            combine=combine,
            scope=scope,
            min_tokens=2,
            features=[
                {"index": 3, "label": "three"},
                {"index": 7, "label": "seven", "weight": 2.0},
                {"index": 11, "label": "eleven", "threshold": {"absolute": 0.5}},
            ],
        )
    )
    assert isinstance(spec, RuleSpec)
    engine = Engine([bind("t.yaml", spec, SAE, None)], D_SAE)
    verdicts = engine.evaluate(batch)
    for t, (dense, roles) in enumerate(zip(dense_turns, role_turns, strict=True)):
        score, fired = direct_score(spec, dense, roles)
        v = verdicts[t][0]
        assert v.score == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert v.fired == fired
        assert v.severity == "high"
        if v.fired:
            assert v.features and v.features[0].index in (3, 7, 11)
            for tok in v.tokens:  # evidence tokens are in scope
                in_scope = SCOPES[scope]
                assert in_scope is None or roles[tok.position] in [int(r) for r in in_scope]
                assert dense[tok.position, tok.feature] == pytest.approx(tok.activation)


def test_scaling_a_rule_divides_its_scores() -> None:
    batch, _, _ = crafted_batch(seed=3)
    for aggregation in AGGREGATIONS:
        for combine in COMBINATIONS:
            spec = parse_definition(rule_doc(aggregation=aggregation, combine=combine))
            assert isinstance(spec, RuleSpec)
            a = RuleDetector(spec, None, "t")
            b = RuleDetector(spec.scaled(2.0), None, "t")
            dense_a = torch.zeros(batch.n_tokens, 0)
            e = Engine([a], D_SAE)
            sa = e.score(batch)[a.id][0]
            sb = Engine([b], D_SAE).score(batch)[b.id][0]
            assert dense_a.numel() == 0
            if aggregation["method"] == "fraction_above" and combine["method"] != "weighted_sum":
                continue  # shares are capped at 1 after scaling; checked by the rule schema
            torch.testing.assert_close(sb, sa / 2.0)


def test_relative_threshold_uses_atlas_maximum() -> None:
    atlas_max = np.full(D_SAE, 4.0, dtype=np.float32)
    spec = parse_definition(rule_doc(threshold={"relative": 0.5}))
    det = bind("t.yaml", spec, SAE, atlas_max)
    assert isinstance(det, RuleDetector)
    assert det.tau.tolist() == [2.0, 2.0]


def test_metrics() -> None:
    neg = np.arange(100, dtype=float)
    t = threshold_for_fpr(neg, 0.01)
    assert (neg >= t).sum() == 1
    assert (neg >= threshold_for_fpr(neg, 0.0)).sum() == 0
    y = np.r_[np.zeros(100), np.ones(10)]
    s = np.r_[neg, np.arange(99, 109, dtype=float)]  # one positive ties the top negative
    assert recall_at_fpr(y, s, 0.01) == pytest.approx(1.0)
    assert recall_at_fpr(y, s, 0.0) == pytest.approx(0.9)


def test_labelled_file_reports_bad_lines_and_keeps_the_rest(tmp_path: Path) -> None:
    good = {"id": "a", "messages": [{"role": "user", "content": "hi"}], "labels": {"x": 1}}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "b", "messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({**good, "id": "c", "labels": {"x": 2}}),
        json.dumps({**good, "id": "d", "messages": []}),
        json.dumps(good),
        "",
        json.dumps({**good, "id": "e", "labels": {"x": 0}}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = read_set(path)
    assert [e.id for e in data.examples] == ["a", "e"]
    numbers = [p.split(":")[1] for p in data.problems]
    assert numbers == ["2", "3", "4", "5", "6"]
    assert "appears twice" in data.problems[-1]
    assert data.labelled("x") == ([0, 1], [1, 0])


def _batch_from_dense(turns: list[np.ndarray]) -> TurnBatch:
    parts, roles, ids, lengths = [], [], [], []
    for dense in turns:
        counts = torch.from_numpy((dense > 0).sum(1))
        nz = np.nonzero(dense)
        parts.append(
            SparseActivations.from_counts(
                counts, torch.from_numpy(nz[1]), torch.from_numpy(dense[nz]), D_SAE
            )
        )
        roles.append(torch.full((len(dense),), int(Role.USER)))
        ids.append(torch.arange(len(dense)))
        lengths.append(len(dense))
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()])
    return TurnBatch(SparseActivations.concat(parts), torch.cat(roles), torch.cat(ids), offsets)


def _random_turns(
    gen: np.random.Generator, n: int, features: dict[int, tuple[float, float, float]]
) -> list[np.ndarray]:
    """``n`` turns of 6 tokens: feature 9 on every token after the first (no signal), and each
    of ``features`` (index: probability per token, low, high) drawn uniformly where it fires."""
    out = []
    for _ in range(n):
        dense = np.zeros((6, D_SAE), dtype=np.float32)
        for t in range(1, 6):
            dense[t, 9] = gen.uniform(0.5, 2.0)
            for index, (p, lo, hi) in features.items():
                if gen.random() < p:
                    dense[t, index] = gen.uniform(lo, hi)
        out.append(dense)
    return out


def test_linear_draft_weights_features_and_binds_as_an_equivalent_rule() -> None:
    from detectors.discovery import draft_linear_rule, linear_draft_scores

    gen = np.random.default_rng(1)

    def turns(n: int, positive: bool) -> list[np.ndarray]:
        # 5: the positives' feature; 12: ordinary traffic's
        return _random_turns(gen, n, {5: (0.7, 1.0, 3.0)} if positive else {12: (0.3, 1.0, 3.0)})

    y = np.r_[np.ones(40), np.zeros(120)].astype(int)
    train = _batch_from_dense(turns(40, True) + turns(120, False))
    dev = _batch_from_dense(turns(40, True) + turns(120, False))
    atlas = np.full(D_SAE, 3.0, dtype=np.float32)
    draft = draft_linear_rule(train, y, dev, y, "user", atlas, select_fpr=0.01, max_features=8)
    weights = dict(draft.features)
    assert weights.get(5, 0) > 0 and weights.get(12, 0) <= 0
    assert draft.dev_auroc > 0.95 and draft.at_least > 0
    spec = parse_definition(
        rule_doc(
            scope="user",
            threshold={"relative": 1.0},
            aggregation={"method": "max"},
            features=[{"index": i, "label": f"f{i}", "weight": w} for i, w in draft.features],
            combine={"method": "weighted_sum", "at_least": draft.at_least},
        )
    )
    rule = bind("r.yaml", spec, SAE, atlas)
    engine = Engine([rule], D_SAE)
    scores, fired = engine.score(dev)["test_rule"]
    np.testing.assert_allclose(
        scores.numpy(), linear_draft_scores(dev, draft, "user", atlas), rtol=1e-5
    )
    for turn in engine.evaluate(dev):
        if turn[0].fired:  # a negatively weighted feature is never named as the reason
            assert all(weights[f.index] > 0 for f in turn[0].features)
            assert {t.feature for t in turn[0].tokens} <= {i for i, w in weights.items() if w > 0}
    assert bool(fired[:40].float().mean() > 0.8) and bool(fired[40:].float().mean() < 0.1)


def test_balanced_sources_weigh_a_small_source_as_much_as_a_large_one() -> None:
    """`draft --balance-sources`: 100 positives of one source would drown 10 of another."""
    from detectors.discovery import _group_merit, draft_linear_rule, group_weights

    y = np.array([1, 1, 1, 0, 0])
    w = group_weights(y, ["big", "big", "small", "x", "y"])
    np.testing.assert_allclose(w, [0.75, 0.75, 1.5, 1, 1])  # each source 1.5 of the 3
    with pytest.raises(ValueError, match="2 groups for 5 labels"):
        group_weights(y, ["a", "b"])

    gen = np.random.default_rng(3)

    features = {  # the negatives have the small source's feature too, weaker
        "big": {5: (0.7, 1.0, 3.0)},
        "small": {7: (0.7, 1.0, 3.0)},
        "neg": {7: (0.04, 0.5, 1.5)},
    }

    def turns(n: int, kind: str) -> list[np.ndarray]:
        return _random_turns(gen, n, features[kind])

    def split() -> tuple[TurnBatch, np.ndarray, list[str]]:
        kinds = ["big"] * 100 + ["small"] * 10 + ["neg"] * 300
        batch = _batch_from_dense(turns(100, "big") + turns(10, "small") + turns(300, "neg"))
        return batch, np.array([int(k != "neg") for k in kinds]), kinds

    (train, y_train, g_train), (dev, y_dev, g_dev) = split(), split()
    atlas = np.full(D_SAE, 3.0, dtype=np.float32)
    plain = draft_linear_rule(train, y_train, dev, y_dev, "user", atlas, 0.01, 8)
    balanced = draft_linear_rule(
        train, y_train, dev, y_dev, "user", atlas, 0.01, 8, train_groups=g_train, dev_groups=g_dev
    )

    def small_recall(draft: object) -> float:
        from detectors.discovery import linear_draft_scores

        s = linear_draft_scores(dev, draft, "user", atlas)  # type: ignore[arg-type]
        keep = np.array([k != "big" for k in g_dev])
        return _group_merit(y_dev[keep], s[keep], None, 0.01)[0] or 0.0

    wp, wb = dict(plain.features), dict(balanced.features)
    assert wb.get(7, 0) / wb[5] > wp.get(7, 0) / wp[5], (plain.features, balanced.features)
    assert small_recall(balanced) >= small_recall(plain)
    assert balanced.dev_recall is not None and 0 < balanced.dev_recall <= 1
