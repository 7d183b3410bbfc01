"""The triage API (tenant-scoped): one alert with its notes and history (read role); changing
status, verdict and assignee, one alert or a filtered set, and adding notes (triage role)."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic import model_validator as after_model
from sqlalchemy.orm import Session

from detectors.rules import Severity
from monitor.service.api_models import AlertDetail, NoteOut, TriageOut
from monitor.service.audit import AuditFilter
from monitor.service.audit_api import IsoTime, alert_links
from monitor.service.db import Alert
from monitor.service.keys import Principal
from monitor.service.redacted import redactor, stored_conversation_id, stored_metadata_keys
from monitor.service.rows import alert_json
from monitor.service.runtime import state_of
from monitor.service.schemas import AUTH_REFUSED, BODY_REFUSED
from monitor.service.sink_settings import resolving_sinks
from monitor.service.storable import StorableStr
from monitor.service.triage import (
    FIELDS,
    MAX_ASSIGNEE,
    MAX_BULK,
    MAX_NOTE,
    AlertNotFoundError,
    StaleAlertError,
    Status,
    TooManyAlertsError,
    UnknownAlertsError,
    Verdict,
    add_note,
    change_many,
    change_one,
    find,
    note_json,
    notes_and_history,
)


def _stripped(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only white space")
    return text.strip()


Assignee = Annotated[
    StorableStr, StringConstraints(max_length=MAX_ASSIGNEE), AfterValidator(_stripped)
]
NoteText = Annotated[StorableStr, StringConstraints(max_length=MAX_NOTE), AfterValidator(_stripped)]
Short = Annotated[StorableStr, StringConstraints(max_length=256)]
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"description": "no such alert in this tenant"}}
STALE: Responses = {409: {"description": "the alert changed since the version sent: read it again"}}


class Change(BaseModel):
    """The triage fields to set; at least one. ``verdict`` or ``assignee`` null clears it."""

    model_config = ConfigDict(extra="forbid")
    status: Status | None = None
    verdict: Verdict | None = None
    assignee: Assignee | None = None

    @field_validator("status")
    @classmethod
    def _status_set(cls, value: Status | None) -> Status | None:
        if value is None:
            raise ValueError("status cannot be null: open, acknowledged or resolved")
        return value

    @after_model(mode="after")
    def _something(self) -> "Change":
        if not self.model_fields_set & set(FIELDS):
            raise ValueError("give at least one of status, verdict, assignee")
        return self

    def fields(self) -> dict[str, str | None]:
        return {f: getattr(self, f) for f in FIELDS if f in self.model_fields_set}


class AlertPatch(Change):
    version: int = Field(ge=1, le=2**31 - 1, description="The alert's version as read.")


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: NoteText = Field(description=f"At most {MAX_NOTE} characters; redacted as turns are.")


class TriageFilter(BaseModel):
    """What ``GET /v1/alerts`` filters by; at least one field."""

    model_config = ConfigDict(extra="forbid")
    detector: Short | None = None
    severity: Severity | None = None
    model: Short | None = Field(default=None, description="Pipeline name.")
    conversation_id: Short | None = None
    since: IsoTime | None = None
    until: IsoTime | None = None
    q: Annotated[StorableStr, StringConstraints(max_length=500)] | None = None
    meta: list[Short] = Field(default_factory=list, max_length=32, description="FIELD=VALUE.")
    status: Status | None = None
    verdict: Verdict | Literal["none"] | None = None
    assignee: Assignee | None = Field(default=None, description='"none": unassigned.')

    @after_model(mode="after")
    def _narrow(self) -> "TriageFilter":
        if not any(getattr(self, f) for f in type(self).model_fields):
            raise ValueError("give at least one filter field (an empty one selects everything)")
        return self


class TriageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[StorableStr, StringConstraints(max_length=64)]] | None = Field(
        default=None, min_length=1, max_length=MAX_BULK, description="Alert ids."
    )
    versions: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] | None = Field(
        default=None,
        max_length=MAX_BULK,
        description="With ids: the version of each as read (409 if one changed since).",
    )
    filter: TriageFilter | None = Field(default=None, description="Or the alerts it matches.")
    change: Change
    note: NoteText | None = Field(default=None, description="Also added to each alert.")

    @after_model(mode="after")
    def _one_selector(self) -> "TriageIn":
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give exactly one of ids or filter")
        if self.versions is not None and len(self.versions) != len(self.ids or ()):
            raise ValueError("versions: one per id, in the same order (with ids only)")
        return self


def _problem(loc: Sequence[str | int], msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": list(loc), "type": "value_error", "msg": msg}])


def triage_router(
    role: Callable[[str], Callable[..., Principal]], redact: Sequence[str]
) -> APIRouter:
    """``role(name)`` is the app's key dependency; ``redact`` the kinds redacted before storage
    (notes are redacted as turns are; filter ids are looked up as stored)."""
    router = APIRouter(tags=["triage"], responses=AUTH_REFUSED)
    Reader = Annotated[Principal, Depends(role("read"))]
    Triager = Annotated[Principal, Depends(role("triage"))]
    kinds = tuple(redact)

    def detail(session: Session, alert: Alert) -> dict[str, Any]:
        links = alert_links(alert.conversation_id)
        return {**alert_json(alert), "links": links, **notes_and_history(session, alert.id)}

    @router.get("/v1/alerts/{alert_id}", response_model=AlertDetail, responses=NOT_FOUND)
    def get_alert(alert_id: str, request: Request, who: Reader) -> dict[str, Any]:
        """One alert with its triage state, notes and change history."""
        with state_of(request).sessions() as session:
            try:
                return detail(session, find(session, who.tenant, alert_id))
            except AlertNotFoundError:
                raise HTTPException(404, f"no alert {alert_id!r}") from None

    @router.patch(
        "/v1/alerts/{alert_id}",
        response_model=AlertDetail,
        responses={**NOT_FOUND, **STALE, **BODY_REFUSED},
    )
    def patch_alert(
        alert_id: str, body: AlertPatch, request: Request, who: Triager
    ) -> dict[str, Any]:
        """Set an alert's status, verdict or assignee, from the ``version`` read: 409 if it
        changed since (nothing is applied; read it again)."""
        with state_of(request).sessions() as session:
            try:
                alert = change_one(
                    session,
                    who.tenant,
                    alert_id,
                    body.version,
                    body.fields(),
                    who.author,
                    resolving_sinks(state_of(request).settings.sinks),
                )
            except AlertNotFoundError:
                raise HTTPException(404, f"no alert {alert_id!r}") from None
            except StaleAlertError as exc:
                session.rollback()
                raise HTTPException(409, str(exc)) from None
            session.commit()
            return detail(session, alert)

    @router.post(
        "/v1/alerts/{alert_id}/notes",
        status_code=201,
        response_model=NoteOut,
        responses={**NOT_FOUND, **BODY_REFUSED},
    )
    def post_note(alert_id: str, body: NoteIn, request: Request, who: Triager) -> dict[str, Any]:
        """Add a note (append-only; the author is the key's name or prefix)."""
        text = redactor(kinds).redact(body.text) if kinds else body.text
        with state_of(request).sessions() as session:
            try:
                note = add_note(session, who.tenant, alert_id, text, who.author)
            except AlertNotFoundError:
                raise HTTPException(404, f"no alert {alert_id!r}") from None
            session.commit()
            return note_json(note)

    @router.post("/v1/alerts/triage", responses={**STALE, **BODY_REFUSED})
    def post_triage(body: TriageIn, request: Request, who: Triager) -> TriageOut:
        """One change (and optionally a note) for a list of alert ids or for the alerts a
        filter matches, at most 1,000: all in one transaction, or nothing (an unknown id, too
        many alerts, or an alert changed meanwhile: 409, retry)."""
        flt = None if body.filter is None else _audit_filter(who.tenant, body.filter, kinds)
        note = body.note if body.note is None or not kinds else redactor(kinds).redact(body.note)
        with state_of(request).sessions() as session:
            try:
                alerts, changed = change_many(
                    session,
                    who.tenant,
                    body.change.fields(),
                    who.author,
                    ids=body.ids,
                    flt=flt,
                    versions=dict(zip(body.ids, body.versions, strict=True))
                    if body.ids is not None and body.versions is not None
                    else None,
                    note=note,
                    resolve_to=resolving_sinks(state_of(request).settings.sinks),
                )
            except UnknownAlertsError as exc:
                session.rollback()
                problems = [
                    {"loc": ["body", "ids", i], "type": "value_error", "msg": "no such alert"}
                    for i in exc.positions
                ]
                raise HTTPException(422, problems) from None
            except TooManyAlertsError as exc:
                session.rollback()
                raise _problem(["body", "ids" if body.ids else "filter"], str(exc)) from None
            except StaleAlertError as exc:
                session.rollback()
                raise HTTPException(409, f"nothing applied: {exc}") from None
            session.commit()
            done = [{"alert_id": a.id, "version": a.version} for a in alerts]
        return TriageOut(matched=len(alerts), changed=changed, alerts=done)

    return router


def _audit_filter(tenant: str, f: TriageFilter, kinds: tuple[str, ...]) -> AuditFilter:
    try:
        metadata = AuditFilter.parse_metadata(list(f.meta))
    except ValueError as exc:
        raise _problem(["body", "filter", "meta"], str(exc)) from None
    return AuditFilter(
        tenant,
        f.detector,
        f.severity,
        f.model,
        stored_conversation_id(f.conversation_id, kinds) if f.conversation_id else None,
        f.since,
        f.until,
        f.q or None,
        stored_metadata_keys(metadata, kinds),
        status=f.status,
        verdict=f.verdict,
        assignee=f.assignee,
    )
