"""Markdown tables for docs/detectors.md from `detectors report --json` output.

    .venv/bin/python scripts/report_tables.py work/detector-report.json \
        [--before work/fire-rate-before.json]

``--before`` is `detectors fire-rate --json` of an earlier catalog on the same traffic, shown
beside the current fire rates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("--before", type=Path)
    args = ap.parse_args()
    rep = json.loads(args.report.read_text())
    before = json.loads(args.before.read_text())["detectors"] if args.before else {}
    dets = rep["detectors"]
    n = rep["traffic_test_turns"]

    print(f"Fires per 1,000 turns of the ShareGPT test buckets ({n} turns):\n")
    print("| detector | rule | SAE probe | dense probe | rule before |")
    print("|---|---|---|---|---|")
    for det, e in dets.items():
        probes = e["probes_fire_rate"]
        sae = probes.get(f"{det}_sae_probe")
        dense = probes.get(f"{det}_dense_probe")
        old = before.get(det, {}).get("per_1000")
        print(
            f"| `{det}` | {f(e['fire_rate']['per_1000'], 1)} | {f(sae, 1)} | {f(dense, 1)} "
            f"| {f(old, 1)} |"
        )

    for split in ("test", "external"):
        print(f"\n{split} split: AUROC (recall at 1% FPR); recall and FPR at the live point\n")
        print(
            "| detector | pos/neg | rule vs hard | rule vs traffic | live recall / FPR "
            "| SAE probe hard / traffic | dense probe hard / traffic "
            "| TF-IDF hard / traffic |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for det, e in dets.items():
            o = (e.get(split) or {}).get("overall")
            if not o:
                continue
            t = o.get("traffic") or {}
            tb = e["text_baseline"] if split == "test" else {}
            fpr = _live_fpr(e[split])
            print(
                f"| `{det}` | {o['n_pos']}/{o['n_neg']} "
                f"| {f(o['auroc'])} ({f(o['recall_at_1pct_fpr'], 2)}) "
                f"| {f(t.get('rule', {}).get('auroc'))} "
                f"({f(t.get('rule', {}).get('recall_at_1pct_fpr'), 2)}) "
                f"| {f(o['recall'], 2)} / {f(fpr, 2)} "
                f"| {f(o.get('sae_probe_auroc'))} / {f(t.get('sae_probe', {}).get('auroc'))} "
                f"| {f(o.get('dense_probe_auroc'))} / {f(t.get('dense_probe', {}).get('auroc'))} "
                f"| {f((tb.get('vs_hard_negatives') or {}).get('auroc'))} / "
                f"{f((tb.get('vs_traffic') or {}).get('auroc'))} |"
            )

        print(f"\n{split} split by source (rule): AUROC (recall at 1% FPR), live recall\n")
        print("| detector | source | pos/neg | vs hard negatives | live recall | vs traffic |")
        print("|---|---|---|---|---|---|")
        for det, e in dets.items():
            for src, g in ((e.get(split) or {}).get("by_source") or {}).items():
                h = g["vs_hard_negatives"]
                t = g.get("vs_traffic") or {}
                print(
                    f"| `{det}` | {src} | {h['n_pos']}/{h['n_neg']} "
                    f"| {f(h['auroc'])} ({f(h['recall_at_1pct_fpr'], 2)}) "
                    f"| {f(h.get('recall'), 2)} "
                    f"| {f(t.get('auroc'))} ({f(t.get('recall_at_1pct_fpr'), 2)}) |"
                )

    print("\nCross-source: the recipe fitted on one source, scored on another\n")
    print(
        "| detector | experiment | test pos/neg | signal | vs hard: AUROC, live recall "
        "| vs traffic: AUROC (recall at 1% FPR) | traffic fires at the budget |"
    )
    print("|---|---|---|---|---|---|---|")
    for det, e in dets.items():
        for x in e.get("cross_source") or []:
            for key in ("rule", "sae_probe", "dense_probe"):
                if key not in x:
                    continue
                h, t = x[key]["vs_hard_negatives"], x[key]["vs_traffic"]
                print(
                    f"| `{det}` | {x['name']} | {x['n_test_pos']}/{x['n_test_neg']} | {key} "
                    f"| {f(h['auroc'])}, {f(h.get('recall'), 2)} "
                    f"| {f(t['auroc'])} ({f(t['recall_at_1pct_fpr'], 2)}) "
                    f"| {f(x[key]['traffic_fire_rate'], 3)} |"
                )

    print("\nTop-scoring test-bucket turns per rule (fired ones first)\n")
    for det, e in dets.items():
        for t in e["fire_rate"]["top"]:
            mark = "FIRED" if t["fired"] else "quiet"
            print(f"- `{det}` {mark} {t['score']:.3f} {t['id']}: {t['preview'][:160]!r}")


def _live_fpr(split: dict[str, Any]) -> float | None:
    """FPR at the live point against the split's own negatives, pooled over its sources."""
    n = fp = 0.0
    for g in (split.get("by_source") or {}).values():
        h = g["vs_hard_negatives"]
        if h.get("fpr") is not None and h["n_neg"]:
            n += h["n_neg"]
            fp += h["fpr"] * h["n_neg"]
    return fp / n if n else None


if __name__ == "__main__":
    main()
