"""What chat and completions share: reading a bounded body, checking the sampling
fields, running a request's n generations with metrics, timeouts and cancellation, and
answering it, as one JSON body or as SSE events.

The endpoint modules only translate between OpenAI's shapes and `GenerationRequest`, and
hand a `Render` to `run`. Once a request has reached a model, `run` owns it: its Tracker
(gateway/api/tracking.py) counts the outcome (and an error, once) and `run` answers it,
so no error of a tracked request reaches the app's exception handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from gateway.api.tracking import Listener, Tracker
from gateway.auth import admit, caller_of
from gateway.errors import (
    BodyTooLarge,
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    ServiceUnavailable,
    TimedOut,
    UpstreamFailure,
    error_response,
    sse_error,
    validation_error,
)
from gateway.protocol import _Sampling
from gateway.protocol_out import Usage
from gateway.routing.router import Route, api_key_of, is_auto
from gateway.state import Gateway
from models.backends.base import (
    Backend,
    GenerationChunk,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
    TokenLogprob,
    ToolCall,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Stream = AsyncIterator[GenerationChunk]


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
    limits = gw.config.limits
    # n generations wait for backend slots together: more than the queue holds never fits.
    if req.choices() > limits.queue_size:
        raise InvalidRequest(
            f"n={req.choices()} exceeds this gateway's limit of {limits.queue_size} "
            "choices per request (limits.queue_size).",
            param="n",
        )
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"{param}={max_tokens} exceeds this gateway's limit of {limits.max_tokens} tokens.",
            param=param,
        )
    logprobs, top_logprobs = req.wanted_logprobs()
    return SamplingParams(
        max_tokens=max_tokens or limits.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=req.bias(),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def fan_out(request: GenerationRequest, n: int) -> tuple[GenerationRequest, ...]:
    """n generations for OpenAI's `n`: with a seed, choice i samples with seed + i, so the
    choices differ yet the whole answer is reproducible."""
    if n == 1:
        return (request,)
    seed = request.params.seed
    return tuple(
        replace(
            request,
            request_id=f"{request.request_id}-{i}",
            params=request.params if seed is None else replace(request.params, seed=seed + i),
        )
        for i in range(n)
    )


@dataclass(frozen=True)
class Target:
    """The model a request goes to: the one it names, or the router's choice for auto."""

    backend: Backend
    model: str
    route: Route | None
    requested: str

    @property
    def headers(self) -> dict[str, str]:
        return self.route.headers() if self.route else {"x-distillgate-model": self.model}

    def tracker(self, gw: Gateway, endpoint: str, request: Request, job: Job) -> Tracker:
        """The request's Tracker, with its listeners: the router learns from routed
        requests; the traffic log records every one; the tracer's span ends with it."""
        route, router, recorder = self.route, gw.router, gw.recorder
        listeners: list[Listener] = []
        if route is not None and router is not None:
            listeners.append(functools.partial(router.observe, route))
        if router is not None:  # every ending, routed or not, feeds the model's breaker
            listeners.append(functools.partial(router.feed, self.model))
        keep_text = False
        if recorder is not None:
            config = gw.config.model(self.model)
            tag = recorder.tag(
                job.requests[0], endpoint=endpoint, requested=self.requested, model=self.model,
                role=config.role if config else "student", route=route, router=router,
                headers=request.headers, caller=_caller(request),
            )  # fmt: skip
            listeners.append(functools.partial(recorder.finish, tag))
            keep_text = tag.keeps_text
        if gw.tracer is not None:  # last, so a tracing fault cannot keep the others deaf
            listeners.append(gw.tracer.begin(endpoint, self, job, request.headers))
        return Tracker(gw.metrics, self.model, endpoint, tuple(listeners), keep_text)


def _caller(request: Request) -> tuple[str, str | None] | None:
    caller = caller_of(request)
    return (caller.name, caller.slo_class) if caller else None


def target(
    gw: Gateway, request: Request, model: str, text: str, max_tokens: int,
    needs: frozenset[str] = frozenset(),
) -> Target:  # fmt: skip
    """Route `model: "auto"` / `"auto:<class>"` among the models that support `needs`
    (structured outputs, tool calling); any other name is served as asked."""
    if not is_auto(model):
        return Target(gw.backend(model), model, None, model)
    if not gw.ready or gw.router is None:
        reason = gw.failure or "the gateway is still loading its models"
        raise ServiceUnavailable(f"Not ready: {reason}.", retry_after=5)
    # The policy's api_keys name keys (the bearer token itself with auth.mode none); a
    # key's own class, set by `keys create --class`, wins over the policy's.
    caller = caller_of(request)
    key = caller.name if caller else api_key_of(request.headers.get("authorization"))
    key_class = caller.slo_class if caller else None
    route = gw.router.route(
        text, model, request.headers, key, max_tokens, key_class=key_class, needs=needs
    )
    return Target(gw.backend(route.model), route.model, route, model)


@dataclass
class Result:
    """One choice, whole. `logprobs` is None when the backend sent none; `tool_calls`
    holds the pieces of the tool calls it made, in order (None: none)."""

    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    tool_calls: list[ToolCall] | None = None


class Render(Protocol):
    """An endpoint's OpenAI shapes: the whole answer, and its stream events."""

    include_usage: bool

    def body(self, results: Sequence[Result], usage: Usage) -> BaseModel: ...
    def chunk(self, index: int, chunk: GenerationChunk, first: bool) -> list[bytes]: ...
    def usage(self, usage: Usage) -> bytes: ...


@dataclass(frozen=True)
class Job:
    """A request's generations (one per choice) as the endpoints hand them over.
    `default_max_tokens` says max_tokens was not given, so it may shrink to fit the
    context instead of failing; `param` is the field a too-long prompt is blamed on."""

    backend: Backend
    requests: tuple[GenerationRequest, ...]
    param: str
    default_max_tokens: bool
    stream: bool


async def run(
    request: Request, gw: Gateway, to: Target, endpoint: str, job: Job, render: Render
) -> Response:
    """Serve `job` on `to` and answer: JSON, or SSE when it streams. A routed request
    whose model fails before the first token is served once more, by the next-best model
    of its routing decision (`_failover`); the failed attempt is counted as that model's."""
    settle = await admit(request, job.requests)  # the key's rpm/tpm (gateway/auth.py): 429
    tracker = to.tracker(gw, endpoint, request, job)
    if settle is not None:  # corrects the tokens reserved to those used
        tracker.listeners += (settle,)
    try:
        if job.stream:
            return await _stream(gw, job, tracker, render, to.headers)
        results = await cancel_on_disconnect(request, _complete(gw, job, tracker))
    except ClientGone:  # nobody to answer: nginx's 499, sent nowhere, not logged as an error
        tracker.done("cancelled")
        return Response(status_code=499)
    except asyncio.CancelledError:
        tracker.done("cancelled")
        raise
    except Exception as exc:
        err = tracker.fail(exc, job.param)
        retry = _failover(gw, to, tracker, err)
        if retry is None:
            return error_response(err, to.headers)
        job = replace(job, backend=retry.backend)
        return await run(request, gw, retry, endpoint, job, _answering_as(render, retry.model))
    tracker.done("success")
    body = render.body(results, tracker.usage())
    return Response(body.model_dump_json(), media_type="application/json", headers=to.headers)


def _failover(gw: Gateway, to: Target, tracker: Tracker, err: GatewayError) -> Target | None:
    """Where a failed routed request goes next, or None: only once, only for `auto`, only
    before any token (after it a stream has begun, and an answer is not started twice), only
    for failures of the model (`failover_reason`), and only to a model whose circuit lets
    the request through."""
    route, router = to.route, gw.router
    if route is None or router is None or route.failed_over is not None:
        return None
    reason = failover_reason(err)
    if reason is None or tracker.first is not None or not gw.config.failover.retry:
        return None
    retry = router.failover(route)
    backend = gw.backends.get(retry.model) if retry is not None else None
    if retry is None or backend is None:
        return None
    gw.metrics.failovers.labels(to.model, retry.model, reason).inc()
    return Target(backend, retry.model, retry, to.requested)


def failover_reason(err: GatewayError) -> str | None:
    """The failovers_total reason of an error that another model may do better on, or None:
    a 4xx is the request's own fault (or, 429, a full queue: the model is alive), and the
    gateway's own timeouts have spent the time the client gave the request."""
    if err.status < 500 or isinstance(err, TimedOut):
        return None
    if isinstance(err, UpstreamFailure):
        return "upstream_error"
    return "unavailable" if isinstance(err, ServiceUnavailable) else "server_error"


def _answering_as(render: Render, model: str) -> Render:
    """`render` naming `model` in its bodies (chat's and completions' renders are frozen
    dataclasses with a `model` field; any other is kept as it is)."""
    if is_dataclass(render) and any(f.name == "model" for f in fields(render)):
        return replace(render, model=model)  # type: ignore[type-var]
    return render


async def _open(
    job: Job, request: GenerationRequest, idle: float | None, tracker: Tracker, index: int
) -> tuple[Stream, GenerationChunk]:
    """Start choice `index`'s generation and wait for its first chunk (its arrival is the
    time to first token), so that errors raised before any output (queue full, prompt too
    long) become HTTP statuses, not stream events."""
    for attempt in (1, 2):
        stream = job.backend.generate(request)
        try:
            first = await _next(stream, idle)
            if first is None:
                raise ServiceUnavailable("The backend ended the stream without output.")
            tracker.chunk(first, index)
            return stream, first
        except PromptTooLong as exc:
            room = exc.context_length - exc.prompt_tokens
            if attempt == 2 or not job.default_max_tokens or room < 1:
                raise ContextLengthExceeded(str(exc), param=job.param) from None
            request = replace(request, params=replace(request.params, max_tokens=room))
        except BaseException:
            await stream.aclose()
            raise
    raise AssertionError("unreachable")


async def _next(stream: Stream, idle: float | None) -> GenerationChunk | None:
    """The stream's next chunk, None at its end; TimedOut after `idle` seconds without one
    (cancelling the wait cancels the backend's generation, which frees its slot)."""
    if idle is None:  # a whole answer: limits.request_timeout_s bounds it (`_complete`)
        return await anext(stream, None)
    try:
        async with asyncio.timeout(idle):
            return await anext(stream)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise TimedOut(
            f"The model sent no token for {idle:g} s (limits.stream_idle_timeout_s="
            f"{idle:g}); the stream was ended."
        ) from None


async def _together(works: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run side by side; the first failure cancels the others (freeing their backend
    slots) and is raised."""
    if len(works) == 1:
        return [await works[0]]
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _complete(gw: Gateway, job: Job, tracker: Tracker) -> list[Result]:
    """Run every choice to its end and collect the text, within limits.request_timeout_s."""
    timeout = gw.config.limits.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await _together(
                [_collect(job, r, i, tracker) for i, r in enumerate(job.requests)]
            )
    except TimeoutError:
        raise TimedOut(
            f"The request did not finish within {timeout:g} s (limits.request_timeout_s)."
        ) from None


async def _collect(job: Job, request: GenerationRequest, index: int, tracker: Tracker) -> Result:
    stream, chunk = await _open(job, request, None, tracker, index)
    parts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    calls: list[ToolCall] | None = None
    async with contextlib.aclosing(stream):
        while True:
            parts.append(chunk.text)
            if chunk.logprobs is not None:
                logprobs = logprobs or []
                logprobs.extend(chunk.logprobs)
            if chunk.tool_calls:
                calls = [*(calls or ()), *chunk.tool_calls]
            following = await anext(stream, None)
            if following is None:
                reason = chunk.finish_reason or "stop"
                return Result("".join(parts), reason, logprobs, calls)
            tracker.chunk(following, index)
            chunk = following


async def _stream(
    gw: Gateway, job: Job, tracker: Tracker, render: Render, headers: dict[str, str]
) -> Response:
    """SSE once every choice has its first chunk (an error before that is an HTTP status);
    an error after that goes out as an error event, then `[DONE]`."""
    idle = gw.config.limits.stream_idle_timeout_s
    opened = await _open_all(job, idle, tracker)  # its errors are run's (and may fail over)
    events = _events(opened, idle, tracker, render, job.param)
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
    )


async def _open_all(
    job: Job, idle: float, tracker: Tracker
) -> list[tuple[Stream, GenerationChunk]]:
    """Every choice's stream with its first chunk; if one fails, the others are closed."""
    if len(job.requests) == 1:
        return [await _open(job, job.requests[0], idle, tracker, 0)]
    tasks = [
        asyncio.ensure_future(_open(job, r, idle, tracker, i)) for i, r in enumerate(job.requests)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(res, tuple):
                await res[0].aclose()
        raise


async def _events(
    opened: list[tuple[Stream, GenerationChunk]],
    idle: float,
    tracker: Tracker,
    render: Render,
    param: str,
) -> AsyncIterator[bytes]:
    rest = _rest([s for s, _ in opened], idle)
    try:
        for i, (_, first) in enumerate(opened):
            for event in render.chunk(i, first, True):
                yield event
        async for i, chunk in rest:
            tracker.chunk(chunk, i)
            for event in render.chunk(i, chunk, False):
                yield event
        if render.include_usage:
            yield render.usage(tracker.usage())
        tracker.done("success")
    except Exception as exc:
        yield sse_error(tracker.fail(exc, param))
    finally:
        tracker.done("cancelled")  # a no-op unless the client went away
        await rest.aclose()  # stops the pumps of n > 1 before their streams are closed
        for stream, _ in opened:
            await stream.aclose()
    yield b"data: [DONE]\n\n"


async def _rest(streams: list[Stream], idle: float) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Every choice's chunks after its first, as (choice index, chunk) in arrival order."""
    if len(streams) == 1:
        while (chunk := await _next(streams[0], idle)) is not None:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            while (chunk := await _next(stream, idle)) is not None:
                queue.put_nowait((i, chunk))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            await stream.aclose()

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):  # until every choice has ended
            while True:
                i, item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield i, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


class ClientGone(Exception):
    """The client went away before its answer; its work was cancelled."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling this request's task if the client goes away first (frees
    its backend slot), then raise ClientGone. Starlette does this for streaming
    responses; a plain response needs it by hand. One watcher task, no second task for
    the work itself."""
    handler = asyncio.current_task()
    assert handler is not None
    finished = gone = False

    def on_disconnect(watcher: asyncio.Task[None]) -> None:
        nonlocal gone
        if not finished and not watcher.cancelled():
            gone = True
            handler.cancel("client disconnected")

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        # our own cancel, and no other pending (a server shutting down cancels too)
        if gone and handler.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        finished = True
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
