"""POST /v1/completions (the legacy text endpoint)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response

from gateway.api.generation import Job, Result, fan_out, parse_body, run, sampling, sse, target
from gateway.openapi import COMPLETION_EXAMPLE, GENERATION_ERRORS, request_body, responses
from gateway.protocol import CompletionRequest
from gateway.protocol_out import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Usage,
    completion_logprobs,
    new_id,
    now,
)
from gateway.state import gateway_of
from models.backends.base import GenerationChunk, GenerationRequest, TokenLogprob

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=None,
    operation_id="createCompletion",
    summary="Create a completion (legacy; `stream: true` for server-sent events)",
    openapi_extra=request_body(CompletionRequest, COMPLETION_EXAMPLE),
    responses=responses(Completion, *GENERATION_ERRORS, stream=Completion),
)
async def completions(request: Request) -> Response:
    gw = gateway_of(request)
    req = await parse_body(request, CompletionRequest, gw.config.limits.max_body_bytes)
    req.check()
    prompt = req.text()
    params = sampling(req, gw, req.max_tokens, "max_tokens")
    to = target(gw, request, req.model, prompt, params.max_tokens)
    rid = new_id("cmpl")
    gen = GenerationRequest(request_id=rid, params=params, prompt=prompt, stream=bool(req.stream))
    job = Job(
        to.backend,
        fan_out(gen, req.choices()),
        "prompt",
        default_max_tokens=req.max_tokens is None,
        stream=bool(req.stream),
    )
    render = CompletionRender(rid, now(), to.model, req.include_usage(), params.logprobs)
    return await run(request, gw, to, "completions", job, render)


@dataclass
class CompletionRender:
    """text_completion objects for one request; a stream's `text_offset`s continue from
    chunk to chunk, per choice."""

    rid: str
    created: int
    model: str
    include_usage: bool
    logprobs: bool
    offsets: dict[int, int] = field(default_factory=dict)

    def body(self, results: Sequence[Result], usage: Usage) -> Completion:
        choices = [
            CompletionChoice(
                index=i,
                text=r.text,
                logprobs=self._logprobs(i, r.logprobs),
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        return Completion(
            id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def chunk(self, index: int, chunk: GenerationChunk, first: bool) -> list[bytes]:
        if not (chunk.text or chunk.finish_reason):
            return []
        choice = CompletionChoice(
            index=index,
            text=chunk.text,
            finish_reason=chunk.finish_reason,
            logprobs=self._logprobs(index, chunk.logprobs),
        )
        return [
            sse(Completion(id=self.rid, created=self.created, model=self.model, choices=[choice]))
        ]

    def usage(self, usage: Usage) -> bytes:
        return sse(
            Completion(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)
        )

    def _logprobs(
        self, index: int, tokens: Sequence[TokenLogprob] | None
    ) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        tokens = tokens or ()
        out = completion_logprobs(tokens, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(len(t.token) for t in tokens)
        return out
