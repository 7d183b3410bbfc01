"""The audit API (read role, tenant-scoped): search, export, backtest, feature cards."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from detectors.rules import RuleError, Severity
from monitor.service.api_models import AlertsPage, ConversationsPage, ConversationView
from monitor.service.audit import AuditFilter, parse_day
from monitor.service.backtest import backtest, candidate_from_catalog, candidate_from_text
from monitor.service.export import export
from monitor.service.ingest import UnknownPipelineError
from monitor.service.keys import Principal
from monitor.service.redacted import stored_conversation_id, stored_metadata_keys
from monitor.service.rows import alert_json, conversation_json
from monitor.service.runtime import state_of
from monitor.service.schemas import AUTH_REFUSED, BODY_REFUSED
from monitor.service.triage import MAX_ASSIGNEE, Status, Verdict
from monitor.service.views import conversation_view, feature_view

# The largest offset a listing takes: far past any real listing, and within what every
# back-end's OFFSET and a JSON client's numbers hold.
MAX_OFFSET = 2**53 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


def _iso_time(value: Any) -> Any:
    """ISO dates and times only (pydantic would also read ``0.5`` as a Unix time), in UTC."""
    if isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an ISO date or time (2026-11-21 or 2026-11-21T09:30Z)")
    try:
        return parse_day(value, "time")
    except ValueError:
        raise ValueError(
            "not an ISO date or time within years 1-9999 (2026-11-21 or 2026-11-21T09:30Z)"
        ) from None


IsoTime = Annotated[dt.datetime, BeforeValidator(_iso_time)]


class BacktestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: str | None = Field(default=None, description="A rule definition, as YAML text.")
    detector: str | None = Field(default=None, description="A catalog detector, by id.")
    model: str | None = Field(default=None, description="Pipeline (default: the first).")
    since: IsoTime | None = None
    until: IsoTime | None = None
    samples: int = Field(default=10, ge=0, le=100)

    @model_validator(mode="after")
    def _one_source(self) -> "BacktestIn":
        if (self.rule is None) == (self.detector is None):
            raise ValueError("give exactly one of rule (YAML text) or detector (an id)")
        return self


def audit_router(
    role: Callable[[str], Callable[..., Principal]], redact: Sequence[str]
) -> APIRouter:
    """The audit endpoints; ``role(name)`` is the app's dependency for a key with that role,
    ``redact`` the kinds redacted before storage (ids are looked up as stored)."""
    router = APIRouter(tags=["audit"], responses=AUTH_REFUSED)
    Reader = Annotated[Principal, Depends(role("read"))]

    def search(
        who: Reader,
        detector: str | None = None,
        severity: Severity | None = None,
        model: Annotated[str | None, Query(description="Pipeline name.")] = None,
        conversation_id: str | None = None,
        since: Annotated[IsoTime | None, Query(description="ISO date or time.")] = None,
        until: Annotated[IsoTime | None, Query(description="ISO date or time.")] = None,
        q: Annotated[str | None, Query(max_length=500, description="Text in the messages.")] = None,
        meta: Annotated[
            list[str], Query(description="Turn metadata FIELD=VALUE; repeatable.")
        ] = [],  # noqa: B006 (FastAPI copies defaults)
        status: Status | None = None,
        verdict: Annotated[
            Verdict | Literal["none"] | None, Query(description='"none": not judged yet.')
        ] = None,
        assignee: Annotated[
            str | None, Query(max_length=MAX_ASSIGNEE, description='"none": unassigned.')
        ] = None,
    ) -> AuditFilter:
        """The search parameters every audit listing and export shares, as one filter."""
        try:
            metadata = AuditFilter.parse_metadata(meta)
        except ValueError as exc:
            problem = {"loc": ["query", "meta"], "type": "value_error", "msg": str(exc)}
            raise HTTPException(422, [problem]) from None
        # Asked for by the ids the client sent: find them as stored (redacted).
        if conversation_id:
            conversation_id = stored_conversation_id(conversation_id, redact)
        metadata = stored_metadata_keys(metadata, redact)
        return AuditFilter(
            who.tenant,
            detector,
            severity,
            model,
            conversation_id,
            since,
            until,
            q or None,
            metadata,
            status=status,
            verdict=verdict,
            assignee=assignee or None,
        )

    Search = Annotated[AuditFilter, Depends(search)]

    @router.get("/v1/alerts", response_model=AlertsPage, response_model_exclude_unset=True)
    def get_alerts(
        request: Request,
        flt: Search,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Offset = 0,
        counts: bool = False,
    ) -> dict[str, Any]:
        """This tenant's alerts, newest first: filter by detector, severity, model, time,
        conversation, text of the turn, metadata fields, and triage status, verdict and
        assignee; ``counts`` adds the facets."""
        with state_of(request).sessions() as session:
            rows = session.scalars(flt.alerts().offset(offset).limit(limit + 1)).all()
            facets = flt.counts(session) if counts else None
        more = len(rows) > limit
        out: dict[str, Any] = {
            "alerts": [
                {**alert_json(a), "links": alert_links(a.conversation_id)} for a in rows[:limit]
            ],
            "next_offset": offset + limit if more else None,
        }
        if facets is not None:
            out["counts"] = facets
        return out

    @router.get("/v1/conversations", response_model=ConversationsPage)
    def search_conversations(
        request: Request,
        flt: Search,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """Conversations with a matching turn (detector/severity: one that alerted), newest
        first."""
        with state_of(request).sessions() as session:
            rows = session.execute(flt.conversations().offset(offset).limit(limit + 1)).all()
        more = len(rows) > limit
        return {
            "conversations": [
                {**conversation_json(r), "links": alert_links(r.conversation_id)}
                for r in rows[:limit]
            ],
            "next_offset": offset + limit if more else None,
        }

    # ``:path``: conversation ids may hold "/" (sent as is or as %2F).
    @router.get(
        "/v1/conversations/{conversation_id:path}",
        tags=["conversations"],
        response_model=ConversationView,
        responses={404: {"description": "no such conversation"}},
    )
    def get_conversation(
        conversation_id: str,
        request: Request,
        who: Reader,
        top: Annotated[int, Query(ge=1, le=32)] = 3,
        shade: Annotated[
            str | None, Query(description="feature:N or detector:ID (default: the alert's).")
        ] = None,
    ) -> dict[str, Any]:
        """A conversation's turns: messages, verdicts, alerts with their explanation, and per
        token its top features and a shade in [0, 1]."""
        state = state_of(request)
        stored = stored_conversation_id(conversation_id, redact)
        try:
            with state.sessions() as session:
                view = conversation_view(session, who.tenant, stored, state.monitored, shade, top)
        except ValueError as exc:
            problem = {"loc": ["query", "shade"], "type": "value_error", "msg": str(exc)}
            raise HTTPException(422, [problem]) from None
        if view is None:
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return view

    text = {"schema": {"type": "string"}}
    exported = {"content": {"application/x-ndjson": text, "text/csv": text}}

    @router.get("/v1/export/{what}", response_class=StreamingResponse, responses={200: exported})
    def export_rows(
        what: Literal["alerts", "turns"],
        request: Request,
        flt: Search,
        format: Literal["jsonl", "csv"] = "jsonl",
    ) -> StreamingResponse:
        """Alerts or turns (with their messages) for a filter, as JSONL or CSV, streamed a
        page at a time, oldest first."""
        media = "application/x-ndjson" if format == "jsonl" else "text/csv; charset=utf-8"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            export(state_of(request).sessions, what, format, flt),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{what}-{stamp}.{format}"'},
        )

    @router.post(
        "/v1/backtest", responses={**BODY_REFUSED, 404: {"description": "unknown pipeline"}}
    )
    async def post_backtest(body: BacktestIn, request: Request, who: Reader) -> dict[str, Any]:
        """Score a new or edited rule (or a catalog detector) over this tenant's stored turns,
        without alerting; compare with the current detector of the same id."""
        state = state_of(request)
        try:
            monitored = state.ingest.pipeline(body.model)
        except UnknownPipelineError as exc:
            raise HTTPException(404, str(exc)) from None
        try:
            candidate = (
                candidate_from_text(body.rule, "rule")
                if body.rule is not None
                else candidate_from_catalog(monitored, body.detector or "")
            )
            flt = AuditFilter(who.tenant, since=body.since, until=body.until)
            return await asyncio.to_thread(
                backtest, state.sessions, monitored, candidate, flt, body.samples
            )
        except RuleError as exc:
            where = ["body", "rule" if body.rule is not None else "detector"]
            if exc.field:
                where.append(exc.field)
            problem = {"loc": where, "type": "value_error", "msg": str(exc)}
            raise HTTPException(422, [problem]) from None

    @router.get(
        "/v1/features/{index}", responses={404: {"description": "unknown pipeline or feature"}}
    )
    def get_feature(
        index: int, request: Request, who: Reader, model: str | None = None
    ) -> dict[str, Any]:
        """A feature's card: label, density, maximum activation, atlas contexts, the detectors
        that read it, and this tenant's latest turns where it fired."""
        state = state_of(request)
        try:
            monitored = state.ingest.pipeline(model)
            with state.sessions() as session:
                return feature_view(session, who.tenant, monitored, index)
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from None

    return router


def alert_links(conversation_id: str) -> dict[str, str]:
    from urllib.parse import quote

    cid = quote(conversation_id, safe="")
    return {"conversation": f"/v1/conversations/{cid}", "ui": f"/ui/conversations/{cid}"}
