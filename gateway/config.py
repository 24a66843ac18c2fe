"""The gateway's YAML config: models, server limits and routing, validated strictly and all
at once.

`load_config(path)` returns a `GatewayConfig` or raises `ConfigError` listing every
problem with its path in the file (`models[1].url: Field required`), so a user fixes a
bad file in one pass. The embedded default config is `deploy/default.yaml`, read as package
data (`distillgate_deploy`), so it is found in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillgate_deploy import shipped
from gateway.adapt.detectors import DetectorConfig

DEFAULT_CONFIG = "default.yaml"  # shipped files, found with `shipped(name)`
DEFAULT_POLICY = "policy.yaml"

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.:-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalModel(_Strict):
    """In-process transformers. `path` absent: the model store's entry named `name`."""

    name: Name
    backend: Literal["local"]
    role: Literal["teacher", "student"] = "student"
    path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: int = Field(8, ge=1, le=256)
    context_length: int | None = Field(None, ge=16)


class OpenAIModel(_Strict):
    """Any remote OpenAI-compatible server (vLLM, production-stack, llm-d, KServe, Ray Serve)."""

    name: Name
    backend: Literal["openai"]
    role: Literal["teacher", "student"] = "student"
    url: Annotated[str, Field(pattern=r"^https?://")]
    served_model: str | None = None
    api_key_env: str | None = None
    context_length: int = Field(2048, ge=16)
    max_connections: int = Field(256, ge=1, le=10_000)


class VLLMModel(_Strict):
    """One `vllm serve` process per model, started and stopped with the gateway."""

    name: Name
    backend: Literal["vllm"]
    role: Literal["teacher", "student"] = "student"
    path: Path
    port: int = Field(ge=1024, le=65535)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_model_len: int = Field(2048, ge=16)
    executable: str = "vllm"
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout_s: float = Field(600.0, gt=0)


ModelConfig = Annotated[LocalModel | OpenAIModel | VLLMModel, Field(discriminator="backend")]


def slots_of(model: ModelConfig | None) -> int:
    """How many requests a model runs at once: a local model's batch, a remote one's
    connections (1 when unknown)."""
    return getattr(model, "max_batch_size", None) or getattr(model, "max_connections", 1)


class Limits(_Strict):
    queue_size: int = Field(64, ge=1, le=100_000)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1_073_741_824)
    max_tokens: int = Field(1024, ge=1, le=1_000_000)
    default_max_tokens: int = Field(256, ge=1, le=1_000_000)
    request_timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # A stream that sends no token for this long ends with an error event and [DONE].
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    # Per-key rpm/tpm (gateway/limits.py): kept in this process, or shared by every replica
    # through this Redis; on a Redis failure: local (each replica limits alone), open
    # (admit) or closed (503). The window is a minute; shorter only to test quickly.
    redis_url: Annotated[str, Field(pattern=r"^(rediss?|unix)://")] | None = None
    on_redis_error: Literal["local", "open", "closed"] = "local"
    redis_timeout_s: float = Field(0.25, gt=0, le=30)
    rate_window_s: float = Field(60.0, ge=1, le=3600)


class Audit(_Strict):
    """A share of student-answered requests is answered by the teacher too, in the
    background and only while the teacher has spare capacity (no request waiting, fewer
    than `max_teacher_busy` of its slots running); the two answers' agreement goes into
    the traffic log for the degradation detector."""

    share: float = Field(0.02, ge=0, le=1)
    max_teacher_busy: float = Field(0.5, ge=0, le=1)
    max_in_flight: int = Field(2, ge=1, le=1024)


class Traffic(_Strict):
    """The traffic log: one row per request that reached a model, written off the request
    path in batches to a SQLite file in the model store, or to PostgreSQL when `dsn` (or
    the environment's DISTILLGATE_TRAFFIC_DSN) is set. Content is kept only for SLO
    classes whose policy says `log_content: true`, and for a shorter time."""

    enabled: bool = True
    dsn: str | None = None
    queue_size: int = Field(10_000, ge=1, le=10_000_000)
    batch_size: int = Field(512, ge=1, le=100_000)
    flush_interval_s: float = Field(0.5, gt=0, le=60)
    max_age_days: float | None = Field(30.0, gt=0)
    max_rows: int | None = Field(1_000_000, ge=1)
    content_max_age_days: float | None = Field(7.0, gt=0)
    audit: Audit = Audit()


class Rollout(_Strict):
    """How a registered student earns its domain's traffic (gateway/adapt/rollout.py):
    shadow (it answers a share of its domain's teacher-answered requests in the
    background), canary at each of `steps` shares, then live; each promotion needs
    `min_pairs` fresh agreement pairs whose lower bound meets the target, and an
    agreement upper bound below the target or an error rate above `max_error_rate` rolls
    it back to shadow."""

    shadow_share: float = Field(0.5, ge=0, le=1)
    audit_share: float = Field(0.2, ge=0, le=1)  # of a canary or live student's answers
    steps: tuple[float, ...] = (0.1, 0.5)
    min_pairs: int = Field(200, ge=1)
    step_pairs: int = Field(100, ge=1)  # fresh pairs for each canary step
    confidence: float = Field(0.95, gt=0, lt=1)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    min_requests: int = Field(50, ge=1)  # before the error rate counts

    @model_validator(mode="after")
    def _check(self) -> Rollout:
        if any(not 0 < s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError("rollout.steps must be increasing shares in (0, 1)")
        return self


class Adapt(_Strict):
    """The adaptation process's settings (`distillgate adapt run|once`): the shift
    detectors' thresholds (gateway/adapt/detectors.py documents each), how a new
    traffic's task is built from the log, how its student is planned and made, and how
    it is rolled out."""

    detect: DetectorConfig = DetectorConfig()
    min_examples: int = Field(500, ge=16)  # logged teacher answers with content
    max_examples: int = Field(5000, ge=16)
    validation_share: float = Field(0.1, ge=0, lt=0.5)
    test_share: float = Field(0.2, gt=0, lt=0.5)  # the most recent rows
    # Where a student starts when the teacher's weights are elsewhere: a model store name
    # or a Hugging Face directory (default: the embedded SmolLM2-135M-Instruct).
    student_base: str | None = None
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)  # the planner's candidates
    default_ratio: float = Field(0.5, gt=0, le=1)  # when no law is configured
    max_train_minutes: float = Field(30.0, gt=0)
    seconds_per_example: float = Field(0.6, gt=0)  # full-size student, one epoch (planning)
    format: Literal["auto", "answers", "logits"] = "auto"  # auto: logits with a local teacher
    method: Literal["full", "lora"] = "full"
    pruning: Literal["depth", "width"] = "depth"
    schedule: str = "one-shot"
    epochs: float = Field(2.0, gt=0)
    threads: int | None = Field(1, ge=1, le=1024)  # torch threads of the adapt process
    nice: int = Field(10, ge=0, le=19)
    interval_s: float = Field(5.0, gt=0)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    rollout: Rollout = Rollout()

    @model_validator(mode="after")
    def _check(self) -> Adapt:
        if self.max_examples < self.min_examples:
            raise ValueError("adapt.max_examples must not be below adapt.min_examples")
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError("adapt.ratios must be compression ratios in (0, 1]")
        return self


class Students(_Strict):
    """Students served from the model store without being listed under `models`: those
    the adaptation loop registered (manifests with an `adaptation` record), loaded when
    they appear, at most `max_loaded` at once (least recently used unloaded first)."""

    from_store: bool = False
    max_loaded: int = Field(4, ge=1, le=256)
    max_batch_size: int = Field(8, ge=1, le=256)


class Routing(_Strict):
    """What `model: "auto"` needs: the policy file (SLO classes; reloaded when it
    changes) and the fitted law (law.json). Relative paths are from the config file."""

    policy: Path | None = Field(default_factory=lambda: shipped(DEFAULT_POLICY))
    law: Path | None = None


class Tracing(_Strict):
    """Optional OpenTelemetry tracing (gateway/tracing.py): one span per request that
    reaches a model, exported over OTLP/HTTP. `enabled` unset: on when an endpoint is
    configured, here or in the environment's OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_SDK_DISABLED=true turns it off whatever this says.
    Needs the `otel` extra."""

    enabled: bool | None = None
    endpoint: Annotated[str, Field(pattern=r"^https?://")] | None = None  # .../v1/traces
    service_name: Name = "distillgate"
    sample_ratio: float = Field(1.0, ge=0, le=1)  # of traces started here (parents decide)


class Failover(_Strict):
    """What `auto` does when a model fails (gateway/routing/breaker.py): a request whose
    model fails before its first token (unreachable, 5xx, crashed) is retried once on the
    routing decision's next-best model when `retry`; a model with `failures_to_open`
    consecutive failures leaves routing for `cool_down_s`, doubled at each failed probe up
    to `max_cool_down_s`, then one probe request at a time tells whether it is back."""

    retry: bool = True
    failures_to_open: int = Field(3, ge=1, le=10_000)
    cool_down_s: float = Field(5.0, gt=0, le=86_400)
    max_cool_down_s: float = Field(60.0, gt=0, le=86_400)
    probe_timeout_s: float = Field(30.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _check(self) -> Failover:
        if self.max_cool_down_s < self.cool_down_s:
            raise ValueError("failover.max_cool_down_s must not be below failover.cool_down_s")
        return self


class Server(_Strict):
    """Overload and shutdown (gateway/admission.py). At most `max_in_flight` generation
    requests are admitted at once (unset: what the models hold, `capacity_of`); more are
    answered 429 at once, before their body is read. On SIGTERM /ready
    answers 503 and new requests are still served for `drain_s` (for load balancers that
    learn from /ready; Kubernetes' preStop sleep does this job there), then the port
    closes and in-flight requests get `shutdown_timeout_s` to finish before the exit."""

    max_in_flight: int | None = Field(None, ge=1, le=10_000_000)
    shutdown_timeout_s: float = Field(10.0, gt=0, le=3600)
    drain_s: float = Field(0.0, ge=0, le=3600)
    # worker processes on one listening socket (gateway/workers.py; `serve --workers`)
    workers: int = Field(1, ge=1, le=1024)


class Auth(_Strict):
    """Who may call (gateway/auth.py). `keys`: every request but /health, /ready, the API
    docs and (unless `metrics: keys`) /metrics needs a key from `distillgate keys create`.
    `none`: anyone who reaches the port. Unset: none, and `serve` refuses an address other
    than loopback until it is set. The key table is reread every `refresh_s` seconds."""

    mode: Literal["none", "keys"] | None = None
    metrics: Literal["open", "keys"] = "open"
    refresh_s: float = Field(5.0, gt=0, le=3600)


class GatewayConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    limits: Limits = Limits()
    routing: Routing = Routing()
    traffic: Traffic = Traffic()
    adapt: Adapt = Adapt()
    students: Students = Students()
    tracing: Tracing = Tracing()
    failover: Failover = Failover()
    server: Server = Server()
    auth: Auth = Auth()
    store: Path | None = None
    # torch's intra-op threads for every in-process model (process-wide: set once at
    # start). None: all cores. Lower it when other work shares the machine.
    threads: int | None = Field(None, ge=1, le=1024)

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        ports = [m.port for m in self.models if isinstance(m, VLLMModel)]
        if len(ports) != len(set(ports)):
            raise ValueError("each vllm model needs its own port")
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def with_traffic_dsn(self, dsn: str | None) -> GatewayConfig:
        """This config with the traffic log at `dsn` (the environment's or a flag's,
        which win over the file's); unchanged when `dsn` is empty."""
        if not dsn:
            return self
        return self.model_copy(update={"traffic": self.traffic.model_copy(update={"dsn": dsn})})


class ConfigError(Exception):
    """A config file that cannot be used; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config {source} ({len(problems)} problem(s)):\n{lines}")


def load_config(path: Path | str | None = None) -> GatewayConfig:
    """Read and validate a YAML config; `None` means the embedded default."""
    path = Path(path) if path is not None else shipped(DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    config = parse_config(data, source=str(path))
    routing = config.routing
    paths = {k: path.parent / v for k, v in (("policy", routing.policy), ("law", routing.law))
             if v is not None and not v.is_absolute()}  # fmt: skip
    if paths:
        config = config.model_copy(update={"routing": routing.model_copy(update=paths)})
    return config


def parse_config(data: object, source: str = "<config>") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping with a `models` list"])
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def _describe(error: dict) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    # Discriminated unions put the chosen tag in the path (models[0].local.path); drop it.
    for tag in (".local", ".openai", ".vllm"):
        where = where.replace(f"]{tag}.", "].")
    where = where.lstrip(".") or "(top level)"
    if error["type"] == "union_tag_not_found":
        return f"{where}.backend: Field required (one of local, openai, vllm)"
    return f"{where}: {error['msg']}"
