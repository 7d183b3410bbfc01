"""What every audit UI page shares: the templates, the login cookie and who it names, the
page context (tenant, role, whether it may triage, the CSRF token), safe redirect targets."""

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from monitor.service.keys import Principal
from monitor.service.ui_filters import csrf_token

COOKIE = "sm_key"
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
            "csrf": csrf_token(request.cookies.get(COOKIE, "")),
            **context,
        },
        status_code=status_code,
    )


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
