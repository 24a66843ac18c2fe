"""The OpenAI wire format, shared by the backends that speak it (functions, not a base
class): request bodies, whole and streamed answers with their log-probabilities and tool
calls, and the errors a server or the connection to it can give."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import aiohttp
import orjson

from models.backends.base import (
    GenerationChunk,
    GenerationRequest,
    Overloaded,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Unavailable,
    UpstreamError,
)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


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
    return path, orjson.dumps(body)


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
        data = orjson.loads(raw)
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
    """One line, no traceback: what went wrong on the wire (aiohttp's errors)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timed out connecting"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    # aiohttp's parser errors keep a several-line `message`, shown here on one line.
    text = getattr(exc, "message", None) if isinstance(exc, aiohttp.ClientError) else None
    detail = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {text or exc}"
    detail = " ".join(str(detail).split())[:300]
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({detail})"
    dropped = (
        aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
        ConnectionError,
    )  # fmt: skip
    if isinstance(exc, dropped):
        return "the server closed the connection mid-way"
    return f"bad answer on the wire ({detail})"
