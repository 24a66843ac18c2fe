"""A backend that forwards generations to any OpenAI-compatible HTTP server (vLLM,
production-stack, llm-d, KServe, Ray Serve, another distillgate).

Each backend owns one pooled `httpx.AsyncClient`, opened in `start()`, whose transport is
aiohttp's (`httpx_aiohttp.AiohttpTransport`, what the openai SDK offers as
`DefaultAioHttpClient`): httpx's own transport (httpcore) tops out near 500 requests/s at
32 concurrent requests, the aiohttp one near 1,500 on the same machine (bench/overhead).
A non-streaming request is one POST and one JSON parse (the gateway's hot path); a stream
is parsed line by line as it arrives, and its response closed as soon as the consumer
closes the generator, which drops the connection and frees the remote server's slot.
Sampling fields beyond the basic ones (penalties, logit_bias, logprobs) are sent only when
set, so servers that do not know them keep working; log-probabilities come back in
`GenerationChunk.logprobs`. Structured outputs (`response_format`) and tool calling
(`tools`, `tool_choice`, legacy `functions`, tool messages) are passed through as sent, and
the tool calls the server makes come back in `GenerationChunk.tool_calls`, whole or as
stream pieces. Failures become `base.py`'s exceptions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import parsedate_to_datetime

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from models.backends.base import (
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
    Overloaded,
    Role,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Unavailable,
    UpstreamError,
)

HEALTH_TIMEOUT_S = 2.0
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Idle connections are dropped before uvicorn's (vLLM's) 5 s keep-alive timeout ends, so
# the server never closes one just as we reuse it.
KEEPALIVE_S = 4.0
# What a failed exchange on the wire can raise: httpx's errors, into which the transport
# maps most of aiohttp's, and the aiohttp errors it lets through unmapped.
WIRE_ERRORS = (httpx.TransportError, httpx.DecodingError, aiohttp.ClientError)
# An OpenAI-compatible server honours response_format and calls tools (vLLM needs a tool
# parser for the latter: see VLLMBackend).
SUPPORTS = frozenset({"json_object", "json_schema", "tools"})


def make_client(
    base_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    connect_timeout_s: float = 5.0,
    max_connections: int = 256,
) -> httpx.AsyncClient:
    """One pooled async client for `base_url` over aiohttp, at most `max_connections`
    connections open at once (requests beyond them wait for a free one)."""
    # The pool is the transport's, so the limits go to it (AsyncClient ignores its own
    # `limits` when given a transport); aiohttp honours max_connections and
    # keepalive_expiry and keeps every idle connection below that limit.
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_S,
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=AiohttpTransport(limits=limits),
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        headers=headers,
    )


class OpenAIHTTPBackend:
    """Generations served by a remote OpenAI-compatible server at `base_url`."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        served_model: str | None = None,
        api_key: str | None = None,
        role: Role = "student",
        context_length: int = 2048,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 256,
    ) -> None:
        self.name = name
        self.base_url = server_root(base_url)
        # Absolute URLs, parsed once: merging a relative path into base_url costs ~60 us
        # a request in httpx, a tenth of the gateway's whole overhead.
        self._urls = {p: httpx.URL(self.base_url + p) for p in (CHAT_PATH, COMPLETIONS_PATH)}
        self.served_model = served_model or name
        self._api_key = api_key
        self._role: Role = role
        self._context_length = context_length
        self._limits = (max_connections, timeout_s, connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._running = 0

    async def start(self) -> None:
        if self._client is not None:
            return
        auth = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        headers = {"content-type": "application/json", "accept": "application/json", **auth}
        max_connections, timeout_s, connect_timeout_s = self._limits
        self._client = make_client(
            self.base_url, headers=headers, timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s, max_connections=max_connections,
        )  # fmt: skip
        self._context_length = await self._remote_context_length() or self._context_length

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _remote_context_length(self) -> int | None:
        """Best effort: vLLM reports `max_model_len` for each model in /v1/models."""
        try:
            response = await self._http().get("/v1/models", timeout=HEALTH_TIMEOUT_S)
            entries = response.json().get("data", []) if response.status_code == 200 else []
        except (*WIRE_ERRORS, ValueError, AttributeError):
            return None
        mine = [e for e in entries if isinstance(e, dict) and e.get("id") == self.served_model]
        length = mine[0].get("max_model_len") if mine else None
        return length if isinstance(length, int) and length > 0 else None

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.stream:
            return self._stream(request)
        return self._complete(request)

    async def health(self) -> bool:
        if self._client is None:
            return False
        return await answers_200(self._client, "/health", "/v1/models")

    def card(self) -> ModelCard:
        return ModelCard(
            name=self.name,
            backend="openai",
            role=self._role,
            context_length=self._context_length,
            extra={"url": self.base_url, "served_model": self.served_model},
            supports=SUPPORTS,
        )

    def load(self) -> Load:
        return Load(waiting=0, running=self._running)

    async def _complete(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = request_body(request, self.served_model, stream=False)
        self._running += 1
        try:
            response = await self._post(path, body, stream=False)
            if response.status_code >= 400:
                raise error_from_response(
                    self.name, response.status_code, response.headers, response.content
                )
            data = parse_json(response.content, self.name)
            yield whole_answer(
                data, chat=path == CHAT_PATH, logprobs=request.params.logprobs, backend=self.name
            )
        finally:
            self._running -= 1

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = request_body(request, self.served_model, stream=True)
        response: httpx.Response | None = None
        self._running += 1
        try:
            response = await self._post(path, body, stream=True)
            if response.status_code >= 400:
                raw = await response.aread()
                raise error_from_response(self.name, response.status_code, response.headers, raw)
            state = StreamState(path == CHAT_PATH, request.params.logprobs, self.name)
            # Read to the end of the body even after [DONE] so the connection is reused.
            # OpenAI-compatible servers send each event as one `data:` line.
            async for line in response.aiter_lines():
                if state.done or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    state.done = True
                elif (text := state.feed(parse_json(data.encode(), self.name))) or state.calls:
                    yield GenerationChunk(
                        text, logprobs=state.take(), tool_calls=state.take_calls()
                    )
            yield state.final(self.name, self.base_url + path)
        except WIRE_ERRORS as exc:
            raise self._failure(path, exc) from exc
        finally:
            self._running -= 1
            if response is not None:
                # What `client.stream()` does on exit; unfinished, the response drops its
                # connection, which frees the remote server's slot.
                await response.aclose()

    async def _post(self, path: str, body: bytes, *, stream: bool) -> httpx.Response:
        """Send one POST and read its head (and, unless `stream`, its whole body)."""
        client = self._http()
        request = client.build_request("POST", self._urls[path], content=body)
        try:
            return await client.send(request, stream=stream)
        except WIRE_ERRORS as exc:
            if not stale_connection(exc):
                raise self._failure(path, exc) from exc
        # A kept-alive connection the server closed as we sent: aiohttp retries this
        # only for idempotent methods (RFC 9112 9.3.1); a generation has no side effect
        # to repeat, so try once more, which takes a fresh connection.
        try:
            return await client.send(request, stream=stream)
        except WIRE_ERRORS as exc:
            raise self._failure(path, exc) from exc

    def _failure(self, path: str, exc: BaseException) -> Unavailable:
        what = describe_wire_error(exc, self._limits[1])
        return Unavailable(f"backend {self.name!r} at {self.base_url}{path}: {what}")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise Unavailable(f"backend {self.name!r} is not started")
        return self._client


async def answers_200(client: httpx.AsyncClient, *paths: str) -> bool:
    """Whether a short GET of one of `paths`, tried in order, answers 200."""
    for path in paths:
        try:
            response = await client.get(path, timeout=HEALTH_TIMEOUT_S)
        except WIRE_ERRORS:
            return False
        if response.status_code == 200:
            return True
    return False


def stale_connection(exc: BaseException) -> bool:
    """Whether the server dropped the connection before answering (the errors aiohttp
    retries idempotent requests on), not a failure to connect at all."""
    cause = wire_cause(exc)
    return isinstance(cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and (
        not isinstance(cause, aiohttp.ClientConnectorError)
    )


# -- helpers shared with other backends (functions, not a base class) -------------------


def server_root(base_url: str) -> str:
    """`http://h:p`, `http://h:p/`, `http://h:p/v1` and `http://h:p/v1/` -> `http://h:p`."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def request_body(request: GenerationRequest, model: str, *, stream: bool) -> tuple[str, bytes]:
    """The endpoint path and the JSON body an OpenAI server expects for `request`."""
    params, chat = request.params, request.messages is not None
    key, value = ("messages", list(request.messages or ())) if chat else ("prompt", request.prompt)
    body = {"model": model, key: value, "max_tokens": params.max_tokens}
    body.update(temperature=params.temperature, top_p=params.top_p)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    body.update(optional_fields(params, chat=chat))
    if params.response_format is not None and chat:
        body["response_format"] = params.response_format.openai()
    if request.tools is not None:
        body.update(request.tools.openai())
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    path = CHAT_PATH if chat else COMPLETIONS_PATH
    return path, json.dumps(body, separators=(",", ":")).encode()


def optional_fields(params: SamplingParams, *, chat: bool) -> dict:
    """The sampling fields that are set, as OpenAI names them; neutral ones are left out."""
    fields: dict = {}
    if params.presence_penalty:
        fields["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        fields["frequency_penalty"] = params.frequency_penalty
    if params.logit_bias:
        fields["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    if params.logprobs and chat:
        fields["logprobs"] = True
        if params.top_logprobs:
            fields["top_logprobs"] = params.top_logprobs
    elif params.logprobs:  # legacy completions: logprobs is the number of alternatives
        fields["logprobs"] = params.top_logprobs
    return fields


def parse_json(raw: bytes, backend: str) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        message = f"backend {backend!r} answered with invalid JSON: {raw[:200]!r}"
        raise UpstreamError(502, message) from None
    if not isinstance(data, dict):
        raise UpstreamError(502, f"backend {backend!r} answered with a JSON {type(data).__name__}")
    return data


def final_chunk(
    text: str,
    reason: object,
    usage: dict,
    logprobs: tuple[TokenLogprob, ...] | None = None,
    tool_calls: tuple[ToolCall, ...] | None = None,
) -> GenerationChunk:
    """The last chunk. Reasons we do not know (content_filter, ...) count as a stop."""
    known = ("length", "tool_calls", "function_call")
    finish = reason if isinstance(reason, str) and reason in known else "stop"
    return GenerationChunk(
        text, finish, usage.get("prompt_tokens"), usage.get("completion_tokens"),
        logprobs=logprobs, tool_calls=tool_calls,
    )  # fmt: skip


def whole_answer(
    data: dict, *, chat: bool, logprobs: bool = False, backend: str = "remote"
) -> GenerationChunk:
    """The one chunk of a non-streaming answer: whole text, finish reason, usage, and the
    log-probabilities when they were asked for."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if chat else choice.get("text")
    tokens = tuple(parse_logprobs(choice, chat=chat, backend=backend)) if logprobs else None
    calls = tuple(parse_tool_calls(message, backend)) if chat else ()
    usage = data.get("usage") or {}
    return final_chunk(text or "", choice.get("finish_reason"), usage, tokens, calls or None)


def parse_tool_calls(message: dict, backend: str) -> list[ToolCall]:
    """The tool calls of a message or a stream delta (`tool_calls[]`, legacy
    `function_call`); a piece of a streamed call may lack id, name or arguments."""
    found = message.get("tool_calls"), message.get("function_call")
    try:
        calls = [_call(c, c.get("index", i), c.get("id")) for i, c in enumerate(found[0] or ())]
        if found[1]:
            calls.append(dataclasses.replace(_call(found[1], 0, None), legacy=True))
    except (AttributeError, TypeError, ValueError) as exc:
        message = f"backend {backend!r} answered with malformed tool calls: {found!r:.200} ({exc})"
        raise UpstreamError(502, message) from None
    return calls


def _call(entry: dict, index: object, id: object) -> ToolCall:
    function = entry.get("function", entry)  # a legacy function_call is the function itself
    name, arguments = function.get("name"), function.get("arguments") or ""
    if not isinstance(arguments, str) or not isinstance(name, str | None):
        raise TypeError("name and arguments must be strings")
    return ToolCall(int(index), None if id is None else str(id), name, arguments)


def parse_logprobs(choice: dict, *, chat: bool, backend: str) -> list[TokenLogprob]:
    """A choice's log-probabilities: chat's `logprobs.content[]` or the completions
    `logprobs.tokens / token_logprobs / top_logprobs` lists. None or absent: no tokens."""
    found = choice.get("logprobs")
    try:
        if not found:
            return []
        if chat:
            return [TokenLogprob(str(e["token"]), _logprob(e["logprob"]),
                                 tuple((str(t["token"]), _logprob(t["logprob"]))
                                       for t in e.get("top_logprobs") or ()))
                    for e in found.get("content") or ()]  # fmt: skip
        tokens, values = found.get("tokens") or [], found.get("token_logprobs") or []
        tops = found.get("top_logprobs") or [None] * len(tokens)
        return [TokenLogprob(str(token), _logprob(value),
                             tuple((str(t), _logprob(v)) for t, v in (top or {}).items()))
                for token, value, top in zip(tokens, values, tops, strict=True)]  # fmt: skip
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        message = f"backend {backend!r} answered with malformed logprobs: {found!r:.200} ({exc})"
        raise UpstreamError(502, message) from None


def _logprob(value: float | str | None) -> float:
    """A remote's log-probability; null (vLLM's for a token it cannot score) is OpenAI's
    -9999.0, the value it uses for "very unlikely"."""
    return -9999.0 if value is None else float(value)


@dataclasses.dataclass
class StreamState:
    """What a stream has said so far that the final chunk needs, and the tokens' log-
    probabilities not yet handed on (a token whose text is empty waits for the next)."""

    chat: bool
    logprobs: bool = False
    backend: str = "remote"
    finish: str | None = None
    usage: dict = dataclasses.field(default_factory=dict)
    done: bool = False
    pending: list[TokenLogprob] = dataclasses.field(default_factory=list)
    calls: list[ToolCall] = dataclasses.field(default_factory=list)  # pieces not yet sent

    def feed(self, event: dict) -> str:
        """Take one SSE event; return its text delta. An error event raises."""
        if "error" in event:
            raise upstream_error(500, error_fields(event))
        self.usage = event.get("usage") or self.usage
        choice = (event.get("choices") or [{}])[0]
        self.finish = choice.get("finish_reason") or self.finish
        if self.logprobs:
            self.pending += parse_logprobs(choice, chat=self.chat, backend=self.backend)
        delta = choice.get("delta") or {}
        if self.chat:
            self.calls += parse_tool_calls(delta, self.backend)
        text = delta.get("content") if self.chat else choice.get("text")
        return text or ""

    def take_calls(self) -> tuple[ToolCall, ...] | None:
        """The tool-call pieces since the last chunk (None when there are none)."""
        taken, self.calls = tuple(self.calls), []
        return taken or None

    def take(self) -> tuple[TokenLogprob, ...] | None:
        """The log-probabilities since the last chunk (None when not asked for)."""
        if not self.logprobs:
            return None
        taken, self.pending = tuple(self.pending), []
        return taken

    def final(self, backend: str, url: str) -> GenerationChunk:
        """The last chunk; a stream cut before `[DONE]` and a finish reason is a failure."""
        if not self.done and self.finish is None:
            raise Unavailable(f"backend {backend!r} at {url}: the stream ended before the answer")
        return final_chunk("", self.finish, self.usage, self.take(), self.take_calls())


def error_from_response(
    backend: str, status: int, headers: Mapping[str, str], raw: bytes
) -> Overloaded | UpstreamError:
    """Map a remote error answer: 429/503 -> Overloaded, the rest -> UpstreamError."""
    try:
        fields = error_fields(json.loads(raw))
    except ValueError:  # not JSON: the body's text is the message
        fields = {"message": raw[:500].decode("utf-8", "replace").strip()}
    if status in (429, 503):
        return Overloaded(
            str(fields.get("message") or f"backend {backend!r} is overloaded (HTTP {status})"),
            retry_after=retry_after(headers.get("retry-after")),
        )
    return upstream_error(status, fields)


def upstream_error(status: int, fields: dict) -> UpstreamError:
    """An UpstreamError from the fields of an error envelope."""
    code = fields.get("code")
    if isinstance(code, int) and 400 <= code <= 599 and status == 500:
        status = code  # a mid-stream error event carries its status as the code (vLLM)
    return UpstreamError(
        status,
        str(fields.get("message") or f"upstream error (HTTP {status})"),
        type=str(fields.get("type") or "upstream_error"),
        param=None if fields.get("param") is None else str(fields["param"]),
        code=None if code is None else str(code),
    )


def error_fields(payload: object) -> dict:
    """The fields of OpenAI's error envelope (or of vLLM's flat or FastAPI's detail shape)."""
    inner = payload.get("error", payload.get("detail")) if isinstance(payload, dict) else None
    if isinstance(inner, dict):
        return inner
    if inner is not None or not isinstance(payload, dict):
        return {"message": inner if isinstance(inner, str) else json.dumps(payload)[:500]}
    return payload


def retry_after(header: str | None, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    try:
        seconds = float(header) if header else default
    except ValueError:
        try:
            seconds = parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return max(0.0, seconds) if math.isfinite(seconds) else default


def describe_wire_error(exc: BaseException, timeout_s: float) -> str:
    """One line, no traceback: what went wrong on the wire. The aiohttp transport raises
    httpx errors `from` aiohttp's own, which say more (it maps a connection the server
    dropped to httpx.ConnectTimeout), so the cause is read first."""
    cause = wire_cause(exc)
    if isinstance(cause, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout):
        return "timed out connecting"
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    # aiohttp's parser errors keep a several-line `message`, shown here on one line.
    text = getattr(cause, "message", None) if isinstance(cause, aiohttp.ClientError) else None
    detail = getattr(cause, "strerror", None) or f"{type(cause).__name__}: {text or cause}"
    detail = " ".join(str(detail).split())[:300]
    if isinstance(cause, aiohttp.ClientConnectorError | httpx.ConnectError):
        return f"cannot connect ({detail})"
    dropped = (
        aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
        httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, ConnectionError,
    )  # fmt: skip
    if isinstance(cause, dropped):
        return "the server closed the connection mid-way"
    return f"bad answer on the wire ({detail})"


def wire_cause(exc: BaseException) -> BaseException:
    """The aiohttp error behind an httpx error the transport mapped, else `exc` itself."""
    cause = exc.__cause__
    return cause if isinstance(exc, httpx.HTTPError) and cause is not None else exc
