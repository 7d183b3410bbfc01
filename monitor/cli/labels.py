"""``safety-monitor detectors labels export``: triaged alerts as a labelled set (and a sample of
stored traffic) for ``detectors eval`` and ``detectors calibrate`` (``monitor.service.labels``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from monitor.cli.audit import SinceOpt, TenantOpt, UntilOpt
from monitor.cli.common import JsonOpt, err, fail, out
from monitor.cli.detectors import CatalogOpt, _catalog_paths
from monitor.cli.service import _database, _settings

labels_app = typer.Typer(
    help="Labels from triage: triaged alerts as a labelled set.", no_args_is_help=True
)


def _label_ids(detector: str, catalog: list[Path] | None) -> list[str]:
    """The detector and the rule it is judged by (a probe's ``signal_of``), from the catalog;
    the detector alone when the catalog does not define it."""
    from detectors.rules import RuleError, load_definitions

    try:
        specs = {s.id: s for _f, s in load_definitions(_catalog_paths(catalog))}
    except RuleError as exc:
        raise fail(str(exc)) from exc
    spec = specs.get(detector)
    if spec is None:
        err.print(f"[yellow]note[/] {detector!r} is not in the catalog: labelled under its id only")
        return [detector]
    return list(dict.fromkeys([detector, spec.judged_by]))


def _write(path: Path, docs: Iterable[dict[str, Any]]) -> None:
    """JSONL, whole or not at all."""
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise fail(f"{path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@labels_app.command("export")
def labels_export(
    detector: Annotated[str, typer.Option("--detector", help="The detector id.")],
    output: Annotated[Path, typer.Option("--out", help="Labelled JSONL to write (--data).")],
    since: SinceOpt = None,
    until: UntilOpt = None,
    tenant: TenantOpt = None,
    traffic_sample: Annotated[
        int,
        typer.Option(
            "--traffic-sample",
            min=0,
            max=1_000_000,
            help="Also write N stored turns drawn at random as traffic (--traffic).",
        ),
    ] = 0,
    traffic_out: Annotated[
        Path | None,
        typer.Option("--traffic-out", help="Where (default: OUT with .traffic.jsonl)."),
    ] = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the detector's triaged alerts as labelled examples: true_positive 1,
    false_positive 0 (unsure, unjudged, escalation and pruned ones left out), in the format
    `detectors eval --data` and `detectors calibrate --data` read."""
    from sqlalchemy.orm import Session

    from monitor.service.audit import parse_day
    from monitor.service.labels import ExportCounts, labelled_examples
    from monitor.service.labels import traffic_sample as sample

    try:
        start, end = parse_day(since, "--since"), parse_day(until, "--until")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    label_ids = _label_ids(detector, catalog)
    counts = ExportCounts()
    traffic_path = traffic_out or output.with_name(
        output.name.removesuffix(".jsonl") + ".traffic.jsonl"
    )
    engine = _database(_settings())
    try:
        with Session(engine) as session:
            examples = labelled_examples(
                session, detector, label_ids, counts, tenant=tenant, since=start, until=end
            )
            if not examples:
                raise fail(
                    f"no alerts of {detector!r} judged true_positive or false_positive "
                    f"({counts.unsure} unsure, {counts.pruned} with their turn pruned); "
                    "triage some first"
                )
            _write(output, examples)
            if traffic_sample:
                _write(
                    traffic_path,
                    sample(
                        session,
                        detector,
                        label_ids,
                        traffic_sample,
                        counts,
                        tenant=tenant,
                        since=start,
                        until=end,
                    ),
                )
    finally:
        engine.dispose()
    doc = {
        "out": str(output),
        "labels": label_ids,
        "examples": counts.examples,
        "positives": counts.positives,
        "negatives": counts.negatives,
        "left_out": {
            "unsure": counts.unsure,
            "pruned": counts.pruned,
            "conflicting": counts.conflicting,
        },
        "traffic_out": str(traffic_path) if traffic_sample else None,
        "traffic": counts.traffic,
    }
    if as_json:
        print(json.dumps(doc))
        return
    out.print(
        f"wrote {counts.examples} examples of {detector} to {output} "
        f"({counts.positives} true positives, {counts.negatives} false positives; left out: "
        f"{counts.unsure} unsure, {counts.pruned} pruned, {counts.conflicting} conflicting)",
        highlight=False,
    )
    if traffic_sample:
        out.print(f"wrote {counts.traffic} traffic turns to {traffic_path}", highlight=False)
    if not counts.positives or not counts.negatives:
        err.print(
            "[yellow]note[/] only one class: `detectors calibrate --data` needs false positives "
            "(negatives), `detectors eval` both"
        )
