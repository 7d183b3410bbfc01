"""OpenTelemetry for guard mode: one span per proxied call with the ``gen_ai.*`` attributes of
the OpenTelemetry GenAI semantic conventions, and one ``gen_ai.evaluation.result`` event per
detector verdict (name, score, label, an explanation naming the top features).

Off by default (``guard.otel.enabled``). With an ``endpoint`` spans are exported over OTLP/HTTP
(the ``otel`` extra installs the exporter); a caller may instead hand in its own provider (the
tests use the SDK's in-memory exporter).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from detectors.engine import Verdict
    from monitor.service.guard import Exchange
    from monitor.service.guard_settings import OtelConfig

EVALUATION_EVENT = "gen_ai.evaluation.result"


def provider_from(config: OtelConfig) -> TracerProvider | None:
    """The provider the settings ask for: None when off; exporting over OTLP/HTTP when an
    endpoint is set (ImportError naming the extra when the exporter is not installed)."""
    if not config.enabled:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    if config.endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ImportError(
                "guard.otel.endpoint needs the OTLP exporter: pip install 'safety-monitor[otel]'"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
    return provider


def explanation(verdict: Verdict) -> str:
    """The verdict's top features, as an auditor reads them."""
    parts = [
        f"{f.index} {f.label!r}={f.value:.3g} (cutoff {f.cutoff:.3g})" for f in verdict.features
    ]
    state = "fired" if verdict.fired else "did not fire"
    return f"{verdict.detector} {state} at {verdict.score:.3g}" + (
        "; top features: " + ", ".join(parts) if parts else ""
    )


class GuardTelemetry:
    def __init__(self, provider: trace.TracerProvider | None) -> None:
        self.enabled = provider is not None
        self.provider = provider
        self.tracer = (provider or trace.NoOpTracerProvider()).get_tracer("safety-monitor.guard")

    def record(
        self,
        exchange: Exchange,
        verdicts: list[Verdict],
        started_ns: int,
        error: str | None = None,
    ) -> None:
        """One CLIENT span from ``started_ns`` to now for the call ``exchange`` describes."""
        if not self.enabled:
            return
        model = exchange.request_model or "unknown"
        span = self.tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, start_time=started_ns)
        attributes: dict[str, str | int | list[str]] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.conversation.id": exchange.conversation_id,
            "safety_monitor.turn_id": exchange.turn_id,
            "safety_monitor.guard.outcome": exchange.outcome,
        }
        if exchange.response_id:
            attributes["gen_ai.response.id"] = exchange.response_id
        if exchange.response_model:
            attributes["gen_ai.response.model"] = exchange.response_model
        if exchange.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = exchange.finish_reasons
        if "prompt_tokens" in exchange.usage:
            attributes["gen_ai.usage.input_tokens"] = exchange.usage["prompt_tokens"]
        output = exchange.usage.get("completion_tokens", exchange.tokens)
        attributes["gen_ai.usage.output_tokens"] = output
        span.set_attributes(attributes)
        for v in verdicts:
            span.add_event(
                EVALUATION_EVENT,
                {
                    "gen_ai.evaluation.name": v.detector,
                    "gen_ai.evaluation.score.value": float(v.score),
                    "gen_ai.evaluation.score.label": "fired" if v.fired else "not_fired",
                    "gen_ai.evaluation.explanation": explanation(v),
                    "gen_ai.response.id": exchange.response_id or "",
                },
            )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute("error.type", error)
        span.end(end_time=time.time_ns())
