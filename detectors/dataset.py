"""Labelled conversation sets (JSONL) and their encoded form, cached per file and pipeline.

Each line: ``{"id": str, "messages": [{"role": ..., "content": ...}, ...],
"labels": {"<detector id>": 0 or 1, ...}}``; other keys (``split``, ``source``, ``pair``) are
kept as metadata. A malformed line is reported with its number and skipped. Unlabelled traffic
(``labels`` empty or absent) is read the same way when the caller allows it.

Encodings are cached per example (content and pipeline), so the same real-traffic turns shared by
every detector's train file are encoded once, not once per file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detectors.batch import TurnBatch
from monitor.config import DEFAULT_MAX_INPUT_TOKENS
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


def parse_example(raw: str, line: int, labelled: bool = True) -> Example:
    """One JSONL line; ValueError says what is wrong with it. ``labelled=False`` accepts a line
    without labels (unlabelled traffic)."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    ex_id = doc.get("id", doc.get("turn_id"))  # turn_id: what `db export turns` writes
    if not isinstance(ex_id, str) or not ex_id:
        raise ValueError("'id' (or 'turn_id') must be a non-empty string")
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list of {role, content} objects")
    try:
        parsed = parse_messages(messages)
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    labels = doc.get("labels", None if labelled else {})
    if not isinstance(labels, dict) or (labelled and not labels):
        raise ValueError("'labels' must be a non-empty object of detector id to 0 or 1")
    for key, value in labels.items():
        if value not in (0, 1) or isinstance(value, bool):
            raise ValueError(f"label {key!r} must be 0 or 1, got {value!r}")
    meta = {k: v for k, v in doc.items() if k not in ("id", "messages", "labels")}
    return Example(ex_id, parsed, {str(k): int(v) for k, v in labels.items()}, line, meta)


def read_set(path: Path, labelled: bool = True) -> LabelledSet:
    """Read a labelled JSONL file; bad lines go into ``problems``, never stop the read.
    ``labelled=False`` also takes lines without labels (traffic)."""
    examples: list[Example] = []
    problems: list[str] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                ex = parse_example(raw, number, labelled)
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
    key: dict[str, object] = {
        "model": pipeline.model.name,
        "layer": pipeline.layer,
        "sae": pipeline.sae.fingerprint,
        "max_tokens": pipeline.window,
        "version": 2,
    }
    if pipeline.tokenizer.max_tokens != DEFAULT_MAX_INPUT_TOKENS:
        # absent at the default, so that encodings cached before windows existed stay found
        key["max_input_tokens"] = pipeline.tokenizer.max_tokens
    return json.dumps(key, sort_keys=True)


def encode_examples(
    pipeline: Pipeline,
    inputs: Sequence[Sequence[Message] | str],
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TurnBatch:
    """Encode conversations (or texts) into one batch, reusing cached encodings per example."""
    key = hashlib.sha256(pipeline_key(pipeline).encode()).hexdigest()[:16]
    store = cache_dir / key if cache_dir is not None else None
    names = [_example_digest(item) for item in inputs]
    parts: list[TurnBatch | None] = [None] * len(inputs)
    if store is not None:
        for i, name in enumerate(names):
            path = store / name[:2] / f"{name}.npz"
            if path.is_file():
                try:
                    parts[i] = TurnBatch.load(path)
                except (OSError, ValueError, KeyError):
                    parts[i] = None  # a damaged entry is encoded again
                cached = parts[i]
                if cached is not None and cached.n_tokens == pipeline.window:
                    # cached before inputs were read in windows, it may hold only the last
                    # window's tokens (a cut input kept exactly that many); the few such
                    # entries are encoded again, and a longer one was read in windows
                    parts[i] = None
    missing = [i for i, part in enumerate(parts) if part is None]
    done = len(inputs) - len(missing)
    if progress:
        progress(done, len(inputs))
    for start in range(0, len(missing), ENCODE_CHUNK):
        rows = missing[start : start + ENCODE_CHUNK]
        for i, encoded in zip(rows, pipeline.encode([inputs[i] for i in rows]), strict=True):
            one = TurnBatch.from_encoded([encoded])
            if store is not None:
                path = store / names[i][:2] / f"{names[i]}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                one.save(path)
                one = TurnBatch.load(path)  # stored at fp16: a hit and a miss read the same
            parts[i] = one
        done += len(rows)
        if progress:
            progress(done, len(inputs))
    return TurnBatch.concat([p for p in parts if p is not None])


def _example_digest(item: Sequence[Message] | str) -> str:
    digest = hashlib.sha256()
    if isinstance(item, str):
        digest.update(b"T" + item.encode())
    else:
        for m in item:
            digest.update(f"M{m.role}:{len(m.content)}:".encode() + m.content.encode())
    return digest.hexdigest()[:32]


def source_group(example: Example) -> str:
    """Which family of data an example comes from (for per-source numbers)."""
    source = str(example.meta.get("source", ""))
    if source.startswith("authored/plain_answers"):
        return "authored-plain"  # short benign answers: negatives of every detector
    if source.startswith("authored/"):
        return "authored"
    if source.startswith(("spam-", "easy-ham", "hard-ham")):
        return "spamassassin"
    if source == "sharegpt":
        return "sharegpt"
    return source.split("/", maxsplit=1)[0] or "unknown"
