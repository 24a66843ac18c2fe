"""The Backend protocol every model server implements, and the values that cross it.

Modelled on the small backend trait of Hugging Face's TGI router: a backend turns one
`GenerationRequest` into a stream of `GenerationChunk`s and says whether it is healthy
and what it is (`ModelCard`). Validation, limits, metrics and the HTTP protocol live
outside the backends, in `gateway/`. Besides TGI's methods a backend has `start`/`stop`
(loading weights or launching a server process is slow and must happen in the app's
lifespan, not at import or construction) and `load()` (queue depth and in-flight count,
read by the metrics and, later, by the router's latency estimates).

Backends report failures with the exceptions below; the gateway maps them onto its
OpenAI error envelope, so `models/` never imports `gateway/`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Role = Literal["teacher", "student"]
# tool_calls / function_call: a remote model ended its turn by calling a tool
FinishReason = Literal["stop", "length", "tool_calls", "function_call"]
# What a request may need of a model beyond plain text (ModelCard.supports).
Capability = Literal["json_object", "json_schema", "tools"]


@dataclass(frozen=True)
class OutputFormat:
    """OpenAI's `response_format` for structured outputs: `json_object` (any JSON object)
    or `json_schema` (the answer follows `schema`, kept as JSON text so the value stays
    immutable). A local backend constrains its decoding to it; a remote one is sent it."""

    type: Literal["json_object", "json_schema"]
    schema: str | None = None  # JSON text of the schema (json_schema only)
    name: str | None = None
    description: str | None = None
    strict: bool | None = None

    def openai(self) -> dict[str, Any]:
        """The `response_format` object as OpenAI's API takes it."""
        if self.type == "json_object":
            return {"type": "json_object"}
        spec: dict[str, Any] = {"name": self.name or "response"}
        if self.description is not None:
            spec["description"] = self.description
        if self.schema is not None:
            spec["schema"] = json.loads(self.schema)
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 means greedy; seed makes sampling reproducible.

    The penalties and `logit_bias` follow OpenAI's definitions: a token's logit is
    lowered by `presence_penalty` once it has appeared in the completion and by
    `frequency_penalty` times its count there, and `logit_bias` adds a fixed value
    (-100..100) to the logits of the given token ids before sampling. `logprobs` asks
    for the chosen token's log-probability and `top_logprobs` (0..20) alternatives per
    position, computed from the model's distribution before penalties and temperature.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids unique
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: OutputFormat | None = None  # None: plain text


@dataclass(frozen=True)
class Tools:
    """Tool calling as the client asked for it, for backends whose card supports "tools":
    OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and the legacy `functions` and
    `function_call`, as the client sent them (already checked by the gateway)."""

    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: tuple[dict[str, Any], ...] = ()
    function_call: str | dict[str, Any] | None = None

    def openai(self) -> dict[str, Any]:
        """The fields that are set, as an OpenAI request body names them."""
        fields = {
            "tools": list(self.tools),
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "functions": list(self.functions),
            "function_call": self.function_call,
        }
        return {k: v for k, v in fields.items() if v is not None and v != []}


@dataclass(frozen=True)
class ToolCall:
    """A tool call a model made (OpenAI's `tool_calls[i]`), or a piece of one in a stream:
    `index` says which call a piece belongs to, `id` and `name` come with its first piece
    and `arguments` in fragments. `legacy` marks the legacy API's `function_call`."""

    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    legacy: bool = False


def merge_tool_calls(pieces: Iterable[ToolCall]) -> tuple[ToolCall, ...]:
    """Whole calls from streamed pieces, in the order their first pieces came: the
    fragments of each (legacy, index) joined, its first id and name kept."""
    calls: dict[tuple[bool, int], ToolCall] = {}
    for p in pieces:
        key = (p.legacy, p.index)
        seen = calls.get(key)
        calls[key] = p if seen is None else ToolCall(
            p.index, seen.id or p.id, seen.name or p.name, seen.arguments + p.arguments, p.legacy
        )  # fmt: skip
    return tuple(calls.values())


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of `messages` (chat) and `prompt` (raw text) is set.

    `messages` are OpenAI chat messages reduced to `{"role": str, "content": str}`; the
    backend renders them with its model's chat template (a remote server applies its own).
    Tool calling keeps what the upstream needs: an assistant message's `tool_calls` (its
    content may then be None), a `tool` message's `tool_call_id`, a `function` one's name.
    `tools` is set only for a model whose card supports "tools".
    """

    request_id: str
    params: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    # A hint: False means the caller wants only the whole answer, so a backend may
    # deliver it as a single final chunk (a remote backend then skips SSE parsing).
    stream: bool = True
    tools: Tools | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of messages and prompt")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as OpenAI's `logprobs.content[i]` describes it: its text, its
    log-probability and the `top` most likely alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of generated text. The last chunk of a stream has `finish_reason` set
    and carries the exact token counts; `batch_size` is the largest number of sequences
    the backend decoded together while this request ran (None when unknown).

    With `SamplingParams.logprobs`, `logprobs` holds the tokens sampled since the
    previous chunk (in a non-streamed answer, the final chunk holds them all); None when
    not asked for. Tokens held back for a stop string arrive with the text they make.
    `tool_calls` holds the tool calls (whole, or pieces of them in a stream) a remote
    model made; None when it made none.
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    batch_size: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCall, ...] | None = None


@dataclass(frozen=True)
class ModelCard:
    """What routing and `/v1/models` need to know about a served model. `supports`: what
    it can honour beyond plain text (structured outputs, tool calling); the router sends
    a request only to models that support all it needs."""

    name: str
    backend: str
    role: Role = "teacher"
    context_length: int = 2048
    parameters: int | None = None
    parent: str | None = None
    created: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    supports: frozenset[Capability] = frozenset()


@dataclass(frozen=True)
class Load:
    """A snapshot of a backend's work: requests waiting for a slot and running now, and
    how many may wait before it refuses more (None: it does not queue, e.g. remote)."""

    waiting: int = 0
    running: int = 0
    capacity: int | None = None


@runtime_checkable
class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def health(self) -> bool: ...

    def card(self) -> ModelCard: ...

    def load(self) -> Load: ...


class BackendError(Exception):
    """Base of every error a backend raises; the gateway renders each as OpenAI's envelope."""


class PromptTooLong(BackendError):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the "
            f"prompt has {prompt_tokens} tokens and max_tokens asks for {max_tokens} more "
            f"({prompt_tokens + max_tokens} in all). Shorten the prompt or lower max_tokens."
        )


class InvalidParams(BackendError):
    """A request the backend cannot run as given (a `logit_bias` token id outside the
    vocabulary, say); rendered as a 400 whose `param` is `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class Overloaded(BackendError):
    """The backend's bounded queue is full; the client should retry after a pause."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Unavailable(BackendError):
    """The backend cannot serve now (not started, crashed, unreachable, timed out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class UpstreamError(BackendError):
    """A remote OpenAI-compatible server answered with an error; passed through as is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "upstream_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        super().__init__(message)
