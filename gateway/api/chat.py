"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from gateway.api.generation import (
    Job,
    cancel_on_disconnect,
    complete,
    parse_body,
    sampling,
    sse,
    stream_response,
    target,
)
from gateway.errors import InvalidRequest
from gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Delta,
    Usage,
    new_id,
    now,
)
from gateway.routing.router import request_text
from gateway.state import GatewayDep
from models.backends.base import GenerationChunk, GenerationRequest

router = APIRouter()


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.logprobs:
        raise InvalidRequest("logprobs are not supported by distillgate yet.", param="logprobs")
    if req.tools:
        raise InvalidRequest("tools are not supported by distillgate yet.", param="tools")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, gw: GatewayDep) -> Response:
    req = await parse_body(request, ChatCompletionRequest, gw.config.limits.max_body_bytes)
    _check_supported(req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling(req, gw, max_tokens, param)
    messages = tuple({"role": m.role, "content": m.text()} for m in req.messages)
    to = target(gw, request, req.model, request_text(messages), params.max_tokens)
    rid, created, model = new_id("chatcmpl"), now(), to.model
    gen = GenerationRequest(request_id=rid, params=params, messages=messages,
                            stream=bool(req.stream))  # fmt: skip
    tracker = to.tracker(gw, "chat")
    job = Job(to.backend, gen, tracker, "messages", default_max_tokens=max_tokens is None)
    if req.stream:
        usage = req.include_usage()

        def frame(chunk: GenerationChunk, first: bool) -> list[bytes]:
            return _chunk_events(rid, created, model, chunk, first, usage)

        return await stream_response(job, frame, to.headers)
    result = await cancel_on_disconnect(request, complete(gw, job))
    body = ChatCompletion(
        id=rid,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text), finish_reason=result.finish_reason
            )
        ],
        usage=Usage.of(result.prompt_tokens, result.completion_tokens),
    )
    return Response(body.model_dump_json(), media_type="application/json", headers=to.headers)


def _chunk_events(
    rid: str, created: int, model: str, chunk: GenerationChunk, first: bool, usage: bool
) -> list[bytes]:
    events = []
    if first:
        events.append(_event(rid, created, model, Delta(role="assistant", content=""), None))
    if chunk.text or chunk.finish_reason:
        delta = Delta(content=chunk.text) if chunk.text else Delta()
        events.append(_event(rid, created, model, delta, chunk.finish_reason))
    if chunk.finish_reason and usage:
        events.append(
            sse(
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[],
                    usage=Usage.of(chunk.prompt_tokens or 0, chunk.completion_tokens or 0),
                )
            )
        )
    return events


def _event(rid: str, created: int, model: str, delta: Delta, finish: str | None) -> bytes:
    choice = ChatChunkChoice(delta=delta, finish_reason=finish)
    return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]))
