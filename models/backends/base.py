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

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["teacher", "student"]
FinishReason = Literal["stop", "length"]


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


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of `messages` (chat) and `prompt` (raw text) is set.

    `messages` are OpenAI chat messages reduced to `{"role": str, "content": str}`; the
    backend renders them with its model's chat template (a remote server applies its own).
    """

    request_id: str
    params: SamplingParams
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    # A hint: False means the caller wants only the whole answer, so a backend may
    # deliver it as a single final chunk (a remote backend then skips SSE parsing).
    stream: bool = True

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
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    batch_size: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ModelCard:
    """What routing and `/v1/models` need to know about a served model."""

    name: str
    backend: str
    role: Role = "teacher"
    context_length: int = 2048
    parameters: int | None = None
    parent: str | None = None
    created: int = 0
    extra: dict[str, object] = field(default_factory=dict)


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
