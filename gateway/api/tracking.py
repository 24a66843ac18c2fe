"""One request's observation, from its first chunk to its end: the Tracker measures time
to first token, inter-token latency, tokens and the outcome, counts them (and an error,
once) in the metrics, and hands one `Ending` to its listeners (the router's estimates of
routed requests, the traffic log's recorder)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import GatewayError, to_gateway_error
from gateway.metrics import Metrics
from gateway.protocol_out import Usage
from models.backends.base import GenerationChunk

CANCELLED_STATUS = 499  # the client went away (nginx's code; no response was sent)


@dataclass(frozen=True, slots=True)
class Ending:
    """How a request ended. `longest_tokens` is the longest choice's completion (choices
    run side by side, so it is what the duration measured); `text` the first choice's
    answer, when the Tracker was asked to keep it; `finish_reasons` one per choice that
    finished, in choice order; `error` what the client was told, if it failed."""

    outcome: str  # success, client_error, server_error, cancelled
    status: int
    ttft_s: float | None
    duration_s: float
    prompt_tokens: int
    completion_tokens: int
    longest_tokens: int
    text: str | None
    finish_reasons: tuple[str, ...] = ()
    error: GatewayError | None = None


Listener = Callable[[Ending], None]


@dataclass
class Tracker:
    """Observes one request (all its choices); `listeners` hear its Ending, once."""

    metrics: Metrics
    model: str
    endpoint: str
    listeners: tuple[Listener, ...] = ()
    keep_text: bool = False
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: dict[int, float] = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    longest: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # choice index -> finish reason
    finished: bool = False

    def __post_init__(self) -> None:
        self.bound = self.metrics.for_model(self.model)
        self.bound.in_flight.inc()
        self.text: list[str] | None = [] if self.keep_text else None  # the first choice's

    def chunk(self, chunk: GenerationChunk, index: int = 0) -> None:
        t, m = time.perf_counter(), self.bound
        last = self.last.get(index)
        if self.first is None:
            self.first = t - self.start
            m.ttft.observe(self.first)
        elif last is not None and chunk.text:
            m.itl.observe(t - last)
        self.last[index] = t
        if self.text is not None and index == 0:
            self.text.append(chunk.text)
        if chunk.finish_reason is not None:
            self.reasons[index] = chunk.finish_reason
            if self.prompt_tokens is None:  # one prompt, however many choices (as OpenAI)
                self.prompt_tokens = chunk.prompt_tokens or 0
                m.prompt_tokens.inc(self.prompt_tokens)
            tokens = chunk.completion_tokens or 0
            self.completion_tokens += tokens
            self.longest = max(self.longest, tokens)
            m.completion_tokens.inc(tokens)
            if chunk.batch_size:
                m.batch_size.observe(chunk.batch_size)

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens or 0, self.completion_tokens)

    def done(self, outcome: str, error: GatewayError | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.bound.in_flight.dec()
        duration = time.perf_counter() - self.start
        self.bound.e2e.observe(duration)
        self.metrics.requests.labels(self.model, self.endpoint, outcome).inc()
        if error is not None:
            self.metrics.errors.labels(self.model, error.type).inc()
        if not self.listeners:
            return
        status = error.status if error else 200 if outcome == "success" else CANCELLED_STATUS
        ending = Ending(
            outcome, status, self.first, duration, self.prompt_tokens or 0,
            self.completion_tokens, self.longest,
            "".join(self.text) if self.text is not None else None,
            tuple(self.reasons[i] for i in sorted(self.reasons)), error,
        )  # fmt: skip
        for listener in self.listeners:
            listener(ending)

    def fail(self, exc: BaseException, param: str) -> GatewayError:
        """End the request with `exc`, counted; the error the client gets."""
        err = to_gateway_error(exc, param)
        self.done("client_error" if err.status < 500 else "server_error", err)
        return err
