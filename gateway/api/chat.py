"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fastapi import APIRouter, Request, Response

from gateway.api.generation import Job, Result, fan_out, parse_body, run, sampling, sse, target
from gateway.openapi import CHAT_EXAMPLE, GENERATION_ERRORS, request_body, responses
from gateway.protocol import ChatCompletionRequest, chat_messages, check_supported
from gateway.protocol_out import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Delta,
    Usage,
    chat_logprobs,
    new_id,
    now,
    tool_calls_out,
)
from gateway.routing.router import request_text
from gateway.state import gateway_of
from models.backends.base import GenerationChunk, GenerationRequest, TokenLogprob, merge_tool_calls

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    operation_id="createChatCompletion",
    summary="Create a chat completion (`stream: true` for server-sent events)",
    openapi_extra=request_body(ChatCompletionRequest, CHAT_EXAMPLE),
    responses=responses(ChatCompletion, *GENERATION_ERRORS, stream=ChatCompletionChunk),
)
async def chat_completions(request: Request) -> Response:
    gw = gateway_of(request)
    req = await parse_body(request, ChatCompletionRequest, gw.config.limits.max_body_bytes)
    req.check()
    messages = chat_messages(req.messages)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = replace(sampling(req, gw, max_tokens, param), response_format=req.output_format())
    # structured outputs and tools: auto picks among the models that support them; a
    # named model that cannot is a 400 naming the field
    needs = req.needs()
    capabilities = frozenset(n.capability for n in needs)
    to = target(gw, request, req.model, request_text(messages), params.max_tokens, capabilities)
    check_supported(to.backend.card(), needs)
    rid = new_id("chatcmpl")
    gen = GenerationRequest(
        request_id=rid, params=params, messages=messages, stream=bool(req.stream),
        tools=req.tool_spec(),
    )  # fmt: skip
    job = Job(
        to.backend,
        fan_out(gen, req.choices()),
        "messages",
        default_max_tokens=max_tokens is None,
        stream=bool(req.stream),
    )
    render = ChatRender(rid, now(), to.model, req.include_usage(), params.logprobs)
    return await run(request, gw, to, "chat", job, render)


@dataclass(frozen=True)
class ChatRender:
    """chat.completion and chat.completion.chunk objects for one request."""

    rid: str
    created: int
    model: str
    include_usage: bool
    logprobs: bool

    def body(self, results: Sequence[Result], usage: Usage) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=i,
                message=_message(r),
                logprobs=self._logprobs(r.logprobs),
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletion(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunk(self, index: int, chunk: GenerationChunk, first: bool) -> list[bytes]:
        events = []
        if first:  # OpenAI opens each choice with the role and empty content
            events.append(
                self._event(ChatChunkChoice(index=index, delta=Delta(role="assistant", content="")))
            )
        if chunk.text or chunk.finish_reason or chunk.tool_calls:
            choice = ChatChunkChoice(
                index=index,
                delta=_delta(chunk),
                logprobs=self._logprobs(chunk.logprobs),
                finish_reason=chunk.finish_reason,
            )
            events.append(self._event(choice))
        return events

    def usage(self, usage: Usage) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=self.rid, created=self.created, model=self.model, choices=[], usage=usage
            )
        )

    def _logprobs(self, tokens: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
        return chat_logprobs(tokens or ()) if self.logprobs else None

    def _event(self, choice: ChatChunkChoice) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=self.rid, created=self.created, model=self.model, choices=[choice]
            )
        )


def _message(r: Result) -> AssistantMessage:
    """The answer; with tool calls, their whole form (content null when it has none)."""
    if not r.tool_calls:
        return AssistantMessage(content=r.text)
    tools, legacy = tool_calls_out(merge_tool_calls(r.tool_calls), delta=False)
    return AssistantMessage(content=r.text or None, tool_calls=tools, function_call=legacy)


def _delta(chunk: GenerationChunk) -> Delta:
    if not chunk.tool_calls:
        return Delta(content=chunk.text) if chunk.text else Delta()
    tools, legacy = tool_calls_out(chunk.tool_calls, delta=True)
    return Delta(content=chunk.text or None, tool_calls=tools, function_call=legacy)
