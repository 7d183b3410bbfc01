"""Settings of the alert sinks: the filter every sink has (``AlertFilter``: tenants, detectors,
minimum severity) and the Slack, PagerDuty and Alertmanager sinks' own, one type each, chosen by
``type`` (a pydantic discriminated union: an unknown ``type`` is refused at ``sinks.N``).

Webhooks (``settings.WebhookConfig``) are sinks too; they keep their own ``webhooks`` list.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from detectors.rules import SEVERITY_RANK, Severity

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # pipelines, webhooks and sinks
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")


def refuse_unknown(
    keys: Iterable[str],
    known: Collection[str],
    where: str | None,
    spell: Callable[[str], str] = str,
) -> None:
    """ValueError for the first key not in ``known``, with the nearest known one (difflib)."""
    for key in keys:
        if key in known:
            continue
        near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        hint = (
            f"did you mean {spell(near[0])!r}?"
            if near
            else "known: " + ", ".join(spell(k) for k in sorted(known))
        )
        prefix = f"{where}: unknown setting" if where else "unknown key"
        raise ValueError(f"{prefix} {spell(key)!r}; {hint}")


class _Strict(BaseModel):
    """A settings entry that refuses unknown keys with a suggestion (not a bare "extra")."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unknown([str(k) for k in data], cls.model_fields, None)
        return data


class AlertFilter(_Strict):
    """Which alerts a sink takes; every list empty: all of them."""

    tenants: list[str] = Field(default_factory=list)  # empty: every tenant
    detectors: list[str] = Field(default_factory=list)  # empty: every detector
    min_severity: Severity = "info"

    def wants(self, tenant: str, detector: str, severity: str) -> bool:
        """Whether an alert of this tenant, detector and severity goes to this sink."""
        return (
            (not self.tenants or tenant in self.tenants)
            and (not self.detectors or detector in self.detectors)
            and SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]
        )


class SlackConfig(AlertFilter):
    """A Slack incoming webhook: one message per alert (``text`` and Block Kit ``blocks``)."""

    type: Literal["slack"]
    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(pattern=r"^https?://", description="The incoming webhook's URL (a secret).")


class PagerDutyConfig(AlertFilter):
    """A PagerDuty service's Events API v2 integration: a ``trigger`` event per alert."""

    type: Literal["pagerduty"]
    name: str = Field(pattern=NAME_PATTERN)
    routing_key: str = Field(description="The integration key: 32 letters and digits.")
    url: str = Field(default=PAGERDUTY_EVENTS_URL, pattern=r"^https?://")

    @field_validator("routing_key")
    @classmethod
    def _routing_key(cls, key: str) -> str:
        if not _ROUTING_KEY.fullmatch(key):  # named, never echoed: it is a credential
            this = (
                f"{len(key)} characters"
                if len(key) != 32
                else "characters other than letters and digits"
            )
            raise ValueError(
                "a PagerDuty routing key (the integration key of an Events API v2 "
                f"integration) is 32 letters and digits; this one has {this}"
            )
        return key


class AlertmanagerConfig(AlertFilter):
    """A Prometheus Alertmanager: each alert POSTed to ``{url}/api/v2/alerts``."""

    type: Literal["alertmanager"]
    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(pattern=r"^https?://", description="Its base URL: http://host:9093")
    ends_after_s: int = Field(
        default=3600,
        ge=60,
        le=30 * 86400,
        description="Alertmanager resolves the alert this long after it was sent.",
    )

    @field_validator("url")
    @classmethod
    def _base(cls, url: str) -> str:
        return url.rstrip("/")


AnySink = SlackConfig | PagerDutyConfig | AlertmanagerConfig
SinkConfig = Annotated[AnySink, Field(discriminator="type")]


def sinks_typed(value: Any) -> Any:
    """``sinks`` as given, or a ValueError naming the first entry with no ``type``."""
    for i, entry in enumerate(value if isinstance(value, list) else []):
        if isinstance(entry, dict) and "type" not in entry:
            raise ValueError(f"sinks[{i}] has no type: slack, pagerduty or alertmanager")
    return value


def unique_names(field: str, entries: list[Any], webhooks: list[Any]) -> None:
    """A ValueError naming the first of ``entries`` whose name one before it (``webhooks``, when
    these are the sinks) has: webhooks and sinks share the delivery table, keyed by name."""
    taken = {w.name: f"webhooks[{i}]" for i, w in enumerate(webhooks)}
    for i, entry in enumerate(entries):
        if entry.name in taken:
            raise ValueError(
                f"{field}[{i}].name {entry.name!r} is taken by {taken[entry.name]}: webhook and "
                "sink names must be unique (their deliveries are kept by name)"
            )
        taken[entry.name] = f"{field}[{i}]"


def resolving_sinks(sinks: Iterable[BaseModel]) -> list[str]:
    """The sinks a resolved alert is resolved at too (PagerDuty's), by name."""
    return [s.name for s in sinks if isinstance(s, PagerDutyConfig)]
