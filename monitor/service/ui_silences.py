"""The audit UI's silences page: the tenant's own and the all-tenant silences, listed for every
reader, made (optionally narrowed by a feature pattern) and expired by a key that may triage
(the all-tenant ones are the operator's, made and expired with the CLI). Every POST checks the
session's CSRF token and the role (``ui_pages.form_principal``) and redirects (303) back to the
page.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from monitor.service.keys import Principal
from monitor.service.silence_match import MAX_FEATURES
from monitor.service.silences import (
    MAX_REASON,
    SilenceError,
    SilenceNotFoundError,
    SilenceRefusedError,
    create,
    expire,
    listed,
    parse_duration,
)
from monitor.service.ui_pages import Token, detector_ids, form_principal, page, who_of


def ui_silences_router(
    principal_of: Callable[[Request, str], Principal | None],
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def sender(request: Request, csrf: str) -> Principal | Response:
        return form_principal(request, principal_of, csrf)

    def silences_page(
        request: Request, p: Principal, status_code: int = 200, **ctx: Any
    ) -> Response:
        state = request.app.state.monitor
        with state.sessions() as session:
            rows = listed(session, p.tenant, limit=200)
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
        features: Annotated[str, Form(max_length=MAX_FEATURES)] = "",
    ) -> Response:
        p = sender(request, csrf)
        if isinstance(p, Response):
            return p
        # A refused form comes back as typed, so that one mistake is fixed, not all retyped.
        typed = {"detector": detector, "duration": duration, "features": features, "reason": reason}
        if detector not in detector_ids(request.app.state.monitor):
            return silences_page(request, p, 422, error=f"no detector {detector!r}", form=typed)
        try:
            length = parse_duration(duration)
        except ValueError as exc:
            return silences_page(request, p, 422, error=f"duration: {exc}", form=typed)
        with request.app.state.monitor.sessions() as session:
            try:
                create(
                    session,
                    tenant=p.tenant,
                    detector=detector,
                    features=features,
                    reason=reason,
                    created_by=p.author,
                    duration=length,
                )
            except SilenceError as exc:
                return silences_page(request, p, 422, error=str(exc), form=typed)
            session.commit()
        return RedirectResponse("/ui/silences", status_code=303)

    @router.post("/silences/{silence_id}/expire", response_model=None)
    def silences_expire(request: Request, silence_id: int, csrf: Token = "") -> Response:
        p = sender(request, csrf)
        if isinstance(p, Response):
            return p
        with request.app.state.monitor.sessions() as session:
            try:
                expire(session, p.tenant, silence_id, p.author, operator=False)
            except SilenceNotFoundError:
                return silences_page(request, p, 404, error=f"no silence {silence_id}")
            except SilenceRefusedError as exc:
                return silences_page(request, p, 403, error=str(exc))
            session.commit()
        return RedirectResponse("/ui/silences", status_code=303)

    return router
