"""What the audit UI's list pages read from their query: the filter (with what could not be
read, reported on the page), and the links that page through them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from fastapi import Request

from detectors.rules import SEVERITIES
from monitor.service.audit import AuditFilter, parse_day
from monitor.service.keys import Principal


@dataclass(frozen=True)
class ListingQuery:
    who: Principal | None
    flt: AuditFilter | None
    form: dict[str, str]
    errors: list[str]
    offset: int


def page_filter(
    p: Principal,
    errors: list[str],
    detector: str,
    severity: str,
    model: str,
    since: str,
    until: str,
    q: str,
    meta: list[str],
) -> AuditFilter:
    """The page's filter; what cannot be read is reported on the page and left out."""
    times = []
    for name, value in (("since", since), ("until", until)):
        try:
            times.append(parse_day(value, name))
        except ValueError:
            errors.append(f"{name}: {value!r} is not a date or time (2026-11-21T09:30)")
            times.append(None)
    if severity and severity not in SEVERITIES:
        errors.append(f"severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
        severity = ""
    metadata: dict[str, str] = {}
    try:
        metadata = AuditFilter.parse_metadata([m for item in meta for m in item.split()])
    except ValueError as exc:
        errors.append(str(exc))
    return AuditFilter(
        p.tenant,
        detector or None,
        severity or None,
        model or None,
        None,
        times[0],
        times[1],
        q or None,
        metadata,
    )


def query_without_offset(request: Request) -> str:
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
    return urlencode(items)
