"""Print, for docs/detectors.md, what each curated rule reads: its strongest features by weight,
their labels and their top atlas context. Usage: .venv/bin/python scripts/rule_tables.py [N]"""

from __future__ import annotations

import sys

from detectors.engine import catalog_dir
from detectors.rules import RuleSpec, load_definitions
from monitor.config import Settings
from monitor.models.loading import load_model
from monitor.sae.builtin import default_sae
from monitor.training.atlas import ATLAS_FILE, load_card


def main(top: int) -> None:
    settings = Settings()
    model = load_model(settings.model, settings.cache_dir, "cpu")
    sae = default_sae(model.name, model.adapter.d_model)
    assert sae.directory is not None
    atlas = sae.directory / ATLAS_FILE
    tok = model.tokenizer
    for _file, spec in load_definitions([catalog_dir()]):
        if not isinstance(spec, RuleSpec):
            continue
        cal = spec.calibration
        where = (
            f"; operating point at budget {cal.budget} on {cal.n_traffic} calibration turns"
            if cal and cal.budget is not None
            else ""
        )
        pos = sum(1 for f in spec.features if f.weight > 0)
        print(
            f"**`{spec.id}`** ({spec.severity}, scope `{spec.scope}`, {len(spec.features)} "
            f"features ({pos} weighted for, {len(spec.features) - pos} against), "
            f"{spec.aggregation.method} over tokens{where}); the {top} heaviest:\n"
        )
        print("| feature | weight | label | top atlas context (peak token in [brackets]) |")
        print("|---|---|---|---|")
        for f in sorted(spec.features, key=lambda f: -abs(f.weight))[:top]:
            card = load_card(atlas, f.index)
            context = ""
            if card.contexts:
                ids, peak, _v = card.contexts[0]
                lo, hi = max(0, peak - 8), min(len(ids), peak + 5)
                pieces = [tok.decode([i]) for i in ids[lo:hi]]
                pieces[peak - lo] = f"[{pieces[peak - lo]}]"
                context = "".join(pieces).replace("\n", "⏎").replace("|", "\\|")
            label = f.label.replace("|", "\\|")
            print(f"| {f.index} | {f.weight:+.2f} | {label} | `{context}` |")
        print()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
