"""OpenAI's Responses API (POST /v1/responses), text in and text out: the request, its
input items reduced to chat messages, and the response object and stream events we send.

As in gateway/protocol.py, every documented request field is declared; the ones a
stateless text gateway cannot honour (tools, stored state, background runs) are accepted
only at their neutral value and otherwise refused with a 400 `unsupported_parameter`
naming the field. Fields OpenAI does not have are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel

from gateway.errors import InvalidRequest, Unsupported
from gateway.protocol import Need, StreamOptions, _Request, content_text
from gateway.protocol_out import ChatTokenLogprob, Usage
from models.backends.base import OutputFormat

LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them
ROLES = ("user", "assistant", "system", "developer")


class TextFormat(_Request):
    """Chat's `response_format`, with json_schema's fields flattened into it."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


def _present(value: Any) -> bool:
    return value is not None and value != [] and value != {}


# (field, is it at a neutral value?, what the field is) for fields we do not implement.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("background", lambda v: not v, "background responses: answers are returned at once"),
    ("conversation", lambda v: v is None, "conversations: responses are not stored"),
    ("previous_response_id", lambda v: v is None, "responses are not stored; send the history"),
    ("prompt", lambda v: v is None, "stored prompt templates"),
    ("reasoning", lambda v: not v or v.get("effort") in (None, "none"), "no model reasons"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "one tier serves all"),
    ("store", lambda v: not v, "responses are not stored; send store=false or omit it"),
    ("tool_choice", lambda v: v in (None, "none", "auto"), "tool calling"),
    ("tools", lambda v: not _present(v), "tool calling"),
    ("truncation", lambda v: v in (None, "disabled"), "the input is never truncated"),
)


class ResponsesRequest(_Request):
    """The body of POST /v1/responses, in the order of OpenAI's API reference."""

    model: str = Field(min_length=1)
    input: str | list[Any]  # items checked by hand (`messages`) for clear errors
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None  # only LOGPROBS has an effect: no other item is made
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=1)  # neutral: no tools are ever called
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: dict[str, Any] | None = None
    prompt_cache_key: str | None = None  # a cache hint
    prompt_cache_retention: str | None = None
    reasoning: dict[str, Any] | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    def check(self) -> None:
        """400 for a field we do not implement set to a value that would matter."""
        for name, neutral, what in _RULES:
            value = getattr(self, name)
            if not neutral(value):
                shown = f"={value!r}" if len(repr(value)) <= 60 else ""
                raise Unsupported(
                    f"{name}{shown} is not supported by distillgate yet ({what}).", param=name
                )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )

    def text_format(self) -> TextFormat | None:
        """The structured-output format asked for (None for plain text)."""
        fmt = self.text.format if self.text else None
        return None if fmt is None or fmt.type == "text" else fmt

    def needs(self) -> tuple[Need, ...]:
        """What this request needs of its model beyond plain text (see `check_supported`)."""
        fmt = self.text_format()
        return () if fmt is None else (Need(fmt.type, "text.format", f"text.format '{fmt.type}'"),)

    def output_format(self) -> OutputFormat | None:
        """`text.format` as the backends take it (chat's `response_format`, flattened)."""
        fmt = self.text_format()
        if fmt is None:
            return None
        if fmt.type == "json_object":
            return OutputFormat("json_object")
        for name in ("name", "schema_"):
            if getattr(fmt, name) is None:
                field = name.rstrip("_")
                raise InvalidRequest(
                    f"text.format.{field} is required when text.format.type is 'json_schema'.",
                    param=f"text.format.{field}",
                )
        schema = json.dumps(fmt.schema_)
        return OutputFormat("json_schema", schema, fmt.name, fmt.description, fmt.strict)

    def wanted_logprobs(self) -> tuple[bool, int]:
        """(log-probabilities of the chosen tokens?, alternatives per position)."""
        return LOGPROBS in (self.include or ()), self.top_logprobs or 0

    def messages(self) -> tuple[dict[str, str], ...]:
        """`instructions` (as a system message) and `input`, as the backends take them."""
        head = (
            () if self.instructions is None else ({"role": "system", "content": self.instructions},)
        )
        if isinstance(self.input, str):
            return (*head, {"role": "user", "content": self.input})
        if not self.input:
            raise InvalidRequest(
                "input must be a string or a non-empty array of items.", param="input"
            )
        return (*head, *(_message(i, item) for i, item in enumerate(self.input)))


_ITEMS = {
    "function_call": "tool calling",
    "function_call_output": "tool calling",
    "custom_tool_call": "tool calling",
    "custom_tool_call_output": "tool calling",
    "item_reference": "responses are not stored; send the items themselves",
    "reasoning": "no model reasons",
}
_PARTS = {
    "input_image": "image input is not supported by this model.",
    "input_file": "file input is not supported by this model.",
    "input_audio": "audio input is not supported by this model.",
    "refusal": "refusal content parts are not supported by distillgate yet.",
}


def _message(i: int, item: Any) -> dict[str, str]:
    """One input item -> {"role", "content"}: messages only, with text content."""
    p = f"input[{i}]"
    if not isinstance(item, dict):
        raise InvalidRequest(
            f"{p} must be an input item (an object); received {type(item).__name__}.", param=p
        )
    kind = item.get("type", "message")
    if kind != "message":
        what = _ITEMS.get(kind, "") if isinstance(kind, str) else ""
        raise Unsupported(
            f"{p}: items of type {repr(kind)[:60]} are not supported by distillgate "
            f"({what or 'only message items are'}).",
            param=f"{p}.type",
        )
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"{p}.role must be one of {', '.join(ROLES)}; received {repr(role)[:60]}.",
            param=f"{p}.role",
        )
    return {"role": role, "content": _content(p, item.get("content"))}


def _content(p: str, content: Any) -> str:
    expected = "'input_text' (or 'output_text' in an assistant message)"
    return content_text(p, content, ("input_text", "output_text"), _PARTS, expected)


# What we send back.


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputDetails(BaseModel):
    cached_tokens: int = 0


class OutputDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputDetails = Field(default_factory=InputDetails)
    output_tokens: int
    output_tokens_details: OutputDetails = Field(default_factory=OutputDetails)
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class Incomplete(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str
    message: str


Status = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(BaseModel):
    """The `response` object: the whole answer, and the snapshot lifecycle events carry.
    The request's settings are echoed back as OpenAI does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: Incomplete | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    service_tier: str = "default"
    store: bool = False
    temperature: float
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


class LifecycleEvent(BaseModel):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    sequence_number: int
    response: ResponseObject


class ItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int = 0
    item: OutputMessage


class PartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: OutputText


class TextDelta(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int = 0
    content_index: int = 0
    delta: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class TextDone(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int = 0
    content_index: int = 0
    text: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ErrorEvent(BaseModel):
    """An error after the stream started, as OpenAI sends it (then `response.failed`)."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


Event = LifecycleEvent | ItemEvent | PartEvent | TextDelta | TextDone | ErrorEvent


class StreamEvent(RootModel[Event]):
    """Any event of a Responses stream (for the published schema)."""


def event_bytes(events: Sequence[Event]) -> list[bytes]:
    """SSE frames with the event's type as the SSE event name, as OpenAI sends them."""
    return [
        b"event: " + e.type.encode() + b"\ndata: " + e.model_dump_json().encode() + b"\n\n"
        for e in events
    ]
