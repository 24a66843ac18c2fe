"""A backend that forwards generations to any OpenAI-compatible HTTP server (vLLM,
production-stack, llm-d, KServe, Ray Serve, another distillgate).

Each backend owns one pooled `aiohttp.ClientSession`, opened in `start()`. It is used
directly: httpx over aiohttp's transport (what the openai SDK offers as
`DefaultAioHttpClient`) cost the gateway ~24% of its CPU per proxied request in py-spy's
profile, its request and response models, cookie jar and per-request INFO log on top of
aiohttp's own work; httpx's own transport (httpcore) is slower still (bench/overhead).
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

from collections.abc import AsyncIterator, Mapping

import aiohttp
from yarl import URL

from models.backends.base import (
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
    Role,
    Unavailable,
)
from models.backends.openai_wire import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    StreamState,
    describe_wire_error,
    error_from_response,
    parse_json,
    request_body,
    server_root,
    whole_answer,
)

HEALTH_TIMEOUT_S = 2.0
# Idle connections are dropped before uvicorn's (vLLM's) 5 s keep-alive timeout ends, so
# the server never closes one just as we reuse it.
KEEPALIVE_S = 4.0
# What a failed exchange on the wire can raise: aiohttp's errors and its timeouts.
WIRE_ERRORS = (aiohttp.ClientError, TimeoutError)
# An OpenAI-compatible server honours response_format and calls tools (vLLM needs a tool
# parser for the latter: see VLLMBackend).
SUPPORTS = frozenset({"json_object", "json_schema", "tools"})


def make_session(
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    connect_timeout_s: float = 5.0,
    max_connections: int = 256,
) -> aiohttp.ClientSession:
    """One pooled session, at most `max_connections` connections open at once (requests
    beyond them wait for a free one). `timeout_s` bounds each wait for the server (its
    answer's head, then every read of a stream), not a whole stream."""
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=max_connections, keepalive_timeout=KEEPALIVE_S
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
    # No cookie jar: an API server's cookies mean nothing to the next request.
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers,
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True,
    )  # fmt: skip


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
        # Absolute URLs, parsed once (yarl.URL), not on every request.
        self._urls = {p: URL(self.base_url + p) for p in (CHAT_PATH, COMPLETIONS_PATH)}
        self.served_model = served_model or name
        self._api_key = api_key
        self._role: Role = role
        self._context_length = context_length
        self._limits = (max_connections, timeout_s, connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._running = 0

    async def start(self) -> None:
        if self._session is not None:
            return
        auth = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        headers = {"content-type": "application/json", "accept": "application/json", **auth}
        max_connections, timeout_s, connect_timeout_s = self._limits
        self._session = make_session(
            headers=headers, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
        )  # fmt: skip
        self._context_length = await self._remote_context_length() or self._context_length

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _remote_context_length(self) -> int | None:
        """Best effort: vLLM reports `max_model_len` for each model in /v1/models."""
        try:
            async with self._http().get(self.base_url + "/v1/models", timeout=_SHORT) as response:
                payload = await response.json(content_type=None) if response.status == 200 else {}
            entries = payload.get("data", [])
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
        if self._session is None:
            return False
        return await answers_200(self._session, self.base_url, "/health", "/v1/models")

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
            response = await self._post(path, body)
            try:
                raw = await response.read()
            except WIRE_ERRORS as exc:
                raise self._failure(path, exc) from exc
            finally:
                response.release()
            if response.status >= 400:
                raise error_from_response(self.name, response.status, response.headers, raw)
            data = parse_json(raw, self.name)
            yield whole_answer(
                data, chat=path == CHAT_PATH, logprobs=request.params.logprobs, backend=self.name
            )
        finally:
            self._running -= 1

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = request_body(request, self.served_model, stream=True)
        response: aiohttp.ClientResponse | None = None
        self._running += 1
        try:
            response = await self._post(path, body)
            if response.status >= 400:
                raw = await response.read()
                raise error_from_response(self.name, response.status, response.headers, raw)
            state = StreamState(path == CHAT_PATH, request.params.logprobs, self.name)
            # Read to the end of the body even after [DONE] so the connection is reused.
            # OpenAI-compatible servers send each event as one `data:` line.
            async for raw_line in response.content:
                line = raw_line.decode()
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
                # Read to its end, the connection goes back to the pool; unfinished, it is
                # closed, which frees the remote server's slot.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()

    async def _post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send one POST and read its head."""
        session = self._http()
        try:
            return await session.post(self._urls[path], data=body)
        except WIRE_ERRORS as exc:
            if not stale_connection(exc):
                raise self._failure(path, exc) from exc
        # A kept-alive connection the server closed as we sent: aiohttp retries this
        # only for idempotent methods (RFC 9112 9.3.1); a generation has no side effect
        # to repeat, so try once more, which takes a fresh connection.
        try:
            return await session.post(self._urls[path], data=body)
        except WIRE_ERRORS as exc:
            raise self._failure(path, exc) from exc

    def _failure(self, path: str, exc: BaseException) -> Unavailable:
        what = describe_wire_error(exc, self._limits[1])
        return Unavailable(f"backend {self.name!r} at {self.base_url}{path}: {what}")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise Unavailable(f"backend {self.name!r} is not started")
        return self._session


_SHORT = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)


async def answers_200(session: aiohttp.ClientSession, root: str, *paths: str) -> bool:
    """Whether a short GET of one of `paths` under `root`, tried in order, answers 200."""
    for path in paths:
        try:
            async with session.get(root + path, timeout=_SHORT) as response:
                if response.status == 200:
                    return True
        except WIRE_ERRORS:
            return False
    return False


def stale_connection(exc: BaseException) -> bool:
    """Whether the server dropped the connection before answering (the errors aiohttp
    retries idempotent requests on), not a failure to connect at all."""
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and (
        not isinstance(exc, aiohttp.ClientConnectorError)
    )
