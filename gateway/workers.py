"""`distillgate serve --workers N`: N worker processes on one listening socket, each a whole
gateway (its own backends, router refresh, hot-added students, key rereads, drain on SIGTERM),
started and replaced by the parent; their metrics are merged through files (gateway/multiproc.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import uvicorn

from gateway.admission import GracefulServer, mark_draining
from gateway.config import GatewayConfig, LocalModel, VLLMModel
from gateway.errors import ServiceUnavailable, error_response
from law.cli import CliError

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("distillgate")

# gateway/multiproc.py's ENV; not imported from there: that imports prometheus_client, which
# must not be loaded in a worker before the variable is set
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
READY = "ready-"  # + a worker's pid: a file in the metrics directory once its models are in
HEALTH_EVERY_S = 5  # each worker's model health check for distillgate_model_ready
# spawn, not fork: a fork would copy the parent's threads' locks (the adapt supervisor's) and
# its imported modules; a spawned worker starts clean and sets its metrics mode first
SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its gateway (pickled to it)."""

    config: GatewayConfig
    store: Path
    host: str
    port: int
    log_level: str
    metrics_dir: str
    workers: int


def refusal(config: GatewayConfig, workers: int) -> str | None:
    """Why `workers` processes cannot serve `config`, as one line naming the fix; None if
    they can."""
    if workers == 1:
        return None
    if config.auth.mode == "keys" and config.limits.redis_url is None:
        return (
            f"--workers {workers} with auth.mode: keys counts each key's rate limits in every "
            f"worker alone ({workers} times its rpm/tpm); set limits.redis_url to share them, "
            "or run one worker"
        )
    vllm = [m.name for m in config.models if isinstance(m, VLLMModel)]
    if vllm:
        return (
            f"--workers {workers}: every worker would start its own `vllm serve` for "
            f"{', '.join(vllm)} on the same port; run vLLM on its own and list it with "
            "backend: openai, or run one worker"
        )
    return None


def warning(config: GatewayConfig, workers: int) -> str | None:
    """The cost of `workers` processes worth a line at start, if any."""
    local = [m.name for m in config.models if isinstance(m, LocalModel)]
    if workers == 1 or not (local or config.students.from_store):
        return None
    which = ", ".join(local) if local else "the students from the store"
    return (
        f"--workers {workers}: every worker loads its own copy of {which} (memory "
        f"{workers} times one copy's, and each uses `threads` torch threads)"
    )


def after_exit(code: int, stopping: bool) -> Literal["restart", "fail", "done"]:
    """What the parent does when a worker exits with `code` (negative: the signal that
    killed it)."""
    if stopping:
        return "done"
    if code > 0:  # its models failed to load, or it could not start: a new one would too
        return "fail"
    return "restart"  # killed (the OOM killer, kill -9) or stopped on its own: replace it


def serve_workers(
    config: GatewayConfig, store: Path, settings: Settings, workers: int, adapt: bool
) -> int:
    """Run `workers` gateways on one socket until SIGTERM or SIGINT; 0 after a clean stop,
    1 when a worker failed (its own error line is on stderr)."""
    problem = refusal(config, workers)
    if problem is not None:
        raise CliError(problem)
    cost = warning(config, workers)
    if cost is not None:
        print(f"distillgate: warning: {cost}", file=sys.stderr)
    metrics_dir = tempfile.mkdtemp(prefix="distillgate-metrics-")
    supervisor = None
    try:
        sock = uvicorn.Config("gateway.app:create_app", host=settings.host,
                              port=settings.port).bind_socket()  # fmt: skip
        spec = WorkerSpec(config, store, settings.host, settings.port, settings.log_level,
                          metrics_dir, workers)  # fmt: skip
        pool = Pool(spec, workers, sock)
        if adapt:  # one adaptation loop for the whole server, a child of this process
            from gateway.adapt.supervisor import Supervisor

            child_args = [f"--{k}={v}" for k, v in (("config", settings.config),
                          ("store", store)) if v is not None]  # fmt: skip
            supervisor = Supervisor(child_args)
            supervisor.start()
        return pool.run()
    finally:
        if supervisor is not None:
            supervisor.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class Pool:
    """The parent's side. Not uvicorn's `Multiprocess`, though built from the same parts
    (spawn, a socket bound once): its workers run uvicorn's plain Server (no drain), it has
    no hook where an exited worker's live gauges can be dropped, it keeps the listening
    socket open until it exits (the port never refuses while workers drain), and it
    restarts a worker whose models failed to load."""

    def __init__(self, spec: WorkerSpec, workers: int, sock: socket.socket) -> None:
        self.spec, self.workers, self.sock = spec, workers, sock
        self.procs: list[BaseProcess] = []
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        # Signals are read in this loop, not acted on in a handler: the handler would race
        # the loop's spawning (a worker started after it ran would never hear the signal).
        wake, woken = socket.socketpair()
        for end in (wake, woken):
            end.setblocking(False)
        previous_fd = signal.set_wakeup_fd(woken.fileno())
        previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.procs = [self._spawn() for _ in range(self.workers)]
            log.info("serving with %d workers (pids %s); metrics merged in %s", self.workers,
                     ", ".join(str(p.pid) for p in self.procs), self.spec.metrics_dir)  # fmt: skip
            while self.procs:
                wait([*(p.sentinel for p in self.procs), wake], timeout=1.0)
                with contextlib.suppress(BlockingIOError):
                    for sig in wake.recv(64):  # the wakeup fd carries each signal's number
                        self.forward(sig)
                for proc in [p for p in self.procs if p.exitcode is not None]:
                    self._exited(proc)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for end in (wake, woken, self.sock):
                end.close()
        return 1 if self.failed else 0

    def forward(self, sig: int) -> None:
        """Pass a signal on to every worker: the first drains them (GracefulServer), a
        second skips the drain, a third SIGINT the wait for in-flight requests."""
        self.stopping = True
        self.sock.close()  # ours; the workers close theirs as they stop: then the port refuses
        for proc in self.procs:
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, sig)

    def _spawn(self) -> BaseProcess:
        proc = SPAWN.Process(target=work, args=(self.spec, [self.sock]), name="distillgate-worker")
        proc.start()
        return proc

    def _exited(self, proc: BaseProcess) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        self.procs.remove(proc)
        assert proc.pid is not None and proc.exitcode is not None
        mark_process_dead(proc.pid, self.spec.metrics_dir)  # its live gauges leave the sums
        Path(self.spec.metrics_dir, f"{READY}{proc.pid}").unlink(missing_ok=True)
        action = after_exit(proc.exitcode, self.stopping)
        if action == "restart":
            self.procs.append(new := self._spawn())
            log.warning("worker %s exited with %s; worker %s started in its place",
                        proc.pid, proc.exitcode, new.pid)  # fmt: skip
        elif action == "fail":
            log.error("worker %s exited with %s; stopping the others", proc.pid, proc.exitcode)
            self.failed = True
            self.forward(signal.SIGTERM)


def _ignore(sig: int, frame: FrameType | None) -> None:
    """A handler, so that the signal is not fatal; the wakeup fd tells Pool.run."""


def work(spec: WorkerSpec, sockets: list[socket.socket]) -> None:
    """A worker process: its own gateway, served on the parent's socket until a signal."""
    if "prometheus_client" in sys.modules:  # it has chosen in-memory values already
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
    os.environ[MULTIPROC_ENV] = spec.metrics_dir
    logging.basicConfig(level=spec.log_level.upper(), format=LOG_FORMAT)
    from gateway.app import create_app
    from models.store import ModelStore

    failed: list[str] = []

    def on_failure(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    app = create_app(spec.config, ModelStore(spec.store), on_failure=on_failure)
    readiness = Readiness(Path(spec.metrics_dir), spec.workers)
    server = WorkerServer(
        uvicorn.Config(
            AllReady(app, readiness),
            host=spec.host,
            port=spec.port,
            log_level=spec.log_level,
            access_log=False,
            timeout_graceful_shutdown=spec.config.server.shutdown_timeout_s,
        ),
        app=app,
        readiness=readiness,
        drain_s=spec.config.server.drain_s,
    )
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, re-raised by uvicorn at its end
        server.run(sockets=sockets)
    if failed:
        print(f"distillgate: error: {failed[0]}", file=sys.stderr)
        sys.exit(1)


class WorkerServer(GracefulServer):
    """GracefulServer in a worker. Once a second it writes its scrape-time metrics to its
    files (so a scrape answered by another worker sees them), every HEALTH_EVERY_S it
    checks its models for distillgate_model_ready, and it drains and stops if the parent
    is gone (kill -9: nothing else would stop it)."""

    def __init__(
        self, config: uvicorn.Config, *, app: Any, readiness: Readiness, drain_s: float
    ) -> None:
        super().__init__(config, drain_s=drain_s, on_drain=lambda: mark_draining(app))
        self.app, self.readiness = app, readiness
        self.parent = os.getppid()
        self.checking: asyncio.Task[None] | None = None
        self.publish_failed = False

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # uvicorn ticks every 0.1 s
            self._each_second(counter // 10)
        return await super().on_tick(counter)

    def _each_second(self, second: int) -> None:
        if os.getppid() != self.parent and self.exit_at is None:
            log.error("worker %s: the parent process is gone; stopping", os.getpid())
            self.handle_exit(signal.SIGTERM, None)
        gw = getattr(self.app.state, "gateway", None)
        if gw is None:
            return
        if gw.ready:
            self.readiness.mark()
        try:
            gw.metrics.publish()
        except Exception:  # metrics must never stop the server; say so once
            if not self.publish_failed:
                log.exception("worker %s: could not publish its metrics", os.getpid())
            self.publish_failed = True
        if second % HEALTH_EVERY_S == 0 and (self.checking is None or self.checking.done()):
            self.checking = asyncio.create_task(gw.metrics.check_models(gw.backends, gw.ready))


@dataclass
class Readiness:
    """Which workers have their models in: a file each in the shared directory (removed by
    the parent when that worker exits)."""

    directory: Path
    workers: int
    marked: bool = False

    def mark(self) -> None:
        if not self.marked:
            (self.directory / f"{READY}{os.getpid()}").touch()
            self.marked = True

    def loading(self) -> int:
        return self.workers - len(list(self.directory.glob(f"{READY}*")))


class AllReady:
    """/ready speaks for the whole server: a worker whose models are in answers 503 while
    another is still loading (at start, or a replacement), so that a load balancer does not
    send requests a loading worker would refuse. Before its own models are in, or while
    draining, the gateway's own /ready answers."""

    def __init__(self, app: Any, readiness: Readiness) -> None:
        self.app, self.readiness = app, readiness

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/ready":
            gw = getattr(self.app.state, "gateway", None)
            if gw is not None and gw.ready and not gw.draining:
                self.readiness.mark()
                loading = self.readiness.loading()
                if loading > 0:
                    why = f"Not ready: {loading} of {self.readiness.workers} workers are still "
                    err = ServiceUnavailable(why + "loading their models.", retry_after=5)
                    return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)
