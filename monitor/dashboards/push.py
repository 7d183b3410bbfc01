"""Upload the dashboards to a running Grafana through its HTTP API (grafana-client).

Idempotent: the folder is looked up by its fixed uid and created only when missing, and each
dashboard is saved with its fixed uid and ``overwrite: true``, so a second push replaces the
first (Grafana keeps the earlier versions in the dashboard's history).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from monitor.dashboards.build import FOLDER_TITLE, FOLDER_UID, POSTGRES, PROMETHEUS, build_all

MESSAGE = "safety-monitor dashboards push"


class PushError(Exception):
    """Why a push failed, in words for the operator."""


@dataclass
class PushResult:
    folder_uid: str
    folder_created: bool
    dashboards: list[tuple[str, str]] = field(default_factory=list)  # (uid, url)
    missing_datasources: list[str] = field(default_factory=list)


def payloads(
    docs: dict[str, dict[str, Any]] | None = None,
    folder_uid: str = FOLDER_UID,
    message: str = MESSAGE,
) -> list[dict[str, Any]]:
    """The bodies of ``POST /api/dashboards/db``, one per dashboard, in file order.

    Each carries the dashboard's own fixed uid, no numeric id (Grafana matches on the uid),
    the folder's uid, and ``overwrite: true``.
    """
    docs = build_all() if docs is None else docs
    return [
        {
            "dashboard": {**doc, "id": None},
            "folderUid": folder_uid,
            "overwrite": True,
            "message": message,
        }
        for doc in docs.values()
    ]


def push(
    url: str,
    token: str,
    *,
    folder_title: str = FOLDER_TITLE,
    folder_uid: str = FOLDER_UID,
    timeout: float = 10.0,
) -> PushResult:
    """Create the folder once, save every dashboard into it, check the data sources exist."""
    if not url.startswith(("http://", "https://")):
        raise PushError(f"--url must start with http:// or https:// (got {url!r})")
    # grafana-client joins a sub-path and "api" without a slash: keep one after a sub-path.
    base = url.rstrip("/") + ("/" if urlparse(url).path.strip("/") else "")
    api = GrafanaApi.from_url(base, credential=token, timeout=timeout)
    with _errors(url):
        health = api.client.GET("/health")
    if not isinstance(health, dict) or "database" not in health:
        raise PushError(f"{url} answered /api/health, but not as Grafana does: {health!r:.200}")
    with _errors(url):
        uid, created = _ensure_folder(api, folder_uid, folder_title)
        result = PushResult(uid, created)
        for body in payloads(folder_uid=uid):
            saved = api.dashboard.update_dashboard(body)
            result.dashboards.append((str(saved.get("uid")), str(saved.get("url", ""))))
        for ref in (POSTGRES, PROMETHEUS):
            if ref.uid and not _has_datasource(api, ref.uid):
                result.missing_datasources.append(ref.uid)
    return result


def _ensure_folder(api: GrafanaApi, uid: str, title: str) -> tuple[str, bool]:
    """The folder's uid and whether it was created now. An existing folder with the same
    title and another uid (made by hand, say) is used rather than duplicated."""
    try:
        api.folder.get_folder(uid)
        return uid, False
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
    try:
        created = api.folder.create_folder(title, uid=uid)
        return str(created.get("uid", uid)), True
    except GrafanaClientError as exc:
        if exc.status_code not in (400, 409, 412):
            raise
        for f in api.folder.get_all_folders():
            if f.get("title") == title:
                return str(f["uid"]), False
        raise


def _has_datasource(api: GrafanaApi, uid: str) -> bool:
    try:
        api.datasource.get_datasource_by_uid(uid)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return False
        if exc.status_code == 403:  # may not read data sources: cannot tell, do not warn
            return True
        raise
    return True


@contextmanager
def _errors(url: str) -> Iterator[None]:
    """Turn grafana-client and transport errors into a ``PushError`` that says what to do."""
    try:
        yield
    except GrafanaUnauthorizedError as exc:
        raise PushError(
            f"Grafana at {url} refused the token (401 Unauthorized): pass a service account "
            "token with the Editor role (--token or GRAFANA_TOKEN)"
        ) from exc
    except GrafanaException as exc:
        if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
            raise PushError(
                f"Grafana at {url} accepted the token but refused the action (403): the "
                f"service account needs the Editor role ({exc.message})"
            ) from exc
        if exc.status_code == 0:  # grafana-client's timeout and transport errors
            raise PushError(f"Grafana at {url} is unreachable: {exc.message}") from exc
        raise PushError(f"Grafana at {url} answered: {exc.message}") from exc
    except niquests.exceptions.RequestException as exc:
        raise PushError(f"Grafana at {url} is unreachable: {_reason(exc)}") from exc
    except ValueError as exc:  # a body that is not JSON: not Grafana's API
        raise PushError(f"{url} does not answer like Grafana's HTTP API: {exc}") from exc


def _reason(exc: BaseException) -> str:
    """The innermost cause of a transport error (connection refused, name not known)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    return f"{type(exc).__name__}: {exc}"
