"""Optional OpenTelemetry tracing: one span per request that reaches a model, named and
attributed after the GenAI semantic conventions, with the routing decision. Off by
default; nothing here imports opentelemetry unless `build_tracer` finds tracing switched on."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.config import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

    from gateway.api.generation import Job, Target
    from gateway.api.tracking import Ending, Listener
    from gateway.routing.router import Route

log = logging.getLogger("distillgate")

OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "responses": "chat",
}  # gen_ai.operation.name
ROUTES = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
}
ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class TracingUnavailable(RuntimeError):
    """`tracing.enabled: true` without the `otel` extra installed."""


def wanted(config: Tracing, env: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: OTel's own kill switch first, then the config's `enabled`,
    else whether an endpoint is configured (in the config or the standard environment)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if config.enabled is not None:
        return config.enabled
    return config.endpoint is not None or any(env.get(name) for name in ENDPOINT_ENV)


def build_tracer(
    config: Tracing, processor: SpanProcessor | None = None, env: Mapping[str, str] = os.environ
) -> RequestTracer | None:
    """The request tracer, or None when tracing is off. `processor` replaces the batching
    OTLP/HTTP exporter (the tests hand in the SDK's in-memory exporter)."""
    if not wanted(config, env):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        processor = processor or _otlp(config)
    except ImportError as exc:
        hint = f"tracing needs the otel extra: pip install 'distillgate[otel]' ({exc})"
        if config.enabled:
            raise TracingUnavailable(hint) from None
        # switched on only by an OTEL_* variable, perhaps meant for another program
        log.warning("tracing is off: %s", hint)
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(processor)
    return RequestTracer(provider, provider.get_tracer("distillgate"))


def _otlp(config: Tracing) -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # endpoint None: the exporter reads the OTEL_EXPORTER_OTLP_* environment itself
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))


@dataclass(frozen=True)
class RequestTracer:
    """Opens a request's span; the Tracker's Ending closes it (a stream's, when it ends).
    The span is not made current: it lives across the tasks that serve a stream."""

    provider: TracerProvider
    tracer: Tracer

    def begin(
        self, endpoint: str, target: Target, job: Job, headers: Mapping[str, str]
    ) -> Listener:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        attributes = request_attributes(endpoint, target, job)
        span = self.tracer.start_span(
            f"{attributes['gen_ai.operation.name']} {target.requested}",
            context=propagate.extract(headers),  # a caller's W3C traceparent
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        return functools.partial(_end, span)

    def close(self) -> None:
        """Export what is still queued, then stop (blocking: call it off the event loop)."""
        self.provider.shutdown()


def request_attributes(endpoint: str, target: Target, job: Job) -> dict[str, Any]:
    """What is known when the request reaches its model."""
    first = job.requests[0]
    params = first.params
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATIONS[endpoint],
        "gen_ai.provider.name": "distillgate",
        "gen_ai.system": "distillgate",  # the name before semconv 1.37; many backends read it
        "gen_ai.request.model": target.requested,
        "gen_ai.response.model": target.model,
        "gen_ai.response.id": first.request_id,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "http.request.method": "POST",
        "http.route": ROUTES[endpoint],
        "distillgate.stream": job.stream,
    }
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    if len(job.requests) > 1:
        attributes["gen_ai.request.choice.count"] = len(job.requests)
    if target.route is not None:
        attributes.update(route_attributes(target.route))
    return attributes


def route_attributes(route: Route) -> dict[str, Any]:
    """The router's decision for `model: auto`: why this model, and what it predicted."""
    attributes: dict[str, Any] = {
        "distillgate.route.slo_class": route.slo_class,
        "distillgate.route.reason": route.reason,
        "distillgate.route.domain": route.domain,
        "distillgate.route.domain_confidence": route.confidence,
        "distillgate.route.predicted_quality": route.quality,
        "distillgate.route.predicted_ttft_ms": route.predicted_ttft_ms,
        "distillgate.route.predicted_latency_ms": route.predicted_latency_ms,
        "distillgate.route.cost": route.cost,
        "distillgate.route.teacher_cost": route.teacher_cost,
        "distillgate.route.slo.min_quality": route.slo.min_quality,
    }
    if route.slo.p95_latency_ms is not None:
        attributes["distillgate.route.slo.p95_latency_ms"] = route.slo.p95_latency_ms
    if route.shadow is not None:
        attributes["distillgate.route.shadow"] = route.shadow
    return attributes


def ending_attributes(ending: Ending) -> dict[str, Any]:
    """What is known when the request ends: usage, finish reasons, how it ended."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": ending.prompt_tokens,
        "gen_ai.usage.output_tokens": ending.completion_tokens,
        "http.response.status_code": ending.status,
        "distillgate.outcome": ending.outcome,
    }
    if ending.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = list(ending.finish_reasons)
    if ending.ttft_s is not None:
        attributes["distillgate.time_to_first_token_s"] = ending.ttft_s
    if ending.error is not None:
        attributes["error.type"] = ending.error.type
    elif ending.outcome == "cancelled":
        attributes["error.type"] = "cancelled"
    return attributes


def _end(span: Span, ending: Ending) -> None:
    from opentelemetry.trace import StatusCode

    span.set_attributes(ending_attributes(ending))
    # As for HTTP server spans: only the gateway's own failures are errors; a client's
    # bad request or departure is told by error.type alone.
    if ending.outcome == "server_error":
        message = ending.error.message if ending.error is not None else None
        span.set_status(StatusCode.ERROR, message)
    span.end()
