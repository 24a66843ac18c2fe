"""The bodies the gateway sends for OpenAI's chat-completions and (legacy) completions:
completions, chunks, choices, usage, log-probabilities, tool calls, the model list, and
their ids and timestamps. The requests are in gateway/protocol.py."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from models.backends.base import (
    TokenLogprob,
    ToolCall,
)


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


class FunctionCall(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str | None = Field(None, exclude_if=lambda v: v is None)


class ToolCallOut(BaseModel):
    """A tool call: whole in a message; in a stream delta, a piece (index set, the id,
    type and name on its first piece only)."""

    index: int | None = Field(None, exclude_if=lambda v: v is None)
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: FunctionCall


def tool_calls_out(
    calls: Sequence[ToolCall], *, delta: bool
) -> tuple[list[ToolCallOut] | None, FunctionCall | None]:
    """(tool_calls, legacy function_call) of a message or delta; None where none."""
    tools = [
        ToolCallOut(
            index=c.index if delta else None,
            id=c.id,
            type="function" if c.id or not delta else None,
            function=FunctionCall(name=c.name, arguments=c.arguments),
        )
        for c in calls
        if not c.legacy
    ]  # fmt: skip
    legacy = [FunctionCall(name=c.name, arguments=c.arguments) for c in calls if c.legacy]
    return tools or None, legacy[0] if legacy else None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)
    function_call: FunctionCall | None = Field(None, exclude_if=lambda v: v is None)


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
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)
    function_call: FunctionCall | None = Field(None, exclude_if=lambda v: v is None)


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
