"""POST /v1/responses (OpenAI's Responses API, what newer SDKs and agent frameworks call by
default): text in, text out, on the same generation path as chat (routing, limits,
metrics, traffic log, tracing) through gateway/api/generation.py's `run`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from gateway.api.generation import Job, Result, parse_body, run, sampling, target
from gateway.openapi import GENERATION_ERRORS, request_body
from gateway.openapi import responses as responses_doc
from gateway.protocol import _Sampling, check_supported
from gateway.protocol_out import ChatTokenLogprob, Usage, chat_logprobs, new_id, now
from gateway.protocol_responses import (
    ErrorEvent,
    Event,
    Incomplete,
    ItemEvent,
    LifecycleEvent,
    OutputMessage,
    OutputText,
    PartEvent,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    Status,
    StreamEvent,
    TextDelta,
    TextDone,
    event_bytes,
)
from gateway.routing.router import request_text
from gateway.state import Gateway, gateway_of
from models.backends.base import GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob

router = APIRouter()

# Its own label in the metrics, the traffic log and the tracer; the adaptation loop reads
# its rows as it reads chat's (messages in, one text out).
ENDPOINT = "responses"
EXAMPLE = {"model": "auto", "input": "Say hello in five words.", "max_output_tokens": 16}


@router.post(
    "/v1/responses",
    response_model=None,
    operation_id="createResponse",
    summary="Create a model response (`stream: true` for server-sent events)",
    openapi_extra=request_body(ResponsesRequest, EXAMPLE),
    responses=responses_doc(ResponseObject, *GENERATION_ERRORS, stream=StreamEvent),
)
async def responses(request: Request) -> Response:
    gw = gateway_of(request)
    req = await parse_body(request, ResponsesRequest, gw.config.limits.max_body_bytes)
    req.check()
    messages = req.messages()
    params = _sampling(req, gw)
    # structured outputs: auto picks among the models that support them; a named model
    # that cannot is a 400 naming text.format
    needs = req.needs()
    capabilities = frozenset(n.capability for n in needs)
    to = target(gw, request, req.model, request_text(messages), params.max_tokens, capabilities)
    check_supported(to.backend.card(), needs)
    rid = new_id("resp")
    stream = bool(req.stream)
    gen = GenerationRequest(request_id=rid, params=params, messages=messages, stream=stream)
    job = Job(
        to.backend, (gen,), "input", default_max_tokens=req.max_output_tokens is None, stream=stream
    )
    render = ResponsesRender(_echo(req, rid, to.model, params), params.logprobs)
    answer = await run(request, gw, to, ENDPOINT, job, render)
    if isinstance(answer, StreamingResponse):
        answer.body_iterator = _openai_ending(answer.body_iterator, render)  # type: ignore[arg-type]
    return answer


def _sampling(req: ResponsesRequest, gw: Gateway) -> SamplingParams:
    """The chat path's checks and defaults, for the sampling fields Responses has."""
    view = _Sampling(model=req.model, temperature=req.temperature, top_p=req.top_p)
    params = sampling(view, gw, req.max_output_tokens, "max_output_tokens")
    logprobs, top = req.wanted_logprobs()
    return replace(params, logprobs=logprobs, top_logprobs=top, response_format=req.output_format())


def _echo(req: ResponsesRequest, rid: str, model: str, params: SamplingParams) -> ResponseObject:
    """The response object as it stands before any output: the request's settings."""
    return ResponseObject(
        id=rid, created_at=now(), status="in_progress", model=model,
        instructions=req.instructions, max_output_tokens=req.max_output_tokens,
        metadata=req.metadata or {}, parallel_tool_calls=bool(req.parallel_tool_calls),
        temperature=params.temperature, top_p=params.top_p, top_logprobs=params.top_logprobs,
        tool_choice=req.tool_choice if isinstance(req.tool_choice, str) else "none",
        user=req.user,
        **({"text": req.text.model_dump(by_alias=True, exclude_none=True)} if req.text else {}),
    )  # fmt: skip


@dataclass
class ResponsesRender:
    """The response object and its stream of events for one request. A stream's closing
    events carry the whole text, so the render keeps it; every event is numbered."""

    start: ResponseObject
    logprobs: bool
    include_usage: bool = True  # the closing events are sent where usage would be
    parts: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    sequence: int = 0

    @property
    def item_id(self) -> str:
        return "msg-" + self.start.id.removeprefix("resp-")

    def body(self, results: Sequence[Result], usage: Usage) -> ResponseObject:
        (result,) = results
        return self._final(result.text, result.finish_reason, result.logprobs or (), usage)

    def chunk(self, index: int, chunk: GenerationChunk, first: bool) -> list[bytes]:
        events: list[Event] = []
        if first:
            message = self._message("in_progress", [])
            events += [
                LifecycleEvent(type="response.created", sequence_number=0, response=self.start),
                LifecycleEvent(type="response.in_progress", sequence_number=0, response=self.start),
                ItemEvent(type="response.output_item.added", sequence_number=0, item=message),
                self._part("response.content_part.added", OutputText(text="")),
            ]
        self.finish_reason = chunk.finish_reason or self.finish_reason
        if chunk.text:
            self.parts.append(chunk.text)
            self.tokens.extend(chunk.logprobs or ())
            logprobs = self._logprobs(chunk.logprobs or ())
            events.append(
                TextDelta(
                    sequence_number=0, item_id=self.item_id, delta=chunk.text, logprobs=logprobs
                )
            )
        return self._frames(events)

    def usage(self, usage: Usage) -> bytes:
        """The closing events: the text, its part and item done, then the whole response."""
        final = self._final("".join(self.parts), self.finish_reason, self.tokens, usage)
        (message,) = final.output
        done = LifecycleEvent(
            type="response.completed" if final.status == "completed" else "response.incomplete",
            sequence_number=0,
            response=final,
        )
        events: list[Event] = [
            TextDone(
                sequence_number=0,
                item_id=self.item_id,
                text=message.content[0].text,
                logprobs=message.content[0].logprobs,
            ),
            self._part("response.content_part.done", message.content[0]),
            ItemEvent(type="response.output_item.done", sequence_number=0, item=message),
            done,
        ]
        return b"".join(self._frames(events))

    def failed(self, error: dict[str, object]) -> bytes:
        """An error after the stream started: OpenAI's `error` event, then `response.failed`."""
        code = str(error.get("code") or "server_error")  # our 5xx carry no code
        message = str(error.get("message") or "The request failed.")
        param = error.get("param")
        failed = self.start.model_copy(
            update={"status": "failed", "error": ResponseError(code=code, message=message)}
        )
        events: list[Event] = [
            ErrorEvent(
                sequence_number=0,
                code=code,
                message=message,
                param=param if isinstance(param, str) else None,
            ),
            LifecycleEvent(type="response.failed", sequence_number=0, response=failed),
        ]
        return b"".join(self._frames(events))

    def _final(
        self, text: str, finish: str | None, tokens: Sequence[TokenLogprob], usage: Usage
    ) -> ResponseObject:
        status: Status = "incomplete" if finish == "length" else "completed"
        content = OutputText(text=text, logprobs=self._logprobs(tokens))
        return self.start.model_copy(
            update={
                "status": status,
                "completed_at": now() if status == "completed" else None,
                "incomplete_details": Incomplete() if status == "incomplete" else None,
                "output": [self._message(status, [content])],
                "usage": ResponseUsage.of(usage),
            }
        )

    def _message(self, status: Status, content: list[OutputText]) -> OutputMessage:
        return OutputMessage(id=self.item_id, status=status, content=content)  # type: ignore[arg-type]

    def _part(self, kind: str, part: OutputText) -> PartEvent:
        return PartEvent(type=kind, sequence_number=0, item_id=self.item_id, part=part)  # type: ignore[arg-type]

    def _logprobs(self, tokens: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
        if not self.logprobs:
            return []
        return chat_logprobs(tokens).content or []

    def _frames(self, events: list[Event]) -> list[bytes]:
        for event in events:
            event.sequence_number = self.sequence
            self.sequence += 1
        return event_bytes(events)


_DONE = b"data: [DONE]\n\n"


async def _openai_ending(
    events: AsyncIterator[bytes], render: ResponsesRender
) -> AsyncIterator[bytes]:
    """The shared stream ends the chat way (an `{"error": ...}` event, then `[DONE]`);
    a Responses stream ends with `response.completed`, or an `error` event and
    `response.failed`, which is what Responses clients read."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for frame in events:
            if frame == _DONE:
                continue
            if frame.startswith(b"data: "):  # only the shared error event has no name
                yield render.failed(json.loads(frame[len(b"data: ") :])["error"])
                continue
            yield frame
