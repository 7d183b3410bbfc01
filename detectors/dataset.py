"""Labelled conversation sets (JSONL) and their encoded form, cached per file and pipeline.

Each line: ``{"id": str, "messages": [{"role": ..., "content": ...}, ...],
"labels": {"<detector id>": 0 or 1, ...}}``; other keys (``split``, ``source``, ``pair``) are
kept as metadata. A malformed line is reported with its number and skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detectors.batch import TurnBatch
from monitor.messages import Message
from monitor.tokenization import InputError, parse_messages

if TYPE_CHECKING:
    from monitor.pipeline import Pipeline

ENCODE_CHUNK = 64  # turns per pipeline call while encoding a set (progress granularity)


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[Message]
    labels: dict[str, int]
    line: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelledSet:
    path: Path
    examples: list[Example]
    problems: list[str]  # "FILE:LINE: what was wrong", one per skipped line

    def labelled(self, detector: str) -> tuple[list[int], list[int]]:
        """Positions of the examples that label ``detector``, and their labels."""
        rows = [i for i, e in enumerate(self.examples) if detector in e.labels]
        return rows, [self.examples[i].labels[detector] for i in rows]

    def detectors(self) -> list[str]:
        return sorted({d for e in self.examples for d in e.labels})


def parse_example(raw: str, line: int) -> Example:
    """One JSONL line; ValueError says what is wrong with it."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    ex_id = doc.get("id")
    if not isinstance(ex_id, str) or not ex_id:
        raise ValueError("'id' must be a non-empty string")
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list of {role, content} objects")
    try:
        parsed = parse_messages(messages)
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError("'labels' must be a non-empty object of detector id to 0 or 1")
    for key, value in labels.items():
        if value not in (0, 1) or isinstance(value, bool):
            raise ValueError(f"label {key!r} must be 0 or 1, got {value!r}")
    meta = {k: v for k, v in doc.items() if k not in ("id", "messages", "labels")}
    return Example(ex_id, parsed, {str(k): int(v) for k, v in labels.items()}, line, meta)


def read_set(path: Path) -> LabelledSet:
    """Read a labelled JSONL file; bad lines go into ``problems``, never stop the read."""
    examples: list[Example] = []
    problems: list[str] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                ex = parse_example(raw, number)
            except ValueError as exc:
                problems.append(f"{path}:{number}: {exc}")
                continue
            if ex.id in seen:
                problems.append(f"{path}:{number}: id {ex.id!r} appears twice; later one skipped")
                continue
            seen.add(ex.id)
            examples.append(ex)
    return LabelledSet(path, examples, problems)


def pipeline_key(pipeline: Pipeline) -> str:
    """What the encoded features depend on besides the text."""
    return json.dumps(
        {
            "model": pipeline.model.name,
            "layer": pipeline.layer,
            "sae": pipeline.sae.fingerprint,
            "max_tokens": pipeline.tokenizer.max_tokens,
            "version": 1,
        },
        sort_keys=True,
    )


def encode_examples(
    pipeline: Pipeline,
    inputs: Sequence[Sequence[Message] | str],
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TurnBatch:
    """Encode conversations (or texts) into one batch, reusing a cached encoding when present."""
    digest = hashlib.sha256(pipeline_key(pipeline).encode())
    for item in inputs:
        if isinstance(item, str):
            digest.update(b"T" + item.encode())
        else:
            for m in item:
                digest.update(f"M{m.role}:{len(m.content)}:".encode() + m.content.encode())
        digest.update(b"\x00")
    cached = cache_dir / f"{digest.hexdigest()[:32]}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        if progress:
            progress(len(inputs), len(inputs))
        return TurnBatch.load(cached)
    parts = []
    for start in range(0, len(inputs), ENCODE_CHUNK):
        chunk = list(inputs[start : start + ENCODE_CHUNK])
        parts.append(TurnBatch.from_encoded(pipeline.encode(chunk)))
        if progress:
            progress(min(start + ENCODE_CHUNK, len(inputs)), len(inputs))
    batch = TurnBatch.concat(parts)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        batch.save(cached)
    return batch
