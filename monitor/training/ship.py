"""``safety-monitor sae ship``: put a trained SAE into the package as the model's default.

Copies the fp16 SAE and its atlas, writes a small held-out evaluation sample beside it, measures
the sample, and writes ``metrics.json``: the held-out measures (over the whole captured held-out
split), the sample's, the commands that produced them and how long each stage took.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from monitor.models.loading import LoadedModel
from monitor.sae.builtin import EVAL_SAMPLE
from monitor.sae.saelens import CFG_FILE, WEIGHTS_FILE, load_sae
from monitor.training.atlas import ATLAS_FILE
from monitor.training.capture import document_windows
from monitor.training.corpus import read_documents
from monitor.training.evaluation import evaluate_windows

SAMPLE_DOCS_PER_SOURCE = 6
SAMPLE_CHARS = 3000
SAMPLE_LOSS_WINDOWS = 32
MAX_SHIPPED_BYTES = 25 * 2**20

COMMANDS = {
    "corpus": "safety-monitor corpus build --out work/corpus",
    "capture": "safety-monitor sae capture --corpus work/corpus --out work/activations",
    "train": "safety-monitor sae train --activations work/activations --out work/sae-run",
    "eval_heldout": "safety-monitor sae eval --sae work/sae-run/sae "
    "--activations work/activations/heldout --json",
    "atlas": "safety-monitor features atlas --sae work/sae-run/sae "
    "--activations work/activations/heldout",
    "ship": "safety-monitor sae ship",
    "eval_sample": "safety-monitor sae eval --json  (the bundled sample, default)",
}


def eval_sample(corpus_dir: Path) -> list[dict[str, Any]]:
    """The first held-out documents of every source, cut short: a fixed, small, mixed sample."""
    taken: dict[str, int] = {}
    sample = []
    for doc in read_documents(corpus_dir / "heldout.jsonl"):
        if taken.get(doc["source"], 0) >= SAMPLE_DOCS_PER_SOURCE:
            continue
        taken[doc["source"]] = taken.get(doc["source"], 0) + 1
        if "text" in doc:
            sample.append({**doc, "text": doc["text"][:SAMPLE_CHARS]})
        else:
            messages = [{**m, "content": m["content"][:SAMPLE_CHARS]} for m in doc["messages"]]
            sample.append({**doc, "messages": messages})
    return sample


def ship(
    run_dir: Path,
    corpus_dir: Path,
    activations_dir: Path,
    heldout_metrics: dict[str, Any],
    model: LoadedModel,
    dest: Path,
) -> dict[str, Any]:
    """Install ``run_dir/sae`` (with its atlas) as ``dest``; return the metrics written."""
    src = run_dir / "sae"
    sae = load_sae(src, expected_d_in=model.adapter.d_model)
    for name in (CFG_FILE, WEIGHTS_FILE, ATLAS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name}: missing (run the training steps first)")
    size = sum((src / n).stat().st_size for n in (CFG_FILE, WEIGHTS_FILE, ATLAS_FILE))
    if size > MAX_SHIPPED_BYTES:
        raise ValueError(f"{src}: {size / 2**20:.1f} MB is over the 25 MB package budget")
    layer = sae.hook_layer or model.default_layer
    sample = eval_sample(corpus_dir)
    windows = document_windows(iter(sample), model.tokenizer, 256)
    sample_metrics = evaluate_windows(model, sae, layer, windows, SAMPLE_LOSS_WINDOWS)
    corpus = json.loads((corpus_dir / "manifest.json").read_text())
    captures = {
        split: json.loads((activations_dir / split / "capture.json").read_text())
        for split in ("train", "heldout")
    }
    train = json.loads((run_dir / "train.json").read_text())
    metrics = {
        "model": model.name,
        "layer": layer,
        "architecture": sae.architecture,
        "d_sae": sae.d_sae,
        "k": sae.cfg.get("k"),
        "heldout": heldout_metrics,
        "bundled_sample": {
            **sample_metrics.to_dict(),
            "file": EVAL_SAMPLE,
            "loss_windows": SAMPLE_LOSS_WINDOWS,
        },
        "corpus_tokens": corpus["tokens"],
        "training": sae.cfg.get("training"),
        "seconds": {
            "corpus_build": corpus["build_seconds"],
            "capture_train": captures["train"]["seconds_this_run"],
            "capture_heldout": captures["heldout"]["seconds_this_run"],
            "train": round(train["seconds"], 1),
        },
        "commands": COMMANDS,
    }
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (CFG_FILE, WEIGHTS_FILE, ATLAS_FILE):
        shutil.copy2(src / name, tmp / name)
    with (tmp / EVAL_SAMPLE).open("w") as fh:
        for doc in sample:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return metrics
