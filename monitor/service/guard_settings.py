"""Settings of guard mode (the OpenAI-compatible proxy): what each detector's verdict does to a
proxied exchange, per detector and per tenant, and the proxy's OpenTelemetry spans.

The upstream itself is two top-level settings (``guard_upstream``, ``guard_upstream_key``), so
that ``SAFETY_MONITOR_GUARD_UPSTREAM`` alone turns the proxy on.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from monitor.service.sink_settings import _Strict
from monitor.steering import SteeringError, parse_clamp

Policy = Literal["observe", "block", "abort", "shadow", "steer"]
POLICIES: tuple[str, ...] = get_args(Policy)
# observe: recorded and alerted as any turn, nothing withheld (the default).
# block:   the request is scored before it is forwarded; a fire answers 400 content_filter.
# abort:   the streamed answer is scored every `abort_every_tokens`; a fire ends the stream
#          with finish_reason "content_filter" (a whole answer: withheld the same way).
# shadow:  scored as block and abort would be; what they would have done is recorded, not done.
# steer:   the request is scored before it is forwarded; a fire forwards it with the
#          detector's `steer_clamps` as the body's `steering` field, which the project's own
#          `serve-model` applies (clamping the feature while the answer is generated).


class OtelConfig(_Strict):
    """One span per proxied call with the OpenTelemetry ``gen_ai.*`` attributes, and one
    ``gen_ai.evaluation.result`` event per verdict. Off by default."""

    enabled: bool = False
    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="OTLP/HTTP traces endpoint (http://collector:4318/v1/traces); needs the "
        "'otel' extra. Unset: spans are made (for an in-process provider) and not exported.",
    )
    service_name: str = Field(default="safety-monitor", min_length=1, max_length=128)


class GuardConfig(_Strict):
    policies: dict[str, Policy] = Field(
        default_factory=dict,
        description="Detector id -> observe | block | abort | shadow; unlisted: observe.",
    )
    tenant_policies: dict[str, dict[str, Policy]] = Field(
        default_factory=dict,
        description="Tenant -> (detector id -> policy), overriding `policies` for that tenant.",
    )
    abort_every_tokens: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Streamed answers are scored every this many tokens (one streamed chunk "
        "with content counts as one token) when an abort or shadow policy applies.",
    )
    pipeline: str | None = Field(
        default=None, description="The pipeline proxied exchanges are read by; unset: the first."
    )
    timeout_s: float = Field(
        default=300, gt=0, le=3600, description="Longest wait for the upstream's next bytes."
    )
    steer_clamps: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Detector id -> the clamps a steer policy sends upstream when it fires "
        '({"scam_email": {"6168": "0"}}); the upstream must be serve-model.',
    )
    steer_on_prompt: bool = Field(
        default=True,
        description="A steer policy's clamps hold on the prompt's positions too (where the "
        "trigger is), not only on the answer's.",
    )
    otel: OtelConfig = Field(default_factory=OtelConfig)

    @model_validator(mode="after")
    def _steer_has_clamps(self) -> GuardConfig:
        every = [self.policies, *self.tenant_policies.values()]
        steered = sorted({d for p in every for d, policy in p.items() if policy == "steer"})
        missing = [d for d in steered if not self.steer_clamps.get(d)]
        if missing:
            raise ValueError(
                f"policy steer for {missing[0]!r} needs steer_clamps.{missing[0]} "
                '(feature -> value, e.g. {"6168": "0"})'
            )
        for detector, clamps in self.steer_clamps.items():
            for feature, value in clamps.items():
                try:
                    parse_clamp(f"{feature}={value}")
                except SteeringError as exc:
                    raise ValueError(f"steer_clamps.{detector}.{feature}: {exc}") from None
        return self

    def policies_for(self, tenant: str) -> dict[str, Policy]:
        """Every detector's policy for ``tenant`` that is not observe."""
        merged = {**self.policies, **self.tenant_policies.get(tenant, {})}
        return {d: p for d, p in merged.items() if p != "observe"}

    def detectors_named(self) -> set[str]:
        """Every detector id a policy names (checked against the loaded pipelines)."""
        return set(self.policies).union(*self.tenant_policies.values(), self.steer_clamps)
