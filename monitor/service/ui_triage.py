"""The audit UI's triage forms: acknowledge, resolve and judge an alert, add a note (from the
alert list and the conversation page), and the silences page (listed for every reader; made and
expired by a key that may triage).

Every POST checks the session's CSRF token (403 when it is missing or wrong) and the role (403
for a key that may not triage), then redirects (303) back to the page it came from. A change
applies to the version the page showed: when someone else changed the alert meanwhile the
answer is 409 with a page saying so (nothing applied; reload and decide again).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from monitor.service.keys import Principal
from monitor.service.redacted import redactor
from monitor.service.settings import ServiceSettings
from monitor.service.silences import (
    MAX_REASON,
    SilenceError,
    SilenceNotFoundError,
    create,
    expire,
    list_silences,
    parse_duration,
    silence_json,
)
from monitor.service.sink_settings import resolving_sinks
from monitor.service.triage import (
    MAX_NOTE,
    STATUSES,
    VERDICTS,
    AlertNotFoundError,
    StaleAlertError,
    add_note,
    change_one,
)
from monitor.service.ui_filters import csrf_ok
from monitor.service.ui_pages import COOKIE, detector_ids, page, safe_next, who_of

Token = Annotated[str, Form(max_length=200)]
Next = Annotated[str, Form(max_length=2000)]


def ui_triage_router(
    settings: ServiceSettings,
    principal_of: Callable[[Request, str], Principal | None],
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    kinds = tuple(settings.redact)
    resolve_to = resolving_sinks(settings.sinks)

    def refused(request: Request, csrf: str, needs: str = "triage") -> Response | None:
        """The answer to a POST that may not go on (None: it may)."""
        if not csrf_ok(request.cookies.get(COOKIE), csrf):
            return HTMLResponse(
                "403: missing or wrong CSRF token; reload the page and try again", status_code=403
            )
        p = who_of(request, principal_of)
        if p is None:
            return RedirectResponse("/ui/login", status_code=303)
        if not p.may(needs):
            return page(
                request,
                "message.html",
                p,
                status_code=403,
                title="Not allowed",
                message=f"This key's role ({p.role}) may not do this; it needs {needs}.",
                back="/ui/alerts",
            )
        return None

    def principal(request: Request) -> Principal:
        p = who_of(request, principal_of)
        assert p is not None  # refused() said so
        return p

    @router.post("/alerts/{alert_id}/triage", response_model=None)
    def triage_alert(
        request: Request,
        alert_id: str,
        csrf: Token = "",
        version: Annotated[int, Form(ge=1, le=2**31 - 1)] = 1,
        status: Annotated[str, Form(max_length=32)] = "",
        verdict: Annotated[str, Form(max_length=32)] = "",
        next: Next = "/ui/alerts",
    ) -> Response:
        if (no := refused(request, csrf)) is not None:
            return no
        p = principal(request)
        change: dict[str, str | None] = {}
        if status in STATUSES:
            change["status"] = status
        if verdict in VERDICTS:
            change["verdict"] = verdict
        if not change:
            return HTMLResponse("422: give a status or a verdict", status_code=422)
        with request.app.state.monitor.sessions() as session:
            try:
                change_one(session, p.tenant, alert_id, version, change, p.author, resolve_to)
            except AlertNotFoundError:
                return page(request, "missing.html", p, what=f"alert {alert_id!r}", status_code=404)
            except StaleAlertError as exc:
                session.rollback()
                return page(
                    request,
                    "message.html",
                    p,
                    status_code=409,
                    title="Changed by someone else",
                    message=f"Nothing was applied: {exc}. Reload the page and decide again.",
                    back=safe_next(next),
                )
            session.commit()
        return RedirectResponse(safe_next(next), status_code=303)

    @router.post("/alerts/{alert_id}/notes", response_model=None)
    def note_alert(
        request: Request,
        alert_id: str,
        csrf: Token = "",
        text: Annotated[str, Form(max_length=MAX_NOTE)] = "",
        next: Next = "/ui/alerts",
    ) -> Response:
        if (no := refused(request, csrf)) is not None:
            return no
        p = principal(request)
        if not text.strip():
            return HTMLResponse("422: the note is empty", status_code=422)
        stored = redactor(kinds).redact(text.strip()) if kinds else text.strip()
        with request.app.state.monitor.sessions() as session:
            try:
                add_note(session, p.tenant, alert_id, stored, p.author)
            except AlertNotFoundError:
                return page(request, "missing.html", p, what=f"alert {alert_id!r}", status_code=404)
            session.commit()
        return RedirectResponse(safe_next(next), status_code=303)

    def silences_page(
        request: Request, p: Principal, status_code: int = 200, **ctx: str
    ) -> Response:
        state = request.app.state.monitor
        with state.sessions() as session:
            rows = [silence_json(s) for s in list_silences(session, p.tenant, limit=200)]
        return page(
            request,
            "silences.html",
            p,
            status_code=status_code,
            current=[s for s in rows if s["state"] != "expired"],
            expired=[s for s in rows if s["state"] == "expired"],
            detectors=detector_ids(state),
            **ctx,
        )

    @router.get("/silences", response_class=HTMLResponse, response_model=None)
    def silences_get(request: Request) -> Response:
        p = who_of(request, principal_of)
        if p is None:
            return RedirectResponse("/ui/login?next=/ui/silences", status_code=303)
        return silences_page(request, p)

    @router.post("/silences", response_model=None)
    def silences_post(
        request: Request,
        csrf: Token = "",
        detector: Annotated[str, Form(max_length=64)] = "",
        duration: Annotated[str, Form(max_length=32)] = "",
        reason: Annotated[str, Form(max_length=MAX_REASON)] = "",
    ) -> Response:
        if (no := refused(request, csrf)) is not None:
            return no
        p = principal(request)
        if detector not in detector_ids(request.app.state.monitor):
            return silences_page(request, p, 422, error=f"no detector {detector!r}")
        try:
            length = parse_duration(duration)
        except ValueError as exc:
            return silences_page(request, p, 422, error=f"duration: {exc}")
        with request.app.state.monitor.sessions() as session:
            try:
                create(
                    session,
                    tenant=p.tenant,
                    detector=detector,
                    reason=reason,
                    created_by=p.author,
                    duration=length,
                )
            except SilenceError as exc:
                return silences_page(request, p, 422, error=str(exc))
            session.commit()
        return RedirectResponse("/ui/silences", status_code=303)

    @router.post("/silences/{silence_id}/expire", response_model=None)
    def silences_expire(request: Request, silence_id: int, csrf: Token = "") -> Response:
        if (no := refused(request, csrf)) is not None:
            return no
        p = principal(request)
        with request.app.state.monitor.sessions() as session:
            try:
                expire(session, p.tenant, silence_id, p.author)
            except SilenceNotFoundError:
                return silences_page(request, p, 404, error=f"no silence {silence_id}")
            session.commit()
        return RedirectResponse("/ui/silences", status_code=303)

    return router
