"""Optional OpenTelemetry tracing: one span per request with the GenAI attributes and the
routing decision, a stream's span ending with the stream, errors marked, a caller's
traceparent honoured, spans reaching a real OTLP/HTTP receiver; and, off, no SDK loaded."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import Tracing, parse_config
from gateway.tracing import build_tracer, wanted
from models.backends.base import PromptTooLong, Unavailable
from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def exporter() -> Any:
    """The SDK's in-memory exporter (skipped without the `otel` extra, failed in CI)."""
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        message = "opentelemetry-sdk is not installed (the otel extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return InMemorySpanExporter()


@contextlib.contextmanager
def traced(backends: dict[str, ScriptedBackend], exporter: Any, **kw: Any) -> Iterator[TestClient]:
    """The app over `backends`, ready, its tracer exporting synchronously to `exporter`."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with scripted_app(backends, **kw) as client:
        wait_ready(client)
        gw = client.app.state.gateway
        gw.tracer = build_tracer(Tracing(enabled=True), SimpleSpanProcessor(exporter))
        yield client


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend("tiny")


@pytest.fixture
def http(backend: ScriptedBackend, exporter: Any) -> Iterator[TestClient]:
    with traced({"tiny": backend}, exporter) as client:
        yield client


def test_chat_span_carries_genai_attributes_and_parent(http: TestClient, exporter: Any) -> None:
    from opentelemetry.trace import SpanKind, StatusCode

    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    out = sdk_for(http).chat.completions.create(
        model="tiny", messages=USER, max_tokens=7, temperature=0.5, seed=3,
        extra_headers={"traceparent": traceparent},
    )  # fmt: skip
    [span] = exporter.get_finished_spans()
    assert span.name == "chat tiny" and span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID and span.parent.is_remote
    a = span.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"]) == ("chat", "distillgate")
    assert (a["gen_ai.request.model"], a["gen_ai.response.model"]) == ("tiny", "tiny")
    assert a["gen_ai.response.id"] == out.id
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"]) == (7, 0.5)
    assert a["gen_ai.request.seed"] == 3
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (3, 4)
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["http.response.status_code"] == 200 and a["distillgate.stream"] is False
    assert "error.type" not in a and span.status.status_code == StatusCode.UNSET
    assert not any(k.startswith("distillgate.route.") for k in a)  # a model named, no route
    assert span.resource.attributes["service.name"] == "distillgate"


def test_stream_span_ends_when_the_stream_ends(
    backend: ScriptedBackend, http: TestClient, exporter: Any
) -> None:
    backend.delay_s = 0.05
    body = {"model": "tiny", "messages": USER, "stream": True, "n": 2}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert exporter.get_finished_spans() == ()  # still streaming
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    [span] = exporter.get_finished_spans()
    a = span.attributes
    assert a["distillgate.stream"] is True and a["gen_ai.request.choice.count"] == 2
    assert a["gen_ai.usage.output_tokens"] == 8  # both choices
    assert a["gen_ai.response.finish_reasons"] == ("stop", "stop")
    assert a["distillgate.time_to_first_token_s"] > 0
    assert span.end_time - span.start_time >= 4 * 0.05 * 1e9  # it lasted the whole stream


def test_routed_completion_carries_the_decision(exporter: Any) -> None:
    backends = {"big": ScriptedBackend("big"), "small": ScriptedBackend("small")}
    with traced(backends, exporter, roles={"big": "teacher"}) as client:
        out = sdk_for(client).completions.create(model="auto:batch", prompt="Once", max_tokens=5)
    [span] = exporter.get_finished_spans()
    a = span.attributes
    assert span.name == "text_completion auto:batch"
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == "auto:batch" and a["gen_ai.response.model"] == out.model
    assert a["distillgate.route.slo_class"] == "batch"
    for key in ("reason", "domain", "predicted_quality", "predicted_latency_ms", "cost"):
        assert f"distillgate.route.{key}" in a, key


def test_server_error_sets_error_status(
    backend: ScriptedBackend, http: TestClient, exporter: Any
) -> None:
    from opentelemetry.trace import StatusCode

    backend.fail_before = Unavailable("worker gone")
    with pytest.raises(openai.InternalServerError):
        sdk_for(http).chat.completions.create(model="tiny", messages=USER)
    backend.fail_before, backend.fail_after = None, 2
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": USER, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    before, during = exporter.get_finished_spans()
    for span in (before, during):
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["distillgate.outcome"] == "server_error"
    assert before.attributes["error.type"] == "service_unavailable"
    assert before.attributes["http.response.status_code"] == 503
    assert "worker gone" in before.status.description
    assert during.attributes["error.type"] == "internal_server_error"


def test_client_error_is_told_by_error_type_alone(
    backend: ScriptedBackend, http: TestClient, exporter: Any
) -> None:
    from opentelemetry.trace import StatusCode

    backend.fail_before = PromptTooLong(70, 10, 64)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 400
    [span] = exporter.get_finished_spans()
    assert span.attributes["error.type"] == "invalid_request_error"
    assert span.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize(
    ("enabled", "endpoint", "env", "on"),
    [
        (None, None, {}, False),  # the default
        (None, "http://collector:4318/v1/traces", {}, True),
        (None, None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        (None, None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        (False, None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        (True, None, {}, True),  # the exporter's default, localhost:4318
        (True, "http://collector:4318/v1/traces", {"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_when_tracing_is_on(enabled, endpoint, env, on) -> None:
    assert wanted(Tracing(enabled=enabled, endpoint=endpoint), env) is on


def test_config_rejects_a_bad_endpoint_and_ratio() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "backend": "openai", "url": "http://x"}],
                      "tracing": {"endpoint": "collector:4318", "sample_ratio": 2}})  # fmt: skip
    assert "tracing.endpoint" in str(info.value) and "tracing.sample_ratio" in str(info.value)


# Run as a child: this process may have imported the SDK already.
OFF = """
import json, sys
from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready
with scripted_app({"tiny": ScriptedBackend("tiny")}) as client:
    wait_ready(client)
    sdk = sdk_for(client)
    sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    tracer = client.app.state.gateway.tracer
print(json.dumps({"tracer": repr(tracer),
                  "loaded": sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk",
                                   "opentelemetry.exporter")))}))
"""


@pytest.mark.slow  # a child process imports the whole gateway
def test_off_by_default_loads_no_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", OFF], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"tracer": "None", "loaded": []}


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each export request's protobuf body."""

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append((self.path, ExportTraceServiceRequest.FromString(body)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass


def test_spans_reach_a_real_otlp_receiver(exporter: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    config = parse_config({
        "models": [{"name": "tiny", "backend": "openai", "url": "http://127.0.0.1:9"}],
        "traffic": {"enabled": False},
        "tracing": {"endpoint": f"http://127.0.0.1:{port}/v1/traces", "service_name": "gw-test"},
    })  # fmt: skip
    backend = ScriptedBackend("tiny")
    try:
        with TestClient(create_app(config, factory=lambda m: backend)) as client:
            wait_ready(client)
            sdk_for(client).chat.completions.create(model="tiny", messages=USER, max_tokens=5)
        # the app's shutdown flushed the batch
    finally:
        server.shutdown()
        server.server_close()
    [(path, export)] = server.received
    [resource_spans] = export.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    [span] = resource_spans.scope_spans[0].spans
    attributes = {a.key: a.value for a in span.attributes}
    assert path == "/v1/traces" and service["service.name"] == "gw-test"
    assert span.name == "chat tiny"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 4
    assert attributes["gen_ai.request.max_tokens"].int_value == 5
