"""The audit UI's triage forms: acknowledge, resolve, judge and assign an alert, add a note
(from the alert list and the conversation page), and the same for the alerts picked on the list
or every alert its filter matches (``ui_silences`` has the silences page).

Every POST checks the session's CSRF token (403 when it is missing or wrong) and the role (403
for a key that may not triage), then redirects (303) back to the page it came from. A change
applies to the versions the page showed: when someone else changed an alert meanwhile (or, for
"every alert of this filter", the filter now matches another number of alerts) the answer is
409 with a page saying so, and nothing is applied (reload and decide again). Bad input is 422
naming the field, also with nothing applied.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from monitor.service.keys import Principal
from monitor.service.redacted import redactor
from monitor.service.settings import ServiceSettings
from monitor.service.sink_settings import resolving_sinks
from monitor.service.triage import (
    MAX_ASSIGNEE,
    MAX_BULK,
    MAX_NOTE,
    STATUSES,
    VERDICTS,
    AlertNotFoundError,
    StaleAlertError,
    TooManyAlertsError,
    UnknownAlertsError,
    add_note,
    change_many,
    change_one,
)
from monitor.service.ui_filters import filter_from, filters_anything
from monitor.service.ui_pages import Next, Token, form_principal, page, safe_next

Choice = Annotated[str, Form(max_length=32)]
Assign = Annotated[str, Form(max_length=MAX_ASSIGNEE + 8)]
Version = Annotated[int, Form(ge=1, le=2**31 - 1)]


def triage_change(
    p: Principal, status: str, verdict: str, assign: str
) -> tuple[dict[str, str | None], str | None]:
    """The change a triage form asks for, or what is wrong with it (naming the field). Empty
    fields change nothing; ``assign``: ``me`` (the key's name), ``none`` (nobody) or a name."""
    change: dict[str, str | None] = {}
    if status:
        if status not in STATUSES:
            return {}, f"status: {status!r} is not one of {', '.join(STATUSES)}"
        change["status"] = status
    if verdict:
        if verdict not in VERDICTS:
            return {}, f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}"
        change["verdict"] = verdict
    name = assign.strip()
    if name:
        if len(name) > MAX_ASSIGNEE or "\x00" in name:
            return {}, f"assign: at most {MAX_ASSIGNEE} characters, no NUL"
        change["assignee"] = {"me": p.author, "none": None}.get(name.lower(), name)
    return change, None


def ui_triage_router(
    settings: ServiceSettings,
    principal_of: Callable[[Request, str], Principal | None],
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    kinds = tuple(settings.redact)
    resolve_to = resolving_sinks(settings.sinks)

    def sender(request: Request, csrf: str) -> Principal | Response:
        return form_principal(request, principal_of, csrf)

    def nothing_applied(
        request: Request, p: Principal, code: int, title: str, why: str, back: str
    ) -> Response:
        again = "Reload the page and decide again." if code == 409 else "Go back and fix it."
        return page(
            request,
            "message.html",
            p,
            status_code=code,
            title=title,
            message=f"Nothing was applied: {why}. {again}",
            back=safe_next(back),
        )

    @router.post("/alerts/{alert_id}/triage", response_model=None)
    def triage_alert(
        request: Request,
        alert_id: str,
        csrf: Token = "",
        version: Version = 1,
        status: Choice = "",
        verdict: Choice = "",
        assign: Assign = "",
        next: Next = "/ui/alerts",
    ) -> Response:
        p = sender(request, csrf)
        if isinstance(p, Response):
            return p
        change, wrong = triage_change(p, status, verdict, assign)
        if wrong or not change:
            why = wrong or "give a status, a verdict or an assignee"
            return nothing_applied(request, p, 422, "Not understood", why, next)
        with request.app.state.monitor.sessions() as session:
            try:
                change_one(session, p.tenant, alert_id, version, change, p.author, resolve_to)
            except AlertNotFoundError:
                return page(request, "missing.html", p, what=f"alert {alert_id!r}", status_code=404)
            except StaleAlertError as exc:
                session.rollback()
                return nothing_applied(request, p, 409, "Changed by someone else", str(exc), next)
            session.commit()
        return RedirectResponse(safe_next(next), status_code=303)

    @router.post("/alerts/triage", response_model=None)
    def triage_bulk(
        request: Request,
        csrf: Token = "",
        scope: Choice = "picked",
        pick: Annotated[list[str], Form()] = [],  # noqa: B006 ("ID:VERSION" per ticked row)
        filter: Annotated[str, Form(max_length=4000)] = "",  # the list page's query
        expect: Annotated[int, Form(ge=0, le=2**31 - 1)] = 0,  # alerts it showed as matching
        status: Choice = "",
        verdict: Choice = "",
        assign: Assign = "",
        note: Annotated[str, Form(max_length=MAX_NOTE)] = "",
        next: Next = "/ui/alerts",
    ) -> Response:
        """One change (and optionally a note) for the ticked alerts, at the versions the page
        showed, or for every alert the page's filter matches (as many as it showed)."""
        p = sender(request, csrf)
        if isinstance(p, Response):
            return p

        def bad(why: str) -> Response:
            return nothing_applied(request, p, 422, "Not understood", why, next)

        change, wrong = triage_change(p, status, verdict, assign)
        if wrong:
            return bad(wrong)
        text = note.strip()
        if not change and not text:
            return bad("choose a status, a verdict, an assignee or a note")
        versions: dict[str, int] = {}
        if scope == "picked":
            if not pick:
                return bad("pick: tick at least one alert (or apply to every alert of the filter)")
            if len(pick) > MAX_BULK:
                return bad(f"pick: {len(pick)} alerts; at most {MAX_BULK} at once")
            for item in pick:
                alert_id, _, version = item.rpartition(":")
                if not alert_id or not version.isdigit() or len(alert_id) > 64:
                    return bad(f"pick: {item[:80]!r} is not ALERT:VERSION")
                versions[alert_id] = int(version)
        elif scope == "filter":
            query = parse_qs(filter)
            if not filters_anything(query):
                return bad("filter: an empty filter selects every alert; narrow it first")
        else:
            return bad(f"scope: {scope!r} is not picked or filter")
        stored = (redactor(kinds).redact(text) if kinds else text) or None
        with request.app.state.monitor.sessions() as session:
            flt = None
            if scope == "filter":
                flt, errors = filter_from(p, query, kinds)
                if errors:
                    return bad("filter: " + "; ".join(errors))
            try:
                alerts, _ = change_many(
                    session,
                    p.tenant,
                    change,
                    p.author,
                    ids=list(versions) if flt is None else None,
                    flt=flt,
                    versions=versions or None,
                    note=stored,
                    resolve_to=resolve_to,
                )
                if flt is not None and len(alerts) != expect:
                    raise StaleFilterError(len(alerts), expect)
            except (StaleAlertError, StaleFilterError, UnknownAlertsError) as exc:
                session.rollback()
                return nothing_applied(request, p, 409, "Changed meanwhile", str(exc), next)
            except TooManyAlertsError as exc:
                session.rollback()
                return bad(str(exc))
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
        p = sender(request, csrf)
        if isinstance(p, Response):
            return p
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

    return router


class StaleFilterError(Exception):
    """The filter matches another number of alerts than the page showed."""

    def __init__(self, now: int, shown: int) -> None:
        super().__init__(f"the filter now matches {now} alerts, not the {shown} the page showed")
