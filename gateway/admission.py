"""What the gateway lets in. `Admission`, a pure ASGI middleware outside the app, answers
generation requests beyond the gateway's capacity with a 429 before any work is done for
them; `GracefulServer` is uvicorn's server with a drain on SIGTERM (see `Server` config).

Why a middleware: a request the backend's queue refuses has already had its body read,
parsed and validated, been routed and tokenized, and waited its turn on the event loop
behind the admitted requests' own such work; under a burst that took seconds. Here a
refusal costs one counter comparison and two prepared messages. The backends' queue
check stays as the second line (one model full while the others have room)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from gateway.config import GatewayConfig, LocalModel, slots_of
from gateway.errors import RateLimited, error_body

log = logging.getLogger("distillgate")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The endpoints that reach a model; everything else (health, models, metrics) is cheap.
GATED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
RETRY_AFTER_S = 1.0  # about one batch step of a local model: a slot frees up soon


def capacity_of(config: GatewayConfig) -> int:
    """How many generation requests may be in the gateway at once: `server.max_in_flight`,
    else what the models hold: a local model `limits.queue_size` (its backend refuses past
    that many waiting, and a burst arrives before its worker has moved any into a batch),
    a remote one its connections plus `limits.queue_size` waiting for one."""
    if config.server.max_in_flight is not None:
        return config.server.max_in_flight
    queue = config.limits.queue_size
    return sum(queue if isinstance(m, LocalModel) else slots_of(m) + queue for m in config.models)


@dataclass(frozen=True)
class Refusal:
    """The 429 for one capacity, as the two ASGI messages that send it, built once."""

    start: dict[str, Any]
    body: dict[str, Any]


def refusal(capacity: int) -> Refusal:
    err = RateLimited(
        f"The gateway is at capacity: {capacity} requests are being served or waiting "
        "(server.max_in_flight); retry later.",
        retry_after=RETRY_AFTER_S,
    )
    body = json.dumps(error_body(err)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, math.ceil(RETRY_AFTER_S))).encode()),
    ]
    return Refusal(
        {"type": "http.response.start", "status": err.status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class Admission:
    """Counts generation requests admitted and not finished (a stream until its last
    event); past the capacity it answers 429 without reading the body. The gateway is the
    app's (`app.state.gateway`, built in its lifespan); before it exists nothing is gated."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self._gateway: object | None = None
        self._config: GatewayConfig | None = None
        self._capacity = 0
        self._refusal: Refusal | None = None
        self._count: Callable[[], None] = lambda: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GATED or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        gw = getattr(scope["app"].state, "gateway", None)
        if gw is None:
            return await self.app(scope, receive, send)
        if gw is not self._gateway or gw.config is not self._config:
            self._bind(gw)  # a new gateway, or its config replaced (a student hot-added)
        if self.in_flight >= self._capacity:
            self._count()
            assert self._refusal is not None
            await send(self._refusal.start)
            await send(self._refusal.body)
            return
        self.in_flight += 1
        try:
            # Refusals of the same burst are queued on the event loop behind this task:
            # let them go first, before this request's parsing, routing and tokenizing.
            await asyncio.sleep(0)
            await self.app(scope, receive, _closing(send) if gw.draining else send)
        finally:
            self.in_flight -= 1

    def _bind(self, gw: Any) -> None:
        first = gw is not self._gateway
        self._gateway, self._config = gw, gw.config
        capacity = capacity_of(gw.config)
        if capacity != self._capacity:
            self._capacity, self._refusal = capacity, refusal(capacity)
        metrics = gw.metrics
        metrics.admission_capacity.set(capacity)
        if first:
            metrics.admitted.set_function(lambda: self.in_flight)
            rejected = metrics.rejected.labels("capacity")
            errors = metrics.errors

            def count() -> None:
                rejected.inc()
                # bound at the first refusal, not here: a zero series would claim a
                # rate-limit error type before any happened
                errors.labels("", RateLimited.type).inc()

            self._count = count


def _closing(send: Send) -> Send:
    """`send`, with `connection: close` on the response: while draining, a client's next
    request goes to a new connection (and so to another replica)."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await send(message)

    return closing


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT: `on_drain()` (the gateway
    marks itself draining: /ready answers 503), `drain_s` more of serving, then uvicorn's
    own shutdown (port closed, in-flight requests get `timeout_graceful_shutdown`). A
    second signal skips the rest of the drain, a third SIGINT skips the wait. After a
    SIGTERM the process exits 0 (uvicorn re-raises the signal, which would kill it)."""

    def __init__(
        self, config: uvicorn.Config, *, drain_s: float, on_drain: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self.on_drain = on_drain
        self.exit_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exit_at is not None:  # already draining: stop waiting
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.exit_at = time.monotonic() + self.drain_s
        self.on_drain()
        log.info(
            "%s: draining for %g s, then finishing in-flight requests (at most %g s)",
            signal.Signals(sig).name, self.drain_s, self.config.timeout_graceful_shutdown,
        )  # fmt: skip
        if sig != signal.SIGTERM:
            self._captured_signals.append(sig)  # Ctrl+C ends as uvicorn ends it

    async def on_tick(self, counter: int) -> bool:
        if self.exit_at is not None and time.monotonic() >= self.exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def mark_draining(app: Any) -> None:
    """`GracefulServer`'s `on_drain` for the gateway's app (called in a signal handler:
    it only sets a flag)."""
    gw = getattr(app.state, "gateway", None)
    if gw is not None:
        gw.draining = True
