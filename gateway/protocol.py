"""OpenAI's chat-completions and (legacy) completions requests (the bodies we send are in
gateway/protocol_out.py).

Every field of OpenAI's two requests is declared, in the order of its API reference. The
ones distillgate implements are checked against OpenAI's documented ranges; the others are
accepted only at their neutral value (`store: false`, `response_format: {"type": "text"}`)
and otherwise rejected by `check()` with a 400 whose `param` names the field and whose
message says it is not supported. Fields OpenAI does not have are ignored, as vLLM does.
Messages are checked per role as OpenAI does (`chat_messages`). Structured outputs
(`response_format`) and tool calling (`tools`, `functions`, tool messages in the history)
are requests of the model: `needs()` lists them and `check_supported` refuses a model
whose card cannot honour them with a 400 naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from gateway.errors import InvalidRequest, Unsupported
from models.backends.base import (
    Capability,
    ModelCard,
    OutputFormat,
    Tools,
)

Stop = str | Annotated[list[str], Field(max_length=4)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
MAX_N = 128  # OpenAI's bound; the gateway's limits may lower it (gateway/api/generation.py)


class _Request(BaseModel):
    # strict: JSON types as OpenAI checks them (`"n": "2"`, `"store": 0` are 400s), so the
    # server accepts exactly what its published schema says (gateway/openapi.py)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # padding against side channels: we send none


class JsonSchemaSpec(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def output_format(self) -> OutputFormat | None:
        """The backends' value; None for plain text. json_schema needs its spec."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputFormat("json_object")
        spec = self.json_schema
        if spec is None:
            raise InvalidRequest(
                "response_format.json_schema is required when response_format.type is "
                "'json_schema'.",
                param="response_format.json_schema",
            )
        schema = None if spec.schema_ is None else json.dumps(spec.schema_)
        return OutputFormat("json_schema", schema, spec.name, spec.description, spec.strict)


class _Open(BaseModel):
    """A tool definition: passed upstream as the client sent it, unknown fields kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class FunctionSpec(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Request):
    name: str = Field(min_length=1)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


@dataclass(frozen=True)
class Need:
    """Something a request needs of its model (a card's `supports`), with the field that
    asks for it and what it is, for the 400 when the model cannot."""

    capability: Capability
    param: str
    what: str


def check_supported(card: ModelCard, needs: Sequence[Need]) -> None:
    """400 (unsupported_parameter) naming the first field `card`'s model cannot honour."""
    for need in needs:
        if need.capability not in card.supports:
            hint = "a model served by an OpenAI-compatible backend or vLLM with a tool parser"
            if need.capability != "tools":
                hint = "a local model or an OpenAI-compatible backend"
            raise Unsupported(
                f"{need.param}: {need.what} is not supported by model '{card.name}'; "
                f"send it to {hint}.",
                param=need.param,
            )


# What `_content_text` accepts, for the published schema (gateway/openapi.py); the checks
# stay by hand for their clear errors (an image part: "image input is not supported").
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
        {"type": "null"},
    ]
}


class ChatMessage(_Request):
    """Any role's message; `chat_messages` checks what each role needs."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = None  # str | text parts | None
    name: str | None = None  # a participant's label; chat templates ignore it
    refusal: str | None = None
    audio: Any = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    tool_call_id: str | None = None

    def needs(self, i: int) -> Need | None:
        """Tool calling in the history needs a model that calls tools."""
        p = f"messages[{i}]"
        if self.tool_calls or self.function_call is not None:
            field = "tool_calls" if self.tool_calls else "function_call"
            return Need("tools", f"{p}.{field}", "tool calls in the history")
        if self.role == "tool":
            return Need("tools", f"{p}.tool_call_id", "a tool result (role 'tool')")
        if self.role == "function":
            return Need("tools", f"{p}.role", "the role 'function' (legacy function calling)")
        return None


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
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64 bounds
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
    ("modalities", lambda v: not v or set(v) == {"text"}, "only text output is produced"),
    ("prediction", lambda v: v is None, "predicted outputs"),
    ("reasoning_effort", lambda v: v in (None, "none"), "these models do not reason"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "one tier serves all"),
    ("store", lambda v: not v, "stored completions"),
    ("verbosity", lambda v: v in (None, "medium"), "the models' own length is used"),
    ("web_search_options", lambda v: v is None, "web search"),
)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    functions: list[FunctionSpec] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None  # a cache hint
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
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

    def needs(self) -> tuple[Need, ...]:
        """What this request needs of its model beyond plain text (see `check_supported`)."""
        found: list[Need] = []
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            found.append(Need(fmt.type, "response_format", f"response_format '{fmt.type}'"))
        for name, asked in (
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none")),
            ("functions", bool(self.functions)),
            ("function_call", self.function_call not in (None, "none")),
        ):
            if asked:
                found.append(Need("tools", name, "tool calling"))
        found += [n for i, m in enumerate(self.messages) if (n := m.needs(i)) is not None]
        return tuple(found)

    def output_format(self) -> OutputFormat | None:
        return None if self.response_format is None else self.response_format.output_format()

    def tool_spec(self) -> Tools | None:
        """The tool-calling fields for the backend; None when the request has none."""
        if not any(n.capability == "tools" for n in self.needs()):
            return None

        def dump(v: BaseModel | str | None) -> dict[str, Any] | str | None:
            return v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v

        return Tools(
            tools=tuple(t.model_dump(exclude_unset=True) for t in self.tools or ()),
            tool_choice=dump(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            functions=tuple(f.model_dump(exclude_unset=True) for f in self.functions or ()),
            function_call=dump(self.function_call),
        )


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


def chat_messages(messages: Sequence[ChatMessage]) -> tuple[dict[str, Any], ...]:
    """Messages as the backends take them ({"role", "content"} with text content), after
    OpenAI's per-role checks; tool calling in the history is kept for the upstream (a
    model that cannot call tools is refused by `check_supported`, never sent it)."""
    return tuple(_message(i, m) for i, m in enumerate(messages))


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    p = f"messages[{i}]"
    if m.tool_calls or m.function_call is not None:  # an assistant's call: content optional
        content = None if m.content is None else _text(i, m)
        key = "tool_calls" if m.tool_calls else "function_call"
        return {"role": m.role, "content": content, key: m.tool_calls or m.function_call}
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest(
            f"{p}.tool_call_id is required for a message with role 'tool'.",
            param=f"{p}.tool_call_id",
        )
    if m.role == "function" and not m.name:
        raise InvalidRequest(
            f"{p}.name is required for a message with role 'function'.", param=f"{p}.name"
        )
    message: dict[str, Any] = {"role": m.role, "content": _text(i, m)}
    if m.role == "tool":
        message["tool_call_id"] = m.tool_call_id
    elif m.role == "function":
        message["name"] = m.name
    return message


def _text(i: int, m: ChatMessage) -> str:
    p = f"messages[{i}]"
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
    return content_text(p, content, ("text",), _PARTS, "'text'")


def content_text(
    p: str, content: Any, kinds: tuple[str, ...], unsupported: dict[str, str], expected: str
) -> str:
    """A message's content as text: a string, or a non-empty array of parts of the text
    `kinds` (concatenated); a part of an `unsupported` kind is a 400 saying why, anything
    else a 400 naming the part and what was `expected`. (Chat's and Responses' share it.)"""
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
        kind = kind if isinstance(kind, str) else None  # `"type": {}` is a 400, not a 500
        if kind in kinds and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in unsupported:
            raise Unsupported(unsupported[kind], param=f"{p}.content[{j}]")
        else:
            raise InvalidRequest(
                f"{p}.content[{j}] must be a content part of type {expected} with a string "
                f"'text'; received type {repr(kind)[:60]}.",
                param=f"{p}.content[{j}]",
            )
    return "".join(texts)
