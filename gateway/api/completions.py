"""POST /v1/completions (the legacy text endpoint)."""

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
from gateway.protocol import Completion, CompletionChoice, CompletionRequest, Usage, new_id, now
from gateway.state import GatewayDep
from models.backends.base import GenerationChunk, GenerationRequest

router = APIRouter()


def _prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise InvalidRequest(
            f"prompt must be one string; got a list of {len(req.prompt)} (batched prompts "
            "are not supported, send one request per prompt).",
            param="prompt",
        )
    return req.prompt[0]


def _check_supported(req: CompletionRequest) -> None:
    for name in ("echo", "suffix", "logprobs"):
        if getattr(req, name):
            raise InvalidRequest(f"{name} is not supported by distillgate yet.", param=name)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, gw: GatewayDep) -> Response:
    req = await parse_body(request, CompletionRequest, gw.config.limits.max_body_bytes)
    _check_supported(req)
    prompt = _prompt(req)
    params = sampling(req, gw, req.max_tokens, "max_tokens")
    to = target(gw, request, req.model, prompt, params.max_tokens)
    rid, created, model = new_id("cmpl"), now(), to.model
    gen = GenerationRequest(request_id=rid, params=params, prompt=prompt, stream=bool(req.stream))
    job = Job(to.backend, gen, to.tracker(gw, "completions"), "prompt",
              default_max_tokens=req.max_tokens is None)  # fmt: skip
    if req.stream:
        usage = req.include_usage()

        def frame(chunk: GenerationChunk, first: bool) -> list[bytes]:
            return _chunk_events(rid, created, model, chunk, usage)

        return await stream_response(job, frame, to.headers)
    result = await cancel_on_disconnect(request, complete(gw, job))
    body = Completion(
        id=rid,
        created=created,
        model=model,
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
        usage=Usage.of(result.prompt_tokens, result.completion_tokens),
    )
    return Response(body.model_dump_json(), media_type="application/json", headers=to.headers)


def _chunk_events(
    rid: str, created: int, model: str, chunk: GenerationChunk, usage: bool
) -> list[bytes]:
    events = []
    if chunk.text or chunk.finish_reason:
        choice = CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)
        events.append(sse(Completion(id=rid, created=created, model=model, choices=[choice])))
    if chunk.finish_reason and usage:
        tokens = Usage.of(chunk.prompt_tokens or 0, chunk.completion_tokens or 0)
        events.append(
            sse(Completion(id=rid, created=created, model=model, choices=[], usage=tokens))
        )
    return events
