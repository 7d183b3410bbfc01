"""Grafana dashboards as code: built with grafana-foundation-sdk, committed as JSON in
``dashboards/``, provisioned from ``dashboards/provisioning/`` or pushed with grafana-client.

``safety-monitor dashboards build`` regenerates the JSON; ``safety-monitor dashboards push``
uploads it to a running Grafana. See ``dashboards/README.md``.
"""

from monitor.dashboards.build import (
    DASHBOARDS,
    FOLDER_TITLE,
    FOLDER_UID,
    POSTGRES,
    PROMETHEUS,
    build_all,
    changed,
    render,
    write,
)

__all__ = [
    "DASHBOARDS",
    "FOLDER_TITLE",
    "FOLDER_UID",
    "POSTGRES",
    "PROMETHEUS",
    "build_all",
    "changed",
    "render",
    "write",
]
