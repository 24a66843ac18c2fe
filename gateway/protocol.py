"""OpenAI's chat-completions and (legacy) completions requests, and the responses we send.

Every field of OpenAI's two requests is declared, in the order of its API reference. The
ones distillgate implements are checked against OpenAI's documented ranges; the others are
accepted only at their neutral value (`store: false`, `response_format: {"type": "text"}`)
and otherwise rejected by `check()` with a 400 whose `param` names the field and whose
message says it is not supported. Fields OpenAI does not have are ignored, as vLLM does.
Messages are checked per role as OpenAI does (`chat_messages`).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.errors import InvalidRequest, Unsupported
from models.backends.base import TokenLogprob

Stop = str | Annotated[list[str], Field(max_length=4)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
MAX_N = 128  # OpenAI's bound; the gateway's limits may lower it (gateway/api/generation.py)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # padding against side channels: we send none


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


class ChatMessage(_Request):
    """Any role's message; `chat_messages` checks what each role needs."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None  # str | content parts | None, checked by hand for clear errors
    name: str | None = None  # a participant's label; chat templates ignore it
    refusal: str | None = None
    audio: Any = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    tool_call_id: str | None = None


def _present(value: Any) -> bool:
    return value is not None and value != [] and value != {}


# (field, is it at a neutral value?, what the field is) for fields we do not implement.
Rule = tuple[str, Callable[[Any], bool], str]


class _Sampling(_Request):
    """Fields shared by both endpoints, validated the same way."""

    model: str = Field(min_length=1)
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: Stop) -> Stop:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v

    def _check_fields(self, rules: Sequence[Rule]) -> None:
        for name, neutral, what in rules:
            value = getattr(self, name)
            if not neutral(value):
                shown = f"={value!r}" if len(repr(value)) <= 60 else ""
                raise Unsupported(
                    f"{name}{shown} is not supported by distillgate yet ({what}).", param=name
                )
        for key in self.logit_bias or {}:
            if not re.fullmatch(r"\d{1,9}", key):
                raise InvalidRequest(
                    f"logit_bias keys must be token ids written as integer strings "
                    f'(e.g. "50256"); received {key[:40]!r}.',
                    param="logit_bias",
                )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )

    def choices(self) -> int:
        return self.n or 1

    def wanted_logprobs(self) -> tuple[bool, int]:
        """(log-probabilities of the chosen tokens?, alternatives per position)."""
        return False, 0

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


_CHAT_RULES: tuple[Rule, ...] = (
    ("audio", lambda v: v is None, "audio output"),
    ("function_call", lambda v: v in (None, "none"), "legacy function calling"),
    ("functions", lambda v: not _present(v), "legacy function calling"),
    ("modalities", lambda v: not v or set(v) == {"text"}, "only text output is produced"),
    ("prediction", lambda v: v is None, "predicted outputs"),
    ("reasoning_effort", lambda v: v in (None, "none"), "these models do not reason"),
    ("response_format", lambda v: v is None or v.type == "text", "structured outputs"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "one tier serves all"),
    ("store", lambda v: not v, "stored completions"),
    ("tool_choice", lambda v: v in (None, "none"), "tool calling"),
    ("tools", lambda v: not _present(v), "tool calling"),
    ("verbosity", lambda v: v in (None, "medium"), "the models' own length is used"),
    ("web_search_options", lambda v: v is None, "web search"),
)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    parallel_tool_calls: bool | None = None  # neutral: no tools are ever called
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None  # a cache hint
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None

    def check(self) -> None:
        """400 for a field we do not implement set to a value that would matter."""
        self._check_fields(_CHAT_RULES)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                f"top_logprobs={self.top_logprobs} needs logprobs=true.", param="top_logprobs"
            )

    def wanted_logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


_COMPLETION_RULES: tuple[Rule, ...] = (
    ("echo", lambda v: not v, "echoing the prompt"),
    ("suffix", lambda v: not v, "insertion"),
)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    def check(self) -> None:
        self._check_fields(_COMPLETION_RULES)
        if self.best_of is not None and self.best_of != self.choices():
            raise Unsupported(
                f"best_of={self.best_of} is not supported by distillgate yet: only best_of "
                f"equal to n ({self.choices()}) is, which returns every sequence generated.",
                param="best_of",
            )

    def text(self) -> str:
        """The one prompt string; token ids and batches of prompts are refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, str) for p in prompt):
            raise Unsupported(
                f"prompt must be one string; received a list of {len(prompt)} (batched "
                "prompts are not supported, send one request per prompt).",
                param="prompt",
            )
        raise Unsupported("prompt as token ids is not supported; send text.", param="prompt")

    def wanted_logprobs(self) -> tuple[bool, int]:
        """logprobs=0 asks for the chosen tokens' log-probabilities only, as OpenAI does."""
        return self.logprobs is not None, self.logprobs or 0


_PARTS = {
    "image_url": "image input is not supported by this model.",
    "input_audio": "audio input is not supported by this model.",
    "file": "file input is not supported by this model.",
    "refusal": "refusal content parts are not supported by distillgate yet.",
}


def chat_messages(messages: Sequence[ChatMessage]) -> tuple[dict[str, str], ...]:
    """Messages as the backends take them ({"role", "content"} with text content), after
    OpenAI's per-role checks; tool calling in the history is refused, not dropped."""
    return tuple({"role": m.role, "content": _text(i, m)} for i, m in enumerate(messages))


def _text(i: int, m: ChatMessage) -> str:
    p = f"messages[{i}]"
    if m.role == "function":
        raise Unsupported(
            f"{p}: the role 'function' (legacy function calling) is not "
            "supported by distillgate yet.",
            param=f"{p}.role",
        )
    if m.tool_calls or m.function_call is not None:
        field = "tool_calls" if m.tool_calls else "function_call"
        raise Unsupported(
            f"{p}.{field}: tool calls are not supported by distillgate yet.", param=f"{p}.{field}"
        )
    if m.role == "tool":
        if not m.tool_call_id:
            raise InvalidRequest(
                f"{p}.tool_call_id is required for a message with role 'tool'.",
                param=f"{p}.tool_call_id",
            )
        raise Unsupported(
            f"{p}: tool results (role 'tool') are not supported by distillgate yet.",
            param=f"{p}.tool_call_id",
        )
    for field in ("audio", "refusal"):
        if getattr(m, field) is not None:
            raise Unsupported(
                f"{p}.{field} is not supported by distillgate yet.", param=f"{p}.{field}"
            )
    if m.content is None:
        raise InvalidRequest(
            f"{p}.content is required for a message with role '{m.role}'.", param=f"{p}.content"
        )
    return _content_text(p, m.content)


def _content_text(p: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        got = "an empty array" if content == [] else type(content).__name__
        raise InvalidRequest(
            f"{p}.content must be a string or a non-empty array of content parts; received {got}.",
            param=f"{p}.content",
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _PARTS:
            raise Unsupported(_PARTS[kind], param=f"{p}.content[{j}]")
        else:
            raise InvalidRequest(
                f"{p}.content[{j}] must be a content part of type 'text' "
                f"with a string 'text'; received type {kind!r}.",
                param=f"{p}.content[{j}]",
            )
    return "".join(texts)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


def _lp(value: float) -> float:
    """JSON has no -inf: a token banned by logit_bias gets OpenAI's floor, -9999."""
    return value if math.isfinite(value) and value > -9999.0 else -9999.0


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=_lp(logprob), bytes=list(token.encode()))


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.token,
                logprob=_lp(t.logprob),
                bytes=list(t.token.encode()),
                top_logprobs=[_top(a, lp) for a, lp in t.top],
            )
            for t in tokens
        ]
    )


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists; `text_offset` counts characters from the start
    of the completion; each `top_logprobs` dict holds the alternatives and, as OpenAI's
    does, the chosen token (so logprobs=0 gives the chosen token alone)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[_lp(t.logprob) for t in tokens],
        top_logprobs=[{**{a: _lp(lp) for a, lp in t.top}, t.token: _lp(t.logprob)} for t in tokens],
        text_offset=offsets,
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    """Both the whole completion and, with object "text_completion" too, a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "distillgate"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    role: str | None = None
    backend: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
