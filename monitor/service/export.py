"""Export of matching alerts or turns as JSONL or CSV, streamed a page of rows at a time."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from monitor.service.audit import AuditFilter, keyset_pages
from monitor.service.db import Alert, Turn
from monitor.service.rows import alert_json, turn_json

log = logging.getLogger(__name__)

EXPORT_PAGE = 500
ALERT_COLUMNS = (
    "alert_id",
    "created_at",
    "conversation_id",
    "turn_id",
    "pipeline",
    "detector",
    "kind",
    "severity",
    "score",
    "suppressed",
    "summary",
    "status",
    "verdict",
    "assignee",
)
TURN_COLUMNS = (
    "turn_id",
    "created_at",
    "conversation_id",
    "pipeline",
    "n_tokens",
    "dropped_tokens",
    "sae_fingerprint",
    "metadata",
    "messages",
)


def export(
    sessions: sessionmaker[Session], what: str, fmt: str, flt: AuditFilter
) -> Iterator[bytes]:
    """Stream matching alerts or turns as JSONL or CSV, a page of rows at a time.

    Rows are read with keyset pagination (never the whole result in memory, no long-held
    cursor); each page is its own short read. A failure part-way is logged and raised to the
    consumer: the API's streamed reply is then aborted (the client sees an incomplete read, never
    a short file that looks complete), the CLI keeps no file.
    """
    if what not in ("alerts", "turns"):
        raise ValueError(f"export what={what!r}: choose alerts or turns")
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"export format={fmt!r}: choose jsonl or csv")
    columns = ALERT_COLUMNS if what == "alerts" else TURN_COLUMNS
    if fmt == "csv":
        yield _csv_line(columns)
    rows = 0
    try:
        for obj in _pages(sessions, what, flt):
            doc = alert_json(obj) if isinstance(obj, Alert) else turn_json(obj)
            if fmt == "jsonl":
                yield (json.dumps(doc, ensure_ascii=False) + "\n").encode()
            else:
                yield _csv_line([_cell(doc[c]) for c in columns])
            rows += 1
    except Exception:  # not GeneratorExit: a client going away is no failure
        log.exception("export of %s failed after %d rows; the output is incomplete", what, rows)
        raise


def _pages(sessions: sessionmaker[Session], what: str, flt: AuditFilter) -> Iterator[Any]:
    model: Any = Alert if what == "alerts" else Turn
    query = flt.alerts() if what == "alerts" else flt.turns()
    for rows, _ in keyset_pages(sessions, query, model, EXPORT_PAGE):
        yield from rows


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula (client-supplied ids, text) is quoted.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_line(cells: Any) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue().encode()
