"""Service configuration: ``SAFETY_MONITOR_*`` environment variables, then an optional YAML file.

Environment variables win over the file. With nothing configured the service runs on embedded
defaults: a SQLite file, the built-in model and SAE, the curated catalog, Kafka and sinks off.

An unknown key (in the file, in a pipeline, webhook or sink entry, or a ``SAFETY_MONITOR_*``
variable that is no setting) is refused with the nearest valid name: a typo such as
``retention_dayz`` must not silently leave the default in force.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from monitor.config import DEFAULT_MAX_INPUT_TOKENS, Settings
from monitor.service.guard_settings import GuardConfig
from monitor.service.redaction import KINDS, RedactionKind
from monitor.service.sink_settings import (
    NAME_PATTERN,
    AlertFilter,
    AnySink,
    SinkConfig,
    _Strict,
    refuse_unknown,
    sinks_typed,
    unique_names,
)


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "safety-monitor"


ENV_PREFIX = "SAFETY_MONITOR_"
# Variables with the prefix that are not service settings: the pipeline's own (monitor.config),
# the replay command's key, and the log format (read by monitor.logs when a command starts,
# before any settings are loaded).
_OTHER_VARIABLES = frozenset(Settings.model_fields) | {"replay_api_key", "log_format"}


class PipelineConfig(_Strict):
    """One monitored pipeline: a model, a layer, an SAE and a detector catalog, by name."""

    name: str = Field(pattern=NAME_PATTERN)
    model: str = "smollm2-135m-instruct"
    layer: int | None = Field(default=None, ge=1)
    sae: Path | None = None
    catalog: list[Path] = Field(default_factory=list)  # empty: the curated catalog


WEBHOOK_SECRET_PREFIX = "whsec_"


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a Standard Webhooks secret: ``whsec_`` + base64 of 24 to 64 random bytes."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(
            "a webhook secret is 'whsec_' + base64 of 24-64 random bytes "
            "(make one with: safety-monitor webhooks secret)"
        )
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret's part after 'whsec_' must be base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret's key is 24-64 bytes, this one {len(key)}")
    return key


class WebhookConfig(AlertFilter):
    """A receiver of alerts: JSON POSTs signed as Standard Webhooks specifies (``webhook-id``,
    ``webhook-timestamp``, ``webhook-signature``), with every secret in ``secrets`` (rotation:
    add the new one first, move the receiver to it, then remove the old one)."""

    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(pattern=r"^https?://")
    secrets: list[str] = Field(min_length=1, max_length=8)

    @field_validator("secrets")
    @classmethod
    def _secrets_are_standard(cls, secrets: list[str]) -> list[str]:
        for i, secret in enumerate(secrets):
            try:
                webhook_secret_bytes(secret)
            except ValueError as exc:
                raise ValueError(f"secrets[{i}]: {exc}") from None
        return secrets


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    config_file: Path | None = Field(default=None, description="Optional YAML settings file.")
    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in data_dir."
    )
    kafka_bootstrap: str | None = Field(default=None, description="host:port; unset: Kafka off.")
    alerts_topic: str = "safety.alerts"
    traffic_topic: str = "llm.traffic"
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(
        default_factory=list, description="Slack, PagerDuty and Alertmanager sinks, by type."
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="The audit UI's external base URL (https://monitor.example): sinks link "
        "each alert to {public_url}/ui/conversations/{id}.",
    )
    grafana_url: str | None = Field(  # the audit UI links each alert to the alerts dashboard
        default=None, pattern=r"^https?://", description="Grafana's base URL."
    )
    alert_on_probes: bool = Field(default=False, description="Probe verdicts alert too.")
    dispatch_interval_s: float = Field(default=0.5, gt=0, le=60)
    kafka_timeout_s: float = Field(default=5.0, gt=0, le=120)
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=120)
    webhook_max_attempts: int = Field(default=6, ge=1, le=100)
    webhook_backoff_s: float = Field(default=2.0, gt=0, le=3600)
    worker_group: str = "safety-monitor"
    worker_session_timeout_ms: int = Field(default=10_000, ge=1000, le=300_000)
    worker_max_poll_records: int = Field(default=64, ge=1, le=10_000)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_batch_turns: int = Field(default=100, ge=1, le=10_000)
    batch_max_tokens: int = Field(default=4096, ge=64, description="Tokens per micro-batch.")
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    device: str = "auto"
    max_tokens: int = Field(
        default=512, ge=8, description="Tokens per forward pass (window) of the model."
    )
    max_input_tokens: int = Field(
        default=DEFAULT_MAX_INPUT_TOKENS,
        ge=8,
        description="The longest turn read, in overlapping windows of max_tokens; a longer one "
        "is refused (HTTP 413, the Kafka dead-letter topic).",
    )
    # Audit: redaction before storage, retention, the web UI.
    redact: list[RedactionKind] = Field(
        default=list(KINDS),
        description="What is replaced by typed placeholders before text is stored "
        "(detectors see the real text). [] stores text as received.",
    )
    retention_days: int | None = Field(
        default=30, ge=1, description="Turns older than this are pruned; null keeps them."
    )
    tenant_retention_days: dict[str, int] = Field(
        default_factory=dict, description="Per-tenant retention, overriding retention_days."
    )
    retention_interval_s: float = Field(
        default=3600, ge=0, description="How often the service prunes; 0: only `db prune`."
    )
    guard_upstream: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="OpenAI-compatible base URL "
        "(http://host:port/v1): set, the service proxies /v1/chat/completions to it (guard mode).",
    )
    guard_upstream_key: SecretStr | None = Field(default=None, description="Sent upstream.")
    guard: GuardConfig = Field(default_factory=GuardConfig)
    ui_secure_cookie: bool = Field(
        default=True, description="Send the UI's login cookie over HTTPS only (and localhost)."
    )

    @field_validator("pipelines")
    @classmethod
    def _unique(cls, value: list[PipelineConfig]) -> list[PipelineConfig]:
        names = [p.name for p in value]
        if len(set(names)) != len(names):
            raise ValueError("pipeline names must be unique")
        return value

    @field_validator("sinks", mode="before")
    @classmethod
    def _typed(cls, value: Any) -> Any:
        return sinks_typed(value)

    @field_validator("webhooks", "sinks")
    @classmethod
    def _unique_targets(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        """Webhook and sink names are unique together: they key the delivery table."""
        before = (info.data.get("webhooks") or []) if info.field_name == "sinks" else []
        unique_names(str(info.field_name), value, before)
        return value

    @field_validator("public_url", "guard_upstream", "grafana_url")
    @classmethod
    def _no_trailing_slash(cls, url: str | None) -> str | None:
        return url.rstrip("/") if url else url

    def delivery_targets(self) -> list[WebhookConfig | AnySink]:
        """Every sink with a delivery row per alert it wants: the webhooks, then the sinks."""
        return [*self.webhooks, *self.sinks]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _EnvNames(settings_cls),
            env_settings,
            _YamlSource(settings_cls, env_settings),
        )

    @field_validator("tenant_retention_days")
    @classmethod
    def _positive_days(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [t for t, d in value.items() if d < 1]
        if bad:
            raise ValueError(f"retention must be at least 1 day (tenants: {', '.join(bad)})")
        return value

    def retention_for(self, tenant: str) -> int | None:
        """Days a tenant's turns are kept (None: forever)."""
        return self.tenant_retention_days.get(tenant, self.retention_days)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'monitor.db'}"

    def resolved_pipelines(self) -> list[PipelineConfig]:
        if self.pipelines:
            return self.pipelines
        base = Settings()
        return [PipelineConfig(name=base.model, model=base.model, layer=base.layer, sae=base.sae)]

    def pipeline_settings(self, p: PipelineConfig) -> Settings:
        return Settings(
            model=p.model,
            layer=p.layer,
            sae=p.sae,
            device=self.device,  # type: ignore[arg-type]
            max_tokens=self.max_tokens,
            max_input_tokens=self.max_input_tokens,
        )


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file named by ``SAFETY_MONITOR_CONFIG_FILE`` (or ``config_file=``)."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._env().get("config_file")
        if not path:
            return {}
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"config file {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"config file {path}: expected a mapping of settings")
        refuse_unknown([str(k) for k in doc], self.settings_cls.model_fields, f"config file {path}")
        return doc


class _EnvNames(PydanticBaseSettingsSource):
    """Contributes nothing; refuses ``SAFETY_MONITOR_*`` variables that name no setting."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = set(self.settings_cls.model_fields)
        names = [
            name[len(ENV_PREFIX) :].lower()
            for name in os.environ
            if name.upper().startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)
        ]
        refuse_unknown(
            [n for n in names if n not in _OTHER_VARIABLES],
            known,
            "environment",
            spell=lambda n: ENV_PREFIX + n.upper(),
        )
        return {}
