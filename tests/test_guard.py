"""Guard mode with real parts on both sides: llama.cpp's OpenAI-compatible server (the SmolLM2
GGUF the monitor reads) upstream, the official OpenAI SDK as the client, the sidecar under
uvicorn on a real PostgreSQL in between, and the SDK's in-memory span exporter."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError
from samples import SCAM
from sqlalchemy import select
from sqlalchemy.orm import Session

from monitor.localservices import ThreadedServer, free_port
from monitor.service.app import create_app
from monitor.service.db import Turn
from monitor.service.keys import create_key
from monitor.service.monitored import Monitored
from monitor.service.runtime import Runtime, SettingsError
from monitor.service.settings import ServiceSettings
from monitor.upstream import LlamaServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "smollm2-135m-instruct"
BENIGN = [{"role": "user", "content": "Name three colours of the rainbow."}]
WINDOW = 4  # abort_every_tokens: small, so that an abort shows well before the answer ends
TENANTS = {"observe": {}, "block": {"scam_email": "block"}, "abort": {"scam_email": "abort"}}
TENANTS["shadow"] = {"scam_email": "shadow"}


@pytest.fixture(scope="module")
def upstream(cache_dir: Path) -> Iterator[LlamaServer]:
    with LlamaServer(cache_dir) as server:
        yield server


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def guard(
    upstream: LlamaServer, monitored: Monitored, pg_url: str, spans: InMemorySpanExporter
) -> Iterator[tuple[ThreadedServer, dict[str, str]]]:
    """The sidecar in guard mode, and a key per tenant (one tenant per policy)."""
    run = uuid.uuid4().hex[:6]
    tenants = {name: f"guard-{name}-{run}" for name in TENANTS}
    settings = ServiceSettings(
        database_url=pg_url,
        guard_upstream=upstream.base_url,
        guard={
            "abort_every_tokens": WINDOW,
            "tenant_policies": {tenants[n]: p for n, p in TENANTS.items() if p},
            "otel": {"enabled": True},
        },
    )
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = ThreadedServer(create_app(settings, [monitored], tracer_provider=provider))
    with server:
        keys = {}
        state = server.server.config.app.state.monitor
        with Session(state.engine) as session:
            for name, tenant in tenants.items():
                keys[name] = create_key(session, tenant, "ingest")
            session.commit()
        yield server, keys


def sdk(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, messages: list[dict[str, str]], **kw: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        seed=7,
        max_tokens=48,
        **kw,  # type: ignore[arg-type]
    )


def streamed(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[str, list[str], str]:
    """The streamed answer's text, its finish reasons, and the guard's turn id (if any)."""
    text, reasons = "", []
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        seed=7,
        max_tokens=48,
        stream=True,  # type: ignore[arg-type]
    ) as response:
        for chunk in response.parse():
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        return text, reasons, response.headers.get("x-turn-id", "")


def stored(server: ThreadedServer, turn_id: str, wait_s: float = 30) -> Turn:
    state = server.server.config.app.state.monitor
    deadline = time.monotonic() + wait_s
    while True:
        with Session(state.engine) as session:
            found = session.scalar(select(Turn).where(Turn.id == turn_id))
        if found is not None or time.monotonic() > deadline:
            assert found is not None, f"turn {turn_id} was never recorded"
            return found
        time.sleep(0.2)


def guard_meta(turn: Turn) -> dict[str, Any]:
    meta: dict[str, Any] = turn.meta["guard"]
    return meta


def test_benign_chat_streams_through_unchanged_and_is_recorded(
    upstream: LlamaServer, guard: tuple[ThreadedServer, dict[str, str]]
) -> None:
    server, keys = guard
    direct, direct_reasons, _ = streamed(sdk(upstream.base_url), BENIGN)
    assert direct.strip(), "the upstream answered"
    through = sdk(f"{server.url}/v1", keys["observe"])
    text, reasons, turn_id = streamed(through, BENIGN)
    assert (text, reasons) == (direct, direct_reasons)
    turn = stored(server, turn_id)
    assert guard_meta(turn)["outcome"] == "completed"
    assert guard_meta(turn)["finish_reasons"] == direct_reasons
    assert [m["role"] for m in turn.messages] == ["user", "assistant"]
    assert turn.messages[-1]["content"] == direct

    whole = ask(sdk(upstream.base_url), BENIGN)
    raw = through.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=BENIGN,
        temperature=0,
        seed=7,
        max_tokens=48,  # type: ignore[arg-type]
    )
    assert raw.parse().choices[0].message.content == whole.choices[0].message.content
    assert stored(server, raw.headers["x-turn-id"]).messages[-1]["content"] == (
        whole.choices[0].message.content
    )


def test_a_blocked_request_gets_the_content_filter_error_through_the_sdk(
    guard: tuple[ThreadedServer, dict[str, str]],
) -> None:
    server, keys = guard
    with pytest.raises(openai.BadRequestError) as caught:
        ask(sdk(f"{server.url}/v1", keys["block"]), SCAM)
    assert caught.value.code == "content_filter"
    body: Any = caught.value.body
    assert body["detector"] == "scam_email"
    turn = stored(server, body["turn_id"])
    assert guard_meta(turn)["outcome"] == "blocked"
    assert [m["role"] for m in turn.messages] == ["user"], "nothing was answered"
    # The same request from a tenant that only observes is answered.
    assert ask(sdk(f"{server.url}/v1", keys["observe"]), SCAM).choices[0].message.content


def test_abort_cuts_the_stream_within_a_window_and_shadow_only_records(
    upstream: LlamaServer, guard: tuple[ThreadedServer, dict[str, str]]
) -> None:
    server, keys = guard
    direct, _, _ = streamed(sdk(upstream.base_url), SCAM)
    text, reasons, aborted_id = streamed(sdk(f"{server.url}/v1", keys["abort"]), SCAM)
    assert reasons == ["content_filter"]
    assert direct.startswith(text) and len(text) < len(direct)
    assert len(text.split()) <= 3 * WINDOW, "the abort came within a window of the first score"
    aborted = stored(server, aborted_id)
    assert guard_meta(aborted)["outcome"] == "aborted"
    assert aborted.messages[-1]["content"] == text, "the turn holds what the client got"
    (decision,) = guard_meta(aborted)["decisions"]
    assert decision["detector"] == "scam_email" and decision["action"] == "abort"
    assert not decision["shadow"] and 0 < decision["at_tokens"] <= 2 * WINDOW

    shadowed, reasons, shadow_id = streamed(sdk(f"{server.url}/v1", keys["shadow"]), SCAM)
    assert shadowed == direct and reasons != ["content_filter"], "shadow sends everything"
    shadow_turn = stored(server, shadow_id)
    actions = {(d["action"], d["shadow"]) for d in guard_meta(shadow_turn)["decisions"]}
    assert actions == {("block", True), ("abort", True)}
    assert guard_meta(shadow_turn)["outcome"] == "completed"


def test_a_client_that_disconnects_leaves_a_recorded_turn_and_no_hung_upstream(
    guard: tuple[ThreadedServer, dict[str, str]],
) -> None:
    server, keys = guard
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
        # SmolLM2's end tokens forbidden: the generation runs the whole 1,500 tokens (~20 s
        # on one thread) unless it is cancelled.
        "logit_bias": {"0": -100, "2": -100},
    }
    headers = {"Authorization": f"Bearer {keys['observe']}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        turn_id = response.headers["x-turn-id"]
        lines = 0
        for line in response.iter_lines():
            lines += line.startswith("data:")
            if lines >= 5:
                break  # leaving the block closes the connection mid-stream
    turn = stored(server, turn_id)
    assert guard_meta(turn)["outcome"] == "disconnected"
    assert turn.messages[-1]["role"] == "assistant" and turn.messages[-1]["content"]
    # llama.cpp serves one request at a time: a short one is answered at once only if the
    # 1,500-token generation was cancelled with the client.
    started = time.monotonic()
    assert ask(sdk(f"{server.url}/v1", keys["observe"]), BENIGN).choices[0].message.content
    assert time.monotonic() - started < 8


def test_spans_carry_gen_ai_attributes_and_one_evaluation_event_per_verdict(
    guard: tuple[ThreadedServer, dict[str, str]], spans: InMemorySpanExporter
) -> None:
    server, keys = guard
    spans.clear()
    raw = sdk(f"{server.url}/v1", keys["observe"]).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=BENIGN,
        temperature=0,
        max_tokens=16,
        user="alice",  # type: ignore[arg-type]
    )
    turn_id = raw.headers["x-turn-id"]
    completion = raw.parse()
    stored(server, turn_id)
    deadline = time.monotonic() + 10
    while not spans.get_finished_spans() and time.monotonic() < deadline:
        time.sleep(0.1)
    (span,) = [
        s for s in spans.get_finished_spans() if s.attributes["safety_monitor.turn_id"] == turn_id
    ]  # type: ignore[index]
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.id"] == completion.id
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert str(attrs["gen_ai.conversation.id"]).startswith("alice:")
    events = [e for e in span.events if e.name == "gen_ai.evaluation.result"]
    state = server.server.config.app.state.monitor
    n_detectors = len(next(iter(state.monitored.values())).engine.detectors)
    assert len(events) == n_detectors
    names = {e.attributes["gen_ai.evaluation.name"] for e in events}  # type: ignore[index]
    assert "scam_email" in names
    assert all(
        e.attributes["gen_ai.evaluation.score.label"] in ("fired", "not_fired") for e in events
    )  # type: ignore[index]


def test_bad_input_upstream_errors_and_models(
    upstream: LlamaServer, guard: tuple[ThreadedServer, dict[str, str]]
) -> None:
    server, keys = guard
    headers = {"Authorization": f"Bearer {keys['observe']}"}
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL}, headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot"}]}, headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "messages", 0]
    # What decides how answers come back is the guard's to check: none could go unread.
    for field, value in (("stream", 1), ("stream", "true"), ("n", 2)):
        body = {"model": MODEL, "messages": BENIGN, field: value}
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
    # A body the guard can read but the upstream refuses: the upstream's own error.
    bad = {"model": MODEL, "messages": BENIGN, "max_tokens": "many"}
    direct = httpx.post(f"{upstream.base_url}/chat/completions", json=bad)
    through = httpx.post(url, json=bad, headers=headers)
    assert direct.status_code >= 400
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    assert httpx.post(url, json=bad).status_code == 401, "no monitor key, no proxy"

    models = sdk(f"{server.url}/v1", keys["observe"]).models.list()
    assert MODEL in [m.id for m in models.data]


def test_upstream_down_is_a_502_with_nothing_recorded(monitored: Monitored, pg_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = ServiceSettings(database_url=pg_url, guard_upstream=dead)
    with ThreadedServer(create_app(settings, [monitored])) as server:
        state = server.server.config.app.state.monitor
        tenant = f"guard-down-{uuid.uuid4().hex[:6]}"
        with Session(state.engine) as session:
            key = create_key(session, tenant, "ingest")
            session.commit()
        with pytest.raises(openai.APIStatusError) as caught:
            ask(sdk(f"{server.url}/v1", key), BENIGN)
        assert caught.value.status_code == 502
        assert dead in caught.value.message
        with Session(state.engine) as session:
            assert session.scalars(select(Turn).where(Turn.tenant == tenant)).all() == []


def test_policies_that_cannot_work_refuse_to_start(monitored: Monitored, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(ValidationError) as info:
        ServiceSettings(database_url=db, guard={"policies": {"scam_email": "zap"}})
    assert info.value.errors()[0]["loc"] == ("guard", "policies", "scam_email")
    with pytest.raises(ValidationError, match="guard_upstream"):
        ServiceSettings(database_url=db, guard_upstream="localhost:8080/v1")
    typo = ServiceSettings(
        database_url=db, guard={"tenant_policies": {"t": {"scam_emial": "block"}}}
    )
    with pytest.raises(SettingsError, match=r"guard.policies: unknown detector 'scam_emial'"):
        Runtime(typo, [monitored])
    elsewhere = ServiceSettings(database_url=db, guard={"pipeline": "other"})
    with pytest.raises(SettingsError, match=r"guard.pipeline: no pipeline named 'other'"):
        Runtime(elsewhere, [monitored])


def test_steer_forwards_the_clamps_to_serve_model_when_the_request_fires(
    monitored: Monitored, pg_url: str
) -> None:
    """The project's own model server as the upstream: a steer policy that fires sends the
    detector's clamps with the request; serve-model applies them and says so."""
    from monitor.config import Settings
    from monitor.generation import Generator
    from monitor.model_server import create_model_app

    with ThreadedServer(create_model_app(Generator.from_settings(Settings()), [])) as model:
        run = uuid.uuid4().hex[:6]
        steered, plain = f"guard-steer-{run}", f"guard-plain-{run}"
        settings = ServiceSettings(
            database_url=pg_url,
            guard_upstream=f"{model.url}/v1",
            guard={
                "tenant_policies": {steered: {"scam_email": "steer"}},
                "steer_clamps": {"scam_email": {"6168": "2x"}},
            },
        )
        app = create_app(settings, [monitored])
        with ThreadedServer(app) as server:
            with Session(app.state.monitor.engine) as session:
                keys = {t: create_key(session, t, "ingest") for t in (steered, plain)}
                session.commit()

            def call(tenant: str, messages: list[dict[str, str]]) -> tuple[Any, str]:
                raw = sdk(f"{server.url}/v1", keys[tenant]).chat.completions.with_raw_response
                r = raw.create(model=MODEL, messages=messages, max_tokens=12)  # type: ignore[arg-type]
                return r.http_response.json(), r.headers["x-turn-id"]

            answer, turn_id = call(steered, SCAM)
            assert answer["steering"]["clamp"] == ["6168=2x"], "serve-model applied the clamp"
            (decision,) = guard_meta(stored(server, turn_id))["decisions"]
            assert (decision["detector"], decision["action"]) == ("scam_email", "steer")
            unsteered, _ = call(plain, SCAM)
            assert unsteered["steering"]["clamp"] == []
            assert (
                unsteered["choices"][0]["message"]["content"]
                != (answer["choices"][0]["message"]["content"])
            )
            benign, _ = call(steered, BENIGN)
            assert benign["steering"]["clamp"] == [], "nothing fired: forwarded untouched"
            own = sdk(f"{server.url}/v1", keys[plain]).chat.completions.with_raw_response.create(
                model=MODEL,
                messages=BENIGN,  # type: ignore[arg-type]
                max_tokens=4,
                extra_body={"steering": {"clamp": {"6168": "2x"}}},
            )
            assert own.http_response.json()["steering"]["clamp"] == [], "a client cannot steer"
    with pytest.raises(ValidationError, match=r"needs steer_clamps\.scam_email"):
        ServiceSettings(guard={"policies": {"scam_email": "steer"}})
    with pytest.raises(ValidationError, match=r"steer_clamps.scam_email.6168: clamp"):
        ServiceSettings(
            guard={
                "policies": {"scam_email": "steer"},
                "steer_clamps": {"scam_email": {"6168": "lots"}},
            }
        )


def test_tool_calls_in_the_answer_are_read_as_the_assistants_text() -> None:
    """An answer's tool calls (whole or streamed in pieces, as OpenAI's chat format sends them)
    are monitored as ``name(arguments)``, the form a request's assistant tool calls take."""
    from monitor.service.guard import Exchange
    from monitor.service.guard_sse import content_filter_end
    from monitor.service.schemas import MessageIn

    def exchange() -> Exchange:
        return Exchange("t", "c", [], {}, "turn-1")

    call = {"name": "send_email", "arguments": '{"to": "a@b.example", "body": "Wire $500"}'}
    whole = exchange()
    whole.observe_completion(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Sending it now.",
                        "tool_calls": [{"id": "1", "type": "function", "function": call}],
                    },
                    "finish_reason": "tool_calls",
                }
            ]
        }
    )
    expected = MessageIn.model_validate(
        {"role": "assistant", "content": "Sending it now.", "tool_calls": [{"function": call}]}
    ).monitored()
    assert whole.turn().messages == [expected]

    def delta(d: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": d, "finish_reason": reason}]}

    def piece(i: int, name: str | None = None, arguments: str = "") -> dict[str, Any]:
        function = {"arguments": arguments, **({"name": name} if name else {})}
        return delta({"tool_calls": [{"index": i, "function": function}]})

    streamed = exchange()
    chunks = [
        delta({"role": "assistant", "content": "Sending it now."}),
        piece(0, "send_email"),
        piece(0, arguments='{"to": "a@b.example", '),
        piece(0, arguments='"body": "Wire $500"}'),
        piece(1, "log", '{"n": 1}'),
        delta({}, "tool_calls"),
    ]
    for chunk in chunks:
        streamed.observe_chunk(chunk)
    (message,) = streamed.turn().messages
    assert message.content == expected.content + '\nlog({"n": 1})'
    assert streamed.tokens == 5 and streamed.finish_reasons == ["tool_calls"]
    # cut off in the middle of the first call's arguments: what was sent, the call closed
    content_filter_end(streamed, 3)
    assert (
        streamed.turn().messages[0].content == 'Sending it now.\nsend_email({"to": "a@b.example", )'
    )


def test_spans_reach_an_otlp_http_receiver() -> None:
    """With ``guard.otel.endpoint`` set, the SDK's OTLP/HTTP exporter posts the guard's spans
    (protobuf) to the endpoint: a receiver on loopback decodes what a collector would."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from detectors.engine import FeatureEvidence, Verdict
    from monitor.service.guard import Exchange
    from monitor.service.guard_settings import OtelConfig
    from monitor.service.telemetry import GuardTelemetry, provider_from

    received: list[tuple[str, str, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        provider = provider_from(
            OtelConfig(enabled=True, endpoint=endpoint, service_name="guard-otlp-test")
        )
        assert provider is not None
        exchange = Exchange("acme", "alice:1", [], {}, "turn-otlp", request_model=MODEL)
        exchange.observe_completion(
            {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"content": "Hi"}}]}
        )
        fired = Verdict(
            "scam_email", "rule", 1.7, True, "high", [FeatureEvidence(6168, "FREE offers", 2, 1)]
        )
        GuardTelemetry(provider).record(exchange, [fired], time.time_ns() - 1_000_000)
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
    ((path, content_type, body),) = received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "guard-otlp-test"
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    attrs = {a.key: a.value for a in span.attributes}
    assert span.name == f"chat {MODEL}"
    assert attrs["safety_monitor.turn_id"].string_value == "turn-otlp"
    assert attrs["gen_ai.response.id"].string_value == "chatcmpl-1"
    (event,) = span.events
    evaluation = {a.key: a.value for a in event.attributes}
    assert event.name == "gen_ai.evaluation.result"
    assert evaluation["gen_ai.evaluation.score.label"].string_value == "fired"
    assert "6168 'FREE offers'" in evaluation["gen_ai.evaluation.explanation"].string_value


@pytest.mark.slow
def test_the_guard_panels_read_what_prometheus_scrapes(
    guard: tuple[ThreadedServer, dict[str, str]], tmp_path: Path
) -> None:
    """The service-health dashboard's "Guard mode" row, as Grafana sends its queries, on a real
    Prometheus scraping the guard: the exchanges by outcome, the block, no failures."""
    import math

    from test_dashboards import ALL, SCRAPE_S, _Prometheus, _wait, expand_promql

    from monitor.dashboards import build_all

    server, keys = guard
    started = time.time()
    prom = _Prometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        p = prom
        blocked = 'sum(safety_monitor_guard_exchanges_total{outcome="blocked"})'

        def exchange_twice() -> None:  # one answered, one blocked
            assert ask(sdk(f"{server.url}/v1", keys["observe"]), BENIGN).choices[0].message.content
            with pytest.raises(openai.BadRequestError):
                ask(sdk(f"{server.url}/v1", keys["block"]), SCAM)

        # Warm-up: the series exist and are scraped before the measured exchanges (a rate
        # reads no increase into a series' first sample).
        exchange_twice()
        _wait("the first scrape of a block", lambda: (p.value(blocked) or 0) > 0, 30)
        before = p.value(blocked) or 0
        exchange_twice()
        _wait("Prometheus to see the block", lambda: p.value(blocked) == before + 1, 30)
        time.sleep(2 * SCRAPE_S)  # one more sample after the last change, for the rates
        now = time.time()
        window = f"{math.ceil(now - started) + 5}s"
        doc = build_all()["service-health.json"]
        row = [panel for panel in doc["panels"] if "guard" in json.dumps(panel.get("targets"))]
        assert {panel["title"] for panel in row} == {
            "Proxied exchanges per minute",
            "Guard actions per minute",
            "Guard failures per minute",
        }
        sel: dict[str, str | list[str]] = {"pipeline": ALL, "detector": ALL}
        results = {}
        for panel in row:
            for target in panel["targets"]:
                expr = expand_promql(target["expr"], doc, sel, window, SCRAPE_S)
                result = p.query(expr, at=now)
                assert result, f"{panel['title']} ({target['refId']}) is empty: {expr}"
                results[(panel["title"], target["refId"])] = result

        def value(title: str, ref: str = "A", **labels: str) -> float:
            rows = [r for r in results[(title, ref)] if labels.items() <= r["metric"].items()]
            assert len(rows) == 1, (title, labels, results[(title, ref)])
            return float(rows[0]["value"][1])

        assert value("Proxied exchanges per minute", outcome="blocked") > 0
        assert value("Proxied exchanges per minute", outcome="completed") > 0
        blocked = value(
            "Guard actions per minute", action="block", detector="scam_email", shadow="false"
        )
        assert blocked > 0
        for ref in "ABC":
            assert value("Guard failures per minute", ref) == 0
    finally:
        prom.stop()
