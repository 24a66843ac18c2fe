"""Every Prometheus metric of the gateway, prefix `distillgate_`, label `model`, base units.

Built per app (its own CollectorRegistry, no module globals), so several gateways can
live in one process in tests. Queue depth and capacity are read from the backends, and
their health checked, at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from gateway import multiproc
from models.backends.base import Backend

# LLM latencies: sub-ms gateway work up to multi-minute generations.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4)
AGREEMENT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
HEALTH_TIMEOUT_S = 2.0  # a backend that cannot say it is healthy this fast is not ready


class Metrics:
    def __init__(self, backends: Callable[[], Mapping[str, Backend]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "distillgate_requests",
            "Requests answered, by endpoint and outcome (success, client_error, "
            "server_error, cancelled).",
            ["model", "endpoint", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "distillgate_errors",
            "Error responses (and error events of streams) by OpenAI error type, each counted "
            "once; model is empty for requests that never reached one.",
            ["model", "type"],
            registry=r,
        )
        self.ttft = Histogram(
            "distillgate_time_to_first_token_seconds",
            "Time to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "distillgate_inter_token_latency_seconds",
            "Time between streamed chunks.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "distillgate_request_duration_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "distillgate_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "distillgate_completion_tokens",
            "Completion tokens generated.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "distillgate_requests_in_flight",
            "Requests being served by the gateway now.",
            ["model"],
            multiprocess_mode="livesum",  # `serve --workers N`: the live workers' total
            registry=r,
        )
        self.batch_size = Histogram(
            "distillgate_batch_size",
            "Largest number of sequences a backend decoded together while a request ran.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.route_decisions = Counter(
            "distillgate_route_decisions",
            "Routing decisions for model auto, by chosen model, SLO class and reason.",
            ["model", "slo_class", "reason"],
            registry=r,
        )
        self.slo_requests = Counter(
            "distillgate_slo_requests",
            "Routed requests answered within (met) or beyond (missed) their class's latency.",
            ["slo_class", "outcome"],
            registry=r,
        )
        self.route_latency_ratio = Histogram(
            "distillgate_route_latency_ratio",
            "Observed over predicted request latency of routed requests.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.route_cost = Counter(
            "distillgate_route_cost",
            "Estimated cost of routed requests (the policy's cost units).",
            ["model"],
            registry=r,
        )
        self.route_cost_saved = Counter(
            "distillgate_route_cost_saved",
            "Estimated cost saved by routing, against sending every request to the teacher.",
            registry=r,
        )
        self.domain_detections = Counter(
            "distillgate_domain_detections",
            "Routed requests by detected domain.",
            ["domain"],
            registry=r,
        )
        self.registry_errors = Counter(
            "distillgate_registry_errors",
            "Manifests routing could not read (each bad version once); it keeps the model's "
            "last good one.",
            ["model"],
            registry=r,
        )
        self.traffic_written = Counter(
            "distillgate_traffic_log_written",
            "Traffic log records written to the database.",
            registry=r,
        )
        self.traffic_dropped = Counter(
            "distillgate_traffic_log_dropped",
            "Traffic log records dropped, by reason: queue_full (the writer fell behind), "
            "database (unreachable or failing) or closed (still queued when the gateway "
            "stopped and the last flush timed out).",
            ["reason"],
            registry=r,
        )
        self.traffic_queue = Gauge(
            "distillgate_traffic_log_queue_depth",
            "Traffic log records waiting to be written.",
            multiprocess_mode="livesum",  # each worker has its own writer queue
            registry=r,
        )
        # admission control (gateway/admission.py); its count is read at scrape time
        self.rejected = Counter(
            "distillgate_rejected",
            "Generation requests refused before any work was done for them, by reason "
            "(capacity: server.max_in_flight reached).",
            ["reason"],
            registry=r,
        )
        self.admitted = Gauge(
            "distillgate_admitted_requests",
            "Generation requests admitted and not finished (running or waiting).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.admission_capacity = Gauge(
            "distillgate_admission_capacity",
            "Generation requests that may be admitted at once before 429s.",
            multiprocess_mode="livesum",  # each worker admits this many: the server, the sum
            registry=r,
        )
        self.audits = Counter(
            "distillgate_audits",
            "Student answers replayed on the teacher, by outcome (done, failed, "
            "skipped_busy: the teacher had no spare capacity).",
            ["outcome"],
            registry=r,
        )
        self.audit_agreement = Histogram(
            "distillgate_audit_agreement",
            "Agreement of audited student answers with the teacher's (1 = the same answer).",
            ["model"],
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.shadow_answers = Counter(
            "distillgate_shadow_answers",
            "Teacher-answered requests replayed on a student in shadow or canary, by "
            "student and outcome (done, failed, skipped_busy: the student had no spare "
            "capacity).",
            ["model", "outcome"],
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "distillgate_shadow_agreement",
            "Agreement of students' shadow answers with the teacher's (1 = the same answer).",
            ["model"],
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "distillgate_model_ready",
            "1 when a model is loaded and its backend says it is healthy, checked at each "
            "scrape; 0 otherwise.",
            ["model"],
            # workers: ready only when every live worker's copy is (a sick one fails its share)
            multiprocess_mode="livemin",
            registry=r,
        )
        # API keys and rate limits (gateway/auth.py, gateway/limits.py)
        self.auth_failures = Counter(
            "distillgate_auth_failures",
            "Requests refused for their API key, by reason: missing, invalid, revoked, "
            "expired, unavailable (the key table has not been read yet).",
            ["reason"],
            registry=r,
        )
        self.key_refresh_errors = Counter(
            "distillgate_api_key_refresh_errors",
            "Failed rereads of the API key table (the last one read stays in use).",
            registry=r,
        )
        self.rate_limited = Counter(
            "distillgate_rate_limited",
            "Requests refused (429) by their key's rate limit, by key name and limit "
            "(requests, tokens).",
            ["key", "kind"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "distillgate_rate_limit_store_errors",
            "Rate-limit operations Redis failed, by the fallback then in force "
            "(limits.on_redis_error: local, open, closed).",
            ["fallback"],
            registry=r,
        )
        self.failovers = Counter(
            "distillgate_failovers",
            "Routed requests retried on the next-best model because theirs failed before "
            "the first token, by the failed model, the one retried and the reason "
            "(unavailable, upstream_error, server_error).",
            ["from", "to", "reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "distillgate_circuit_state",
            "Each model's circuit breaker: 0 closed, 1 half-open (a probe may pass), 2 open "
            "(out of auto routing), read at scrape time.",
            ["model"],
            multiprocess_mode="livemax",  # workers: each has its own breaker; the worst one
            registry=r,
        )
        self.circuit_opens = Counter(
            "distillgate_circuit_opens",
            "Times a model's circuit opened (consecutive failures, or a failed probe).",
            ["model"],
            registry=r,
        )
        Gauge("distillgate_build_info", "1, labelled with the running version.", ["version"],
              multiprocess_mode="livemax", registry=r).labels(_version()).set(1)  # fmt: skip
        for reason in ("queue_full", "database", "closed"):  # zeros to alert on
            self.traffic_dropped.labels(reason)
        self._load = _LoadCollector(backends)
        r.register(self._load)
        self._models: dict[str, ModelMetrics] = {}
        self._checked: set[str] = set()  # models with a distillgate_model_ready series
        # `serve --workers N` (gateway/multiproc.py): values live in files, scrapes read all
        self.multiproc_dir = multiproc.directory()
        self._mirror = None
        if self.multiproc_dir is not None:
            self._mirror = multiproc.Mirror((self.admitted, self.traffic_queue, self.circuit_state))

    async def check_models(self, backends: Mapping[str, Backend], loaded: bool) -> None:
        """Set `distillgate_model_ready` from each backend's health (all 0 until the gateway
        has loaded its models); models no longer served lose their series."""
        names = list(backends)
        healthy = await asyncio.gather(*(_healthy(backends[n]) for n in names))
        for name, ok in zip(names, healthy, strict=True):
            self.model_ready.labels(name).set(float(loaded and ok))
        if self.multiproc_dir is None:  # workers: a file keeps the label; render drops it
            for name in self._checked - set(names):
                self.model_ready.remove(name)
        self._checked = set(names)

    def for_model(self, model: str) -> ModelMetrics:
        """`model`'s label-bound children, made once: labels() takes a lock and a dict
        lookup on every call, and a request touches seven of them."""
        bound = self._models.get(model)
        if bound is None:
            bound = self._models[model] = ModelMetrics(
                *(m.labels(model) for m in (
                    self.ttft, self.itl, self.e2e, self.prompt_tokens,
                    self.completion_tokens, self.in_flight, self.batch_size,
                ))
            )  # fmt: skip
        return bound

    def publish(self) -> None:
        """Workers: write this process's scrape-time values to its multiprocess files."""
        if self._mirror is not None:
            gauges = (self._load, self.admitted, self.traffic_queue, self.circuit_state)
            self._mirror.write(family for g in gauges for family in g.collect())

    def render(self) -> bytes:
        if self.multiproc_dir is not None:
            self.publish()  # this worker's own values fresh, the others' from their last tick
            return multiproc.render(self.multiproc_dir, self._load.backends)
        return generate_latest(self.registry)


@dataclass(frozen=True)
class ModelMetrics:
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    in_flight: Gauge
    batch_size: Histogram


async def _healthy(backend: Backend) -> bool:
    with contextlib.suppress(Exception):  # a failing health check is the answer, not an error
        return await asyncio.wait_for(backend.health(), HEALTH_TIMEOUT_S)
    return False


def _version() -> str:
    try:
        return version("distillgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _LoadCollector:
    """Queue depth and running requests as each backend reports them at scrape time."""

    def __init__(self, backends: Callable[[], Mapping[str, Backend]]) -> None:
        self.backends = backends

    def describe(self) -> list:
        return []

    def collect(self):
        waiting = GaugeMetricFamily(
            "distillgate_queue_depth", "Requests waiting for a backend slot.", labels=["model"]
        )
        running = GaugeMetricFamily(
            "distillgate_backend_running", "Requests a backend is running now.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "distillgate_queue_capacity",
            "Requests that may wait for a backend before it answers 429 (local backends).",
            labels=["model"],
        )
        for name, backend in self.backends().items():
            load = backend.load()
            waiting.add_metric([name], load.waiting)
            running.add_metric([name], load.running)
            if load.capacity is not None:
                capacity.add_metric([name], load.capacity)
        yield waiting
        yield running
        yield capacity
