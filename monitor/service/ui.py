"""The audit web UI: server-rendered pages (Jinja2) behind the same API keys as the API.

A login form takes a key; the key is kept in a ``Secure``, ``HttpOnly``, ``SameSite=Strict``
cookie scoped to ``/ui`` and checked on every page like a bearer key (revoking the key logs
the browser out). Pages: alerts (filters, counts, newest first), conversations (search), a
conversation (tokens shaded by a detector or a feature, each alert explained), a feature card.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from detectors.rules import SEVERITIES
from monitor.service.audit_api import MAX_OFFSET
from monitor.service.keys import Principal
from monitor.service.redacted import stored_conversation_id, stored_metadata_keys
from monitor.service.rows import alert_json, conversation_json
from monitor.service.settings import ServiceSettings
from monitor.service.ui_filters import ListingQuery, page_filter, query_without_offset
from monitor.service.views import conversation_view, feature_view

COOKIE = "sm_key"
PAGE = 50
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


def _shade_css(value: float) -> str:
    """Background for a token: white when inactive, deepening orange with activation."""
    if value <= 0:
        return ""
    return f"background: rgba(234, 88, 12, {0.08 + 0.82 * min(value, 1.0):.3f})"


TEMPLATES.env.filters["shade"] = _shade_css
TEMPLATES.env.filters["q"] = lambda s: quote(str(s), safe="")


def ui_router(
    settings: ServiceSettings,
    principal_of: Callable[[Request, str], Principal | None],
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def who(request: Request) -> Principal | None:
        key = request.cookies.get(COOKIE)
        p = principal_of(request, key) if key else None
        return p if p is not None and p.may("read") else None

    def page(
        request: Request, name: str, p: Principal, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(
            request, name, {"tenant": p.tenant, "role": p.role, **context}, status_code=status_code
        )

    def to_login(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?{urlencode({'next': target})}", status_code=303)

    @router.get("")
    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/alerts", status_code=303)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/ui/alerts") -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "login.html", {"next": _safe_next(next)})

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
                request, "login.html", {"next": _safe_next(next), "error": error}, status_code=401
            )
        response = RedirectResponse(_safe_next(next), status_code=303)
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

    @router.post("/logout")
    def logout() -> RedirectResponse:
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
        offset: int = 0,
    ) -> ListingQuery:
        """What the alerts and conversations pages share: the reader, the filter form and the
        filter it makes (what cannot be read is reported on the page and left out)."""
        p = who(request)
        errors: list[str] = []
        flt = (
            page_filter(p, errors, detector, severity, model, since, until, q, meta) if p else None
        )
        if flt is not None and flt.metadata:  # field names as stored (redacted)
            flt = dataclasses.replace(
                flt, metadata=stored_metadata_keys(flt.metadata, settings.redact)
            )
        form = {
            "detector": detector,
            "severity": severity,
            "model": model,
            "since": since,
            "until": until,
            "q": q,
            "meta": " ".join(meta),
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
            detectors=_detector_ids(state),
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
            rows = session.scalars(ls.flt.alerts().offset(ls.offset).limit(PAGE + 1)).all()
            counts = ls.flt.counts(session)
        return render_listing(
            request,
            "alerts.html",
            ls,
            list(rows),
            alerts=[alert_json(a) for a in rows[:PAGE]],
            counts=counts,
            total=sum(counts["severity"].values()),
        )

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
        return page(
            request,
            "conversation.html",
            p,
            view=view,
            shade=shade,
            error=error,
            detectors=_detector_ids(state),
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


def _detector_ids(state: Any) -> list[str]:
    """Every configured detector, for the filter and shading choices."""
    return sorted({d.id for m in state.monitored.values() for d in m.engine.detectors})


def _safe_next(target: str) -> str:
    """Only same-site UI paths (no open redirect through the login form)."""
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/alerts"
