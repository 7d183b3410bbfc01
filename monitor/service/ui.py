"""The audit web UI: server-rendered pages (Jinja2) behind the same API keys as the API.

A login form takes a key; the key is kept in a ``Secure``, ``HttpOnly``, ``SameSite=Strict``
cookie scoped to ``/ui`` and checked on every page like a bearer key (revoking the key logs
the browser out). Pages: alerts (filters, counts, newest first), conversations (search), a
conversation (tokens shaded by a detector or a feature, each alert explained), a feature card.
Every form carries the session's CSRF token (``ui_filters.csrf_token``), checked on each POST;
the triage controls are ``ui_triage``, the silences page ``ui_silences``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from detectors.rules import SEVERITIES
from monitor.service.audit_api import MAX_OFFSET
from monitor.service.export import export
from monitor.service.keys import Principal
from monitor.service.redacted import stored_conversation_id
from monitor.service.rows import alert_json, conversation_json
from monitor.service.settings import ServiceSettings
from monitor.service.triage import MAX_BULK, notes_and_history
from monitor.service.ui_filters import (
    ListingQuery,
    csrf_ok,
    filter_from,
    filters_anything,
    most_severe_first,
    query_without_offset,
)
from monitor.service.ui_pages import (
    COOKIE,
    TEMPLATES,
    detector_ids,
    grafana_link,
    here,
    page,
    safe_next,
    who_of,
)
from monitor.service.views import conversation_view, feature_view

PAGE = 50


def ui_router(
    settings: ServiceSettings,
    principal_of: Callable[[Request, str], Principal | None],
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def who(request: Request) -> Principal | None:
        return who_of(request, principal_of)

    def to_login(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?{urlencode({'next': target})}", status_code=303)

    @router.get("")
    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/alerts", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/ui/alerts") -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "login.html", {"next": safe_next(next)})

    @router.post("/login", response_model=None)
    def login(
        request: Request,
        key: Annotated[str, Form(max_length=200)] = "",
        next: Annotated[str, Form(max_length=2000)] = "/ui/alerts",
    ) -> Response:
        key = key.strip()
        p = principal_of(request, key) if key else None
        if p is None or not p.may("read"):
            error = (
                "Enter an API key."
                if not key
                else "This key is not valid, is revoked, or may not read (needs the read role)."
            )
            return TEMPLATES.TemplateResponse(
                request, "login.html", {"next": safe_next(next), "error": error}, status_code=401
            )
        response = RedirectResponse(safe_next(next), status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            httponly=True,
            secure=settings.ui_secure_cookie,
            samesite="strict",
            path="/ui",
            max_age=12 * 3600,
        )
        return response

    @router.post("/logout", response_model=None)
    def logout(request: Request, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
        if not csrf_ok(request.cookies.get(COOKIE), csrf):
            return HTMLResponse("missing or wrong CSRF token: reload the page", status_code=403)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    def listing(
        request: Request,
        detector: str = "",
        severity: str = "",
        model: str = "",
        since: str = "",
        until: str = "",
        q: str = "",
        meta: Annotated[list[str], Query()] = [],  # noqa: B006
        status: str = "",
        verdict: str = "",
        assignee: str = "",
        sort: str = "",
        offset: int = 0,
    ) -> ListingQuery:
        """What the alerts and conversations pages share: the reader, the filter form and the
        filter it makes (what cannot be read is reported on the page and left out)."""
        p = who(request)
        given = {
            "detector": [detector],
            "severity": [severity],
            "model": [model],
            "since": [since],
            "until": [until],
            "q": [q],
            "meta": meta,
            "status": [status],
            "verdict": [verdict],
            "assignee": [assignee],
        }
        flt, errors = filter_from(p, given, settings.redact) if p else (None, [])
        form = {
            "detector": detector,
            "severity": severity,
            "model": model,
            "since": since,
            "until": until,
            "q": q,
            "meta": " ".join(meta),
            "status": status,
            "verdict": verdict,
            "assignee": assignee,
            "sort": "severity" if sort == "severity" else "",
        }
        return ListingQuery(p, flt, form, errors, min(max(0, offset), MAX_OFFSET))

    Listing = Annotated[ListingQuery, Depends(listing)]

    def render_listing(
        request: Request, name: str, ls: Listing, rows: list[Any], **context: Any
    ) -> HTMLResponse:
        assert ls.who is not None
        state = request.app.state.monitor
        return page(
            request,
            name,
            ls.who,
            form=ls.form,
            errors=ls.errors,
            offset=ls.offset,
            detectors=detector_ids(state),
            severities=SEVERITIES,
            models=sorted(state.monitored),
            more=len(rows) > PAGE,
            query=query_without_offset(request),
            **context,
        )

    @router.get("/alerts", response_class=HTMLResponse, response_model=None)
    def alerts_page(request: Request, ls: Listing) -> Response:
        if ls.who is None or ls.flt is None:
            return to_login(request)
        with request.app.state.monitor.sessions() as session:
            query = ls.flt.alerts()
            query = most_severe_first(query) if ls.form["sort"] else query
            rows = session.scalars(query.offset(ls.offset).limit(PAGE + 1)).all()
            counts = ls.flt.counts(session)
        return render_listing(
            request,
            "alerts.html",
            ls,
            list(rows),
            alerts=[
                {**doc, "grafana": grafana_link(settings.grafana_url, doc, ls.who.tenant)}
                for doc in (alert_json(a) for a in rows[:PAGE])
            ],
            counts=counts,
            total=sum(counts["severity"].values()),
            here=here(request),
            query_filters=filters_anything({k: [v] for k, v in ls.form.items()}),
            max_bulk=MAX_BULK,
        )

    @router.get("/export/{what}", response_model=None)
    def export_page(request: Request, what: str, ls: Listing, format: str = "csv") -> Response:
        """The current filter's alerts or conversations' turns as a download (the export API's
        stream, with the UI's login)."""
        if ls.who is None or ls.flt is None:
            return to_login(request)
        if what not in ("alerts", "turns") or format not in ("csv", "jsonl"):
            return HTMLResponse("404: export alerts or turns, as csv or jsonl", status_code=404)
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        name = f"{what}.{format}"
        rows = export(request.app.state.monitor.sessions, what, format, ls.flt)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return StreamingResponse(rows, media_type=media, headers=headers)

    @router.get("/conversations", response_class=HTMLResponse, response_model=None)
    def conversations_page(request: Request, ls: Listing) -> Response:
        if ls.who is None or ls.flt is None:
            return to_login(request)
        with request.app.state.monitor.sessions() as session:
            q = ls.flt.conversations().offset(ls.offset).limit(PAGE + 1)
            rows = session.execute(q).all()
        return render_listing(
            request,
            "conversations.html",
            ls,
            list(rows),
            conversations=[conversation_json(r) for r in rows[:PAGE]],
        )

    @router.get(  # ``:path``: conversation ids may hold "/"
        "/conversations/{conversation_id:path}", response_class=HTMLResponse, response_model=None
    )
    def conversation_page(
        request: Request, conversation_id: str, shade: str = "", feature: str = ""
    ) -> Response:
        shade = f"feature:{feature.strip()}" if feature.strip() else shade
        p = who(request)
        if p is None:
            return to_login(request)
        state = request.app.state.monitor
        asked, conversation_id = (
            conversation_id,
            stored_conversation_id(conversation_id, settings.redact),
        )
        error = None
        try:
            with state.sessions() as session:
                view = conversation_view(
                    session, p.tenant, conversation_id, state.monitored, shade or None
                )
        except ValueError as exc:
            error = str(exc)
            with state.sessions() as session:
                view = conversation_view(session, p.tenant, conversation_id, state.monitored, None)
        if view is None:
            return page(request, "missing.html", p, what=f"conversation {asked!r}", status_code=404)
        with state.sessions() as session:
            ids = [i for t in view["turns"] for i in t["alert_ids"]]
            notes = {i: notes_and_history(session, i)["notes"] for i in ids}
        return page(
            request,
            "conversation.html",
            p,
            view=view,
            shade=shade,
            error=error,
            detectors=detector_ids(state),
            notes=notes,
            here=here(request),
        )

    @router.get("/features/{index}", response_class=HTMLResponse, response_model=None)
    def feature_page(request: Request, index: int, model: str = "") -> Response:
        p = who(request)
        if p is None:
            return to_login(request)
        state = request.app.state.monitor
        try:
            monitored = state.ingest.pipeline(model)  # UnknownPipelineError is a ValueError
            with state.sessions() as session:
                card = feature_view(session, p.tenant, monitored, index)
        except ValueError as exc:
            return page(request, "missing.html", p, what=str(exc), status_code=404)
        return page(request, "feature.html", p, card=card)

    return router
