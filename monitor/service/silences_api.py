"""Silences affecting the caller's tenant (its own and the all-tenant ones): listed (read role),
made and expired early (triage role; the all-tenant ones are the operator's, through the CLI).
While one is active, its detector's fires (those matching its feature pattern, if any) are
stored and counted, not alerted (``silences``)."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from monitor.service.api_models import SilenceOut, SilencesPage
from monitor.service.audit_api import IsoTime
from monitor.service.keys import Principal
from monitor.service.runtime import state_of
from monitor.service.schemas import AUTH_REFUSED, BODY_REFUSED
from monitor.service.silence_match import MAX_FEATURES
from monitor.service.silences import (
    MAX_REASON,
    SilenceError,
    SilenceNotFoundError,
    SilenceRefusedError,
    State,
    create,
    expire,
    listed,
    parse_duration,
    silence_json,
)
from monitor.service.storable import StorableStr

Name = Annotated[StorableStr, StringConstraints(min_length=1, max_length=64)]
SilenceId = Annotated[int, Path(ge=1, le=2**31 - 1)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such silence"}}


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    detector: Name = Field(description="A detector of a loaded pipeline.")
    pipeline: Name | None = Field(default=None, description="Only this pipeline (default: all).")
    features: Annotated[StorableStr, StringConstraints(max_length=MAX_FEATURES)] | None = Field(
        default=None,
        description="Only fires with an evidence feature matching one of these comma-separated "
        "items: an SAE feature index (6168), an inclusive range (7000-7100), or a case-"
        "insensitive glob on the feature's label (*praise*). Default: every fire.",
    )
    starts_at: IsoTime | None = Field(default=None, description="Default: now.")
    ends_at: IsoTime | None = Field(default=None, description="Or give duration.")
    duration: Annotated[StorableStr, StringConstraints(max_length=32)] | None = Field(
        default=None, description="90s, 30m, 2h, 7d, 1w or a sum (1h30m); at most 90 days."
    )
    reason: Annotated[StorableStr, StringConstraints(max_length=MAX_REASON)] = Field(
        description="Why: shown with the silence (not empty)."
    )


def _problem(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "type": "value_error", "msg": msg}])


def silences_router(role: Callable[[str], Callable[..., Principal]]) -> APIRouter:
    router = APIRouter(tags=["silences"], responses=AUTH_REFUSED)
    Reader = Annotated[Principal, Depends(role("read"))]
    Triager = Annotated[Principal, Depends(role("triage"))]

    @router.get("/v1/silences", response_model=SilencesPage)
    def get_silences(
        request: Request,
        who: Reader,
        state: State | None = None,
        detector: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        """The silences affecting this tenant (its own and the all-tenant ones: ``tenant`` null,
        ``all_tenants`` true), pending, active and expired (or one state), latest ending first,
        each with the fires it withheld."""
        with state_of(request).sessions() as session:
            return {"silences": listed(session, who.tenant, state, detector, limit)}

    @router.post("/v1/silences", status_code=201, response_model=SilenceOut, responses=BODY_REFUSED)
    def post_silence(body: SilenceIn, request: Request, who: Triager) -> dict[str, Any]:
        """Silence a detector (optionally one pipeline, only fires matching ``features``) for this
        tenant, from ``starts_at`` (now) to
        ``ends_at`` or for ``duration``: its fires are stored and counted, not alerted."""
        state = state_of(request)
        monitored = state.monitored
        if body.pipeline is not None and body.pipeline not in monitored:
            loaded = ", ".join(monitored)
            raise _problem("pipeline", f"no pipeline {body.pipeline!r}; loaded: {loaded}")
        pipelines = [monitored[body.pipeline]] if body.pipeline else list(monitored.values())
        known = {d for m in pipelines for d in m.summaries}
        if body.detector not in known:
            raise _problem("detector", f"no detector {body.detector!r} in the loaded pipelines")
        try:
            duration = parse_duration(body.duration) if body.duration is not None else None
        except ValueError as exc:
            raise _problem("duration", str(exc)) from None
        with state.sessions() as session:
            try:
                silence = create(
                    session,
                    tenant=who.tenant,
                    detector=body.detector,
                    pipeline=body.pipeline,
                    features=body.features,
                    reason=body.reason,
                    created_by=who.author,
                    starts_at=body.starts_at,
                    ends_at=body.ends_at,
                    duration=duration,
                )
            except SilenceError as exc:
                raise _problem(exc.field, str(exc)) from None
            session.commit()
            return silence_json(silence)

    @router.delete("/v1/silences/{silence_id}", response_model=SilenceOut, responses=NOT_FOUND)
    def delete_silence(silence_id: SilenceId, request: Request, who: Triager) -> dict[str, Any]:
        """Expire a silence now (it stays listed, with who ended it); fires alert again. An
        all-tenant silence: the operator's (403)."""
        with state_of(request).sessions() as session:
            try:
                silence = expire(session, who.tenant, silence_id, who.author, operator=False)
            except SilenceNotFoundError:
                raise HTTPException(404, f"no silence {silence_id}") from None
            except SilenceRefusedError as exc:
                raise HTTPException(403, str(exc)) from None
            session.commit()
            return silence_json(silence)

    return router
