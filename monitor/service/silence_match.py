"""A silence's feature pattern: which fires of its detector it withholds, by their evidence.

The pattern is comma-separated items, each an SAE feature index (``6168``), an inclusive range
of them (``7000-7100``), or otherwise a case-insensitive glob (``fnmatch``: ``*``, ``?``,
``[...]``) on the whole of a feature's label (``*praise*``). A fire matches when at least one
feature of its evidence (``evidence["features"]``: ``{"index", "label", ...}`` each) matches at
least one item; a fire with no evidence features matches no pattern.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from monitor.service.storable import text_problem

MAX_FEATURES = 200  # characters of a pattern, as given and as stored
MAX_INDEX = 2**31 - 1
_INDEX = re.compile(r"[0-9]+", re.ASCII)
_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)", re.ASCII)
_NUMERIC = re.compile(r"[0-9\s+-]+", re.ASCII)  # what reads as a number, well formed or not


@dataclass(frozen=True)
class FeaturePattern:
    """A parsed pattern: indices, inclusive ranges of them, label globs (lower case)."""

    indices: frozenset[int]
    ranges: tuple[tuple[int, int], ...]
    globs: tuple[str, ...]

    def matches(self, feature: Mapping[str, Any]) -> bool:
        index, label = feature.get("index"), feature.get("label")
        if isinstance(index, int) and not isinstance(index, bool) and self._has(index):
            return True
        if isinstance(label, str) and self.globs:
            folded = label.lower()
            return any(fnmatch.fnmatchcase(folded, g) for g in self.globs)
        return False

    def _has(self, index: int) -> bool:
        return index in self.indices or any(lo <= index <= hi for lo, hi in self.ranges)

    def any_of(self, features: Iterable[Any]) -> bool:
        """Whether at least one of the evidence's features matches."""
        return any(isinstance(f, Mapping) and self.matches(f) for f in features)


def _index(text: str, item: str) -> int:
    value = int(text)
    if value > MAX_INDEX:
        raise ValueError(f"{item!r}: a feature index is at most {MAX_INDEX}")
    return value


def normalise(text: str) -> tuple[FeaturePattern, str]:
    """The pattern and its normalised text (items stripped and comma-separated, ranges without
    spaces, globs lower case, repeats dropped); ValueError naming the item at fault."""
    if (problem := text_problem(text)) is not None:
        raise ValueError(problem)
    if len(text) > MAX_FEATURES:
        raise ValueError(f"at most {MAX_FEATURES} characters")
    indices: list[int] = []
    ranges: list[tuple[int, int]] = []
    globs: list[str] = []
    items: list[str] = []
    for n, raw in enumerate(text.split(","), 1):
        item = raw.strip()
        if not item:
            raise ValueError(f"item {n} is empty (items are separated by single commas)")
        if _INDEX.fullmatch(item):
            indices.append(_index(item, item))
            norm = str(indices[-1])
        elif found := _RANGE.fullmatch(item):
            lo, hi = _index(found.group(1), item), _index(found.group(2), item)
            if lo > hi:
                raise ValueError(f"{item!r}: a range runs from low to high ({hi}-{lo})")
            ranges.append((lo, hi))
            norm = f"{lo}-{hi}"
        elif _NUMERIC.fullmatch(item):
            raise ValueError(
                f"{item!r} is neither a feature index (0 or more) nor a range like 7000-7100"
            )
        else:
            norm = item.lower()
            if not norm.replace("*", "").replace("?", "").strip():
                raise ValueError(
                    f"{item!r} would match every feature label; name some of the label "
                    "(*praise*), or leave features empty to silence every fire"
                )
            globs.append(norm)
        if norm not in items:
            items.append(norm)
    stored = ", ".join(items)
    if len(stored) > MAX_FEATURES:
        raise ValueError(f"at most {MAX_FEATURES} characters (as stored: {stored[:40]}…)")
    return FeaturePattern(frozenset(indices), tuple(ranges), tuple(globs)), stored


@lru_cache(maxsize=512)
def compiled(stored: str) -> FeaturePattern:
    """A stored (already normalised) pattern, parsed once per process."""
    return normalise(stored)[0]


def fire_matches(stored: str | None, evidence: Mapping[str, Any]) -> bool:
    """Whether a silence with this pattern (None: no pattern) covers a fire with this evidence."""
    if stored is None:
        return True
    features = evidence.get("features")
    if not isinstance(features, list) or not features:
        return False
    try:
        pattern = compiled(stored)
    except ValueError:  # not stored by ``create`` (edited by hand): the fire alerts
        return False
    return pattern.any_of(features)
