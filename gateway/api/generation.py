"""What chat and completions share: reading a bounded body, checking the sampling
fields, running a backend stream with metrics and cancellation, and SSE framing.

The endpoint modules only translate between OpenAI's shapes and `GenerationRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from gateway.errors import (
    BodyTooLarge,
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    ServiceUnavailable,
    sse_error,
    to_gateway_error,
    validation_error,
)
from gateway.metrics import Metrics
from gateway.protocol import _Sampling
from gateway.routing.router import Route, api_key_of, is_auto
from gateway.state import Gateway
from models.backends.base import (
    Backend,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    """The request body as `model`; 413 past `limit` bytes, 400 naming the bad field."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(_too_large(int(declared), limit))
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge(_too_large(len(body), limit))
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


def _too_large(size: int, limit: int) -> str:
    return f"Request body of {size} bytes exceeds the limit of {limit} bytes."


def sampling(req: _Sampling, gw: Gateway, max_tokens: int | None, param: str) -> SamplingParams:
    """Check what the backends cannot and build SamplingParams. `max_tokens` is the
    effective value (max_completion_tokens wins over max_tokens for chat)."""
    if req.n not in (None, 1):
        raise InvalidRequest(
            f"n={req.n} is not supported: distillgate returns one choice (n=1).", param="n"
        )
    limit = gw.config.limits.max_tokens
    if max_tokens is not None and max_tokens > limit:
        raise InvalidRequest(
            f"{param}={max_tokens} exceeds this gateway's limit of {limit} tokens.", param=param
        )
    return SamplingParams(
        max_tokens=max_tokens or gw.config.limits.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
    )


@dataclass(frozen=True)
class Target:
    """The model a request goes to: the one it names, or the router's choice for auto."""

    backend: Backend
    model: str
    route: Route | None

    @property
    def headers(self) -> dict[str, str]:
        return self.route.headers() if self.route else {"x-distillgate-model": self.model}

    def tracker(self, gw: Gateway, endpoint: str) -> Tracker:
        route, router = self.route, gw.router
        observer = None
        if route is not None and router is not None:

            def observer(outcome: str, ttft: float | None, duration: float, tokens: int) -> None:
                router.observe(route, outcome, ttft, duration, tokens)

        return Tracker(gw.metrics, self.model, endpoint, observer)


def target(gw: Gateway, request: Request, model: str, text: str, max_tokens: int) -> Target:
    """Route `model: "auto"` / `"auto:<class>"`; any other name is served as asked."""
    if not is_auto(model):
        return Target(gw.backend(model), model, None)
    if not gw.ready or gw.router is None:
        reason = gw.failure or "the gateway is still loading its models"
        raise ServiceUnavailable(f"Not ready: {reason}.", retry_after=5)
    key = api_key_of(request.headers.get("authorization"))
    route = gw.router.route(text, model, request.headers, key, max_tokens)
    return Target(gw.backend(route.model), route.model, route)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Observer = Callable[[str, float | None, float, int], None]  # outcome, ttft, duration, tokens


@dataclass
class Tracker:
    """Observes one request: TTFT, inter-token latency, tokens, outcome; `observer` (the
    router's, for routed requests) hears the outcome, TTFT, duration and tokens at the end."""

    metrics: Metrics
    model: str
    endpoint: str
    observer: Observer | None = None
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None
    first: float | None = None
    completion_tokens: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        self.bound = self.metrics.for_model(self.model)
        self.bound.in_flight.inc()

    def chunk(self, chunk: GenerationChunk) -> None:
        t, m = time.perf_counter(), self.bound
        if self.last is None:
            self.first = t - self.start
            m.ttft.observe(self.first)
        elif chunk.text:
            m.itl.observe(t - self.last)
        self.last = t
        if chunk.finish_reason is not None:
            m.prompt_tokens.inc(chunk.prompt_tokens or 0)
            m.completion_tokens.inc(chunk.completion_tokens or 0)
            self.completion_tokens = chunk.completion_tokens or 0
            if chunk.batch_size:
                m.batch_size.observe(chunk.batch_size)

    def done(self, outcome: str, error: GatewayError | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.bound.in_flight.dec()
        duration = time.perf_counter() - self.start
        self.bound.e2e.observe(duration)
        if self.observer is not None:
            self.observer(outcome, self.first, duration, self.completion_tokens)
        self.metrics.requests.labels(self.model, self.endpoint, outcome).inc()
        if error is not None:
            self.metrics.errors.labels(self.model, error.type).inc()
            error.counted = True


def outcome_of(err: GatewayError) -> str:
    return "client_error" if err.status < 500 else "server_error"


@dataclass(frozen=True)
class Job:
    """One generation as the endpoints hand it over. `default_max_tokens` says max_tokens
    was not given, so it may shrink to fit the context instead of failing."""

    backend: Backend
    request: GenerationRequest
    tracker: Tracker
    param: str
    default_max_tokens: bool


async def _open(job: Job) -> tuple[AsyncIterator[GenerationChunk], GenerationChunk]:
    """Start a generation and wait for its first chunk, so that errors raised before any
    output (queue full, prompt too long) become HTTP statuses, not stream events."""
    request = job.request
    for attempt in (1, 2):
        stream = job.backend.generate(request)
        try:
            first = await anext(stream)
            break
        except StopAsyncIteration:
            raise ServiceUnavailable("The backend ended the stream without output.") from None
        except PromptTooLong as exc:
            room = exc.context_length - exc.prompt_tokens
            if attempt == 2 or not job.default_max_tokens or room < 1:
                raise ContextLengthExceeded(str(exc), param=job.param) from None
            params = replace(request.params, max_tokens=room)
            request = replace(request, params=params)
        except BaseException:
            await stream.aclose()
            raise
    job.tracker.chunk(first)
    return stream, first


async def complete(gw: Gateway, job: Job) -> Result:
    """Run a generation to its end and collect the text."""
    timeout = gw.config.limits.request_timeout_s
    tracker = job.tracker
    try:
        async with asyncio.timeout(timeout):
            stream, chunk = await _open(job)
            parts = [chunk.text]
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    tracker.chunk(chunk)
                    parts.append(chunk.text)
    except TimeoutError:
        err = ServiceUnavailable(f"The request did not finish within {timeout:g} s.")
        tracker.done("server_error", err)
        raise err from None
    except asyncio.CancelledError:
        tracker.done("cancelled")
        raise
    except Exception as exc:
        err = to_gateway_error(exc, job.param)
        tracker.done(outcome_of(err), err)
        raise err from None
    tracker.done("success")
    return Result(
        "".join(parts),
        chunk.finish_reason or "stop",
        chunk.prompt_tokens or 0,
        chunk.completion_tokens or 0,
    )


Frame = Callable[[GenerationChunk, bool], list[bytes]]


async def stream_response(
    job: Job, frame: Frame, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """SSE: `frame(chunk, first)` renders each chunk's events; an error after the stream
    has started goes out as an error event, then `[DONE]`."""
    tracker, param = job.tracker, job.param
    try:
        stream, first = await _open(job)
    except asyncio.CancelledError:
        tracker.done("cancelled")
        raise
    except Exception as exc:
        err = to_gateway_error(exc, param)
        tracker.done(outcome_of(err), err)
        raise err from None

    async def events() -> AsyncIterator[bytes]:
        outcome, error = "success", None
        try:
            for event in frame(first, True):
                yield event
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    tracker.chunk(chunk)
                    for event in frame(chunk, False):
                        yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as exc:
            error = to_gateway_error(exc, param)
            outcome = outcome_of(error)
            yield sse_error(error)
        finally:
            tracker.done(outcome, error)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **(headers or {})},
    )  # fmt: skip


def sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling this request's task if the client goes away first (frees
    its backend slot). Starlette does this for streaming responses; a plain response
    needs it by hand. One watcher task, no second task for the work itself."""
    handler = asyncio.current_task()
    assert handler is not None
    finished = False

    def on_disconnect(watcher: asyncio.Task[None]) -> None:
        if not finished and not watcher.cancelled():
            handler.cancel("client disconnected")

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    finally:
        finished = True
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
