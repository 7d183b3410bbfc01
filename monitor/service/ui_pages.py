"""What every audit UI page shares: the templates, the login cookie and who it names, the
page context (tenant, role, whether it may triage, the CSRF token), safe redirect targets."""

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from monitor.service.keys import Principal
from monitor.service.ui_filters import csrf_ok, csrf_token

COOKIE = "sm_key"
Token = Annotated[str, Form(max_length=200)]  # a form's CSRF token
Next = Annotated[str, Form(max_length=2000)]  # where a form sends the user back to
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


def _shade_css(value: float) -> str:
    """Background for a token: white when inactive, deepening orange with activation."""
    if value <= 0:
        return ""
    return f"background: rgba(234, 88, 12, {0.08 + 0.82 * min(value, 1.0):.3f})"


TEMPLATES.env.filters["shade"] = _shade_css
TEMPLATES.env.filters["q"] = lambda s: quote(str(s), safe="")


def who_of(
    request: Request, principal_of: Callable[[Request, str], Principal | None]
) -> Principal | None:
    """The reader the login cookie names (None: log in again)."""
    key = request.cookies.get(COOKIE)
    p = principal_of(request, key) if key else None
    return p if p is not None and p.may("read") else None


def page(
    request: Request, name: str, p: Principal, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A page of the session: its tenant, role, whether it may triage, its CSRF token."""
    return TEMPLATES.TemplateResponse(
        request,
        name,
        {
            "tenant": p.tenant,
            "role": p.role,
            "may_triage": p.may("triage"),
            "author": p.author,
            "csrf": csrf_token(request.cookies.get(COOKIE, "")),
            **context,
        },
        status_code=status_code,
    )


def form_principal(
    request: Request,
    principal_of: Callable[[Request, str], Principal | None],
    csrf: str,
    needs: str = "triage",
) -> Principal | Response:
    """Who sends a form POST, or the answer when it may not go on: 403 for a missing or wrong
    CSRF token or a role short of ``needs``, to the login page without a session."""
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
    return p


def detector_ids(state: Any) -> list[str]:
    """Every configured detector, for the filter and shading choices."""
    return sorted({d.id for m in state.monitored.values() for d in m.engine.detectors})


def safe_next(target: str) -> str:
    """Only same-site UI paths (no open redirect through the login form)."""
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/alerts"


def here(request: Request) -> str:
    """The page's path and query: where a form on it sends the user back to."""
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


DASHBOARD_UID = "sm-safety-overview"  # monitor.dashboards.build.safety_overview
GRAFANA_WINDOW_MS = 3_600_000  # the dashboard opens on the alert's time, an hour either side


def grafana_link(base: str | None, alert: dict[str, Any], tenant: str) -> str | None:
    """The alerts dashboard filtered on the alert's detector and tenant, around its time."""
    if not base:
        return None
    at = int(dt.datetime.fromisoformat(alert["created_at"]).timestamp() * 1000)
    params = {
        "var-detector": alert["detector"],
        "var-tenant": tenant,
        "from": at - GRAFANA_WINDOW_MS,
        "to": at + GRAFANA_WINDOW_MS,
    }
    return f"{base}/d/{DASHBOARD_UID}?{urlencode(params)}"
