"""The gateway's state, built in the app's lifespan: the config, one backend per model,
the metrics, the router of `model: "auto"`, the traffic log's recorder, the students
hot-added from the store, the request tracer (when tracing is on), and whether loading
has finished. Reached by the endpoints through `Annotated[Gateway, Depends(get_gateway)]`,
or, on the generation endpoints' hot path, `gateway_of(request)`.

`config` and the keys of `backends` change while serving (gateway/students.py): `config`
is replaced whole, and `backends` is always the same dict, which the router, the recorder
and the metrics hold."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from gateway.config import (
    GatewayConfig,
    LocalModel,
    ModelConfig,
    OpenAIModel,
    VLLMModel,
    slots_of,
)
from gateway.errors import ModelNotFound, ServiceUnavailable
from gateway.metrics import Metrics
from gateway.routing.policy import PolicyError
from gateway.routing.router import Router
from gateway.students import HotStudents
from gateway.tracing import RequestTracer, build_tracer
from law.fit import FitError
from models.backends.base import Backend
from models.store import ModelStore, StoreError

if TYPE_CHECKING:
    from gateway.adapt.recording import Recorder
    from gateway.adapt.writer import TrafficWriter

log = logging.getLogger("distillgate")

Factory = Callable[[ModelConfig], Backend]


@dataclass
class Gateway:
    config: GatewayConfig
    store: ModelStore
    factory: Factory | None = None
    backends: dict[str, Backend] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    router: Router | None = None
    recorder: Recorder | None = None
    writer: TrafficWriter | None = None
    writer_task: asyncio.Task[None] | None = None
    students: HotStudents | None = None
    tracer: RequestTracer | None = None  # None: tracing off (the default)
    # one router.refresh at a time: the refresh loop's and a hot-add's would race
    refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    # set by SIGTERM (gateway/admission.py): /ready answers 503 while requests finish
    draining: bool = False
    failure: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.backends)

    def backend(self, model: str) -> Backend:
        """The backend serving `model`, or the error a client should see."""
        if self.config.model(model) is None:
            if self.students is not None and self.students.wake(model):
                raise ServiceUnavailable(
                    f"The model '{model}' is not loaded now (students.max_loaded="
                    f"{self.config.students.max_loaded}); it is being loaded, retry shortly.",
                    retry_after=2,
                )
            available = ", ".join(m.name for m in self.config.models)
            raise ModelNotFound(
                f"The model '{model}' does not exist. Available models: {available}.",
                param="model",
            )
        backend = self.backends.get(model)
        if not self.ready or backend is None:
            reason = self.failure or "the gateway is still loading its models"
            raise ServiceUnavailable(f"Not ready: {reason}.", retry_after=5)
        return backend

    async def start(self) -> None:
        """Build every backend (converting the embedded teacher on first use, off the event
        loop) and start them (see _start_all); on failure stop the ones that started."""
        self.tracer = build_tracer(self.config.tracing)
        try:
            built = await asyncio.to_thread(self._build)
        except Exception as exc:
            self.failure = f"could not prepare the models: {exc}"
            raise RuntimeError(self.failure) from exc
        self.backends = built
        stored = [m.name for m in self.config.models if isinstance(m, LocalModel) and not m.path]
        if stored:  # so that `distillgate students remove` refuses what we serve
            self.store.lease(stored)
        results = await self._start_all()
        failed = {
            name: res
            for name, res in zip(self.backends, results, strict=True)
            if isinstance(res, BaseException)
        }
        if failed:
            self.failure = "could not start " + "; ".join(f"{n}: {e}" for n, e in failed.items())
            await self.stop()
            # the group carries every model's own traceback to the one log line (app._load)
            raise BaseExceptionGroup(self.failure, list(failed.values()))
        try:
            self.router = await asyncio.to_thread(
                Router.build, self.config, self.store, self.backends, self.metrics
            )
        except (PolicyError, FitError, StoreError, OSError) as exc:
            self.failure = f"could not set up routing: {exc}"
            await self.stop()
            raise RuntimeError(self.failure) from exc
        self._open_traffic()
        if self.config.students.from_store or self.config.traffic.enabled:
            self.students = HotStudents(self)
        self.ready = True
        log.info("ready: %s", ", ".join(self.backends))

    async def _start_all(self) -> list[BaseException | None]:
        """Start in-process models one at a time (transformers' model loading keeps
        process-wide state, e.g. its meta-device context, so two threads loading at once
        corrupt each other: "Cannot copy out of meta tensor"), the others concurrently."""
        local = {m.name for m in self.config.models if isinstance(m, LocalModel)}
        if local:
            from models.backends.local import set_threads

            set_threads(self.config.threads)
        results: dict[str, BaseException | None] = {}

        async def one(name: str) -> None:
            try:
                await self.backends[name].start()
                results[name] = None
            except Exception as exc:
                results[name] = exc

        async def locals_in_turn() -> None:
            for name in self.backends:
                if name in local:
                    await one(name)

        remote = [one(n) for n in self.backends if n not in local]
        await asyncio.gather(locals_in_turn(), *remote)
        return [results[name] for name in self.backends]

    def _build(self) -> dict[str, Backend]:
        return {m.name: self.make_backend(m) for m in self.config.models}

    def make_backend(self, model: ModelConfig) -> Backend:
        """The backend of one config entry, not started (blocking: it may read files)."""
        if self.factory is not None:
            return self.factory(model)
        return build_backend(model, self.config, self.store)

    async def refresh_routing(self, every_s: float = 1.0) -> None:
        """Reread the routing policy and the served models' manifests, and look for
        students to add or remove (gateway/students.py), forever."""
        while True:
            await asyncio.sleep(every_s)
            if self.students is not None:
                self.students.tick()  # a task of its own: a refit here must not hold it up
            await self.refresh_router()

    async def refresh_router(self) -> None:
        if self.router is not None:
            async with self.refreshing:
                await asyncio.to_thread(self.router.refresh)

    def _open_traffic(self) -> None:
        """Start the traffic log's writer task (it connects to the database in its own
        thread: an unreachable one costs dropped records, never a failed start)."""
        traffic = self.config.traffic
        if not traffic.enabled:
            return
        from gateway.adapt.log import Retention, TrafficLog, database_url
        from gateway.adapt.recording import Recorder
        from gateway.adapt.writer import TrafficWriter

        url = database_url(traffic.dsn, self.store.root)
        metrics = self.metrics
        self.writer = writer = TrafficWriter(
            lambda: TrafficLog.open(url),
            queue_size=traffic.queue_size,
            batch_size=traffic.batch_size,
            flush_interval_s=traffic.flush_interval_s,
            retention=Retention(
                traffic.max_age_days, traffic.max_rows, traffic.content_max_age_days
            ),
            on_drop=lambda reason, n: metrics.traffic_dropped.labels(reason).inc(n),
            on_write=metrics.traffic_written.inc,
        )
        metrics.traffic_queue.set_function(lambda: writer.depth)
        teacher = next((m for m in self.config.models if m.role == "teacher"), None)
        slots = slots_of(teacher)
        self.recorder = Recorder(
            writer, traffic.audit, self.backends, (teacher.name, slots) if teacher else None,
            metrics, self.config.limits.request_timeout_s,
        )  # fmt: skip
        self.writer_task = asyncio.create_task(writer.run())

    async def _close_traffic(self) -> None:
        """Flush what is queued (a clean stop loses no record), then stop the writer."""
        if self.recorder is not None:
            await self.recorder.close()
        if self.writer is not None:
            await self.writer.close()
        if self.writer_task is not None:
            self.writer_task.cancel()
            await asyncio.gather(self.writer_task, return_exceptions=True)
        self.recorder = self.writer = self.writer_task = None

    async def stop(self) -> None:
        self.ready = False
        if self.students is not None:
            await self.students.close()
        await self._close_traffic()
        self.store.release()
        await asyncio.gather(*(b.stop() for b in self.backends.values()), return_exceptions=True)
        if self.tracer is not None:  # last: the requests that ended above have their spans
            await asyncio.to_thread(self.tracer.close)
            self.tracer = None


def build_backend(model: ModelConfig, config: GatewayConfig, store: ModelStore) -> Backend:
    """One backend from its config entry. Imports lazily: nothing loads torch or vLLM
    unless a model of that kind is configured."""
    limits = config.limits
    if isinstance(model, LocalModel):
        path = model.path if model.path is not None else store.resolve(model.name)
        if not (path / "config.json").is_file():
            raise StoreError(f"model {model.name!r}: {path} is not a Hugging Face model directory")
        from models.backends.local import LocalBackend

        return LocalBackend(
            model.name,
            path,
            role=model.role,
            device=model.device,
            dtype=model.dtype,
            max_batch_size=model.max_batch_size,
            queue_size=limits.queue_size,
            context_length=model.context_length,
        )
    if isinstance(model, OpenAIModel):
        from models.backends.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(
            model.name,
            model.url,
            served_model=model.served_model,
            api_key=os.environ.get(model.api_key_env) if model.api_key_env else None,
            role=model.role,
            context_length=model.context_length,
            timeout_s=limits.request_timeout_s,
            connect_timeout_s=limits.connect_timeout_s,
            max_connections=model.max_connections,
        )
    assert isinstance(model, VLLMModel)
    from models.backends.vllm import VLLMBackend

    return VLLMBackend(
        model.name,
        model.path,
        port=model.port,
        gpu_memory_utilization=model.gpu_memory_utilization,
        max_model_len=model.max_model_len,
        role=model.role,
        executable=model.executable,
        extra_args=tuple(model.extra_args),
        startup_timeout_s=model.startup_timeout_s,
    )


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def gateway_of(request: Request) -> Gateway:
    """The gateway, read directly: FastAPI's dependency solving for `GatewayDep` cost ~4%
    of the gateway's CPU per proxied request (py-spy, bench/overhead)."""
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
