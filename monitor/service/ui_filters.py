"""What the audit UI's list pages read from their query: the filter (with what could not be
read, reported on the page), and the links that page through them; the forms' CSRF token.

The CSRF token is an HMAC of the session (the key in the ``HttpOnly`` login cookie): a page
of the session renders it in every form, every POST checks it. Another site can neither read
the cookie nor the page, so it cannot make the token; it needs no server state or shared
secret (every instance computes the same), and it changes when the user logs in with another key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import urlencode

from fastapi import Request
from sqlalchemy import Select, case

from detectors.rules import SEVERITIES, SEVERITY_RANK
from monitor.service.audit import NONE, AuditFilter, parse_day
from monitor.service.db import Alert
from monitor.service.keys import Principal
from monitor.service.redacted import stored_metadata_keys
from monitor.service.triage import STATUSES, VERDICTS

T = TypeVar("T")
# What the list pages filter by (besides ``meta``, which may repeat): the query's names.
FILTER_FIELDS = (
    *("detector", "severity", "model", "since", "until", "q"),
    *("status", "verdict", "assignee"),
)


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
    status: str = "",
    verdict: str = "",
    assignee: str = "",
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
    if status and status not in STATUSES:
        errors.append(f"status: {status!r} is not one of {', '.join(STATUSES)}")
        status = ""
    if verdict and verdict not in (*VERDICTS, NONE):
        errors.append(f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}, none")
        verdict = ""
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
        status=status or None,
        verdict=verdict or None,
        assignee=assignee.strip() or None,
    )


def filter_from(
    p: Principal, query: Mapping[str, Sequence[str]], redact: Sequence[str]
) -> tuple[AuditFilter, list[str]]:
    """The filter of a list page's query (``parse_qs`` shape), metadata field names as stored
    (redacted), and what could not be read."""
    errors: list[str] = []
    one = {f: (list(query.get(f, ())) or [""])[0] for f in FILTER_FIELDS}
    flt = page_filter(p, errors, meta=list(query.get("meta", ())), **one)
    if flt.metadata:
        flt = replace(flt, metadata=stored_metadata_keys(flt.metadata, redact))
    return flt, errors


def filters_anything(query: Mapping[str, Sequence[str]]) -> bool:
    """Whether the query narrows the list at all (an empty filter selects every alert)."""
    return any(v.strip() for f in (*FILTER_FIELDS, "meta") for v in query.get(f, ()))


def most_severe_first(query: Select[T]) -> Select[T]:
    """The inbox's order: most severe first, then newest."""
    rank = case(SEVERITY_RANK, value=Alert.severity, else_=-1)
    return query.order_by(None).order_by(rank.desc(), Alert.created_at.desc(), Alert.id)


def csrf_token(session_key: str) -> str:
    """The CSRF token of the session whose login cookie holds ``session_key``."""
    return hmac.new(session_key.encode(), b"safety-monitor ui csrf", hashlib.sha256).hexdigest()


def csrf_ok(session_key: str | None, sent: str) -> bool:
    return bool(session_key) and hmac.compare_digest(csrf_token(session_key or ""), sent)


def query_without_offset(request: Request) -> str:
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
    return urlencode(items)
