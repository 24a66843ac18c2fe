"""A Backend that answers from a script: the protocol's boundary, for the gateway's own
tests of what no real model does on demand (fail mid-stream, be full, hang, stall).

It honours `logprobs`: each piece is one token whose log-probability is -0.1 * (position
+ 1), with `top_logprobs` alternatives "alt0", "alt1", ... just below it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from models.backends.base import (
    BackendError,
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
    SamplingParams,
    TokenLogprob,
)


@dataclass
class ScriptedBackend:
    name: str
    pieces: tuple[str, ...] = ("Hello", ", ", "world", "!")
    fail_before: BaseException | None = None
    fail_after: int | None = None  # raise after this many pieces
    delay_s: float = 0.0  # before every piece
    stall_after: int | None = None  # after this many pieces, wait stall_s
    stall_s: float = 30.0
    context_length: int = 64
    seen: list[GenerationRequest] = field(default_factory=list)
    running: int = 0
    cancelled: int = 0
    started: bool = False
    healthy: bool = True
    capacity: int | None = None  # reported in load(), like a local backend's queue_size

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def health(self) -> bool:
        return self.started and self.healthy

    def card(self) -> ModelCard:
        return ModelCard(name=self.name, backend="scripted", context_length=self.context_length)

    def load(self) -> Load:
        return Load(waiting=0, running=self.running, capacity=self.capacity)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.seen.append(request)
        if self.fail_before is not None:
            raise self.fail_before
        self.running += 1
        try:
            for i, piece in enumerate(self.pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendError("the model worker died")
                if self.stall_after is not None and i == self.stall_after:
                    await asyncio.sleep(self.stall_s)
                await asyncio.sleep(self.delay_s)
                yield GenerationChunk(text=piece, logprobs=_logprobs(request.params, i, piece))
            yield GenerationChunk(
                text="",
                finish_reason="stop",
                prompt_tokens=3,
                completion_tokens=len(self.pieces),
                batch_size=1,
                logprobs=() if request.params.logprobs else None,
            )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def _logprobs(params: SamplingParams, i: int, piece: str) -> tuple[TokenLogprob, ...] | None:
    if not params.logprobs:
        return None
    lp = -0.1 * (i + 1)
    top = tuple((f"alt{k}", lp - 1.0 - k) for k in range(params.top_logprobs))
    return (TokenLogprob(piece, lp, top),)


def scripted_app(
    backends: dict[str, ScriptedBackend],
    *,
    roles: dict[str, str] | None = None,
    traffic: dict | None = None,
    routing: dict | None = None,
    **limits,
) -> TestClient:
    """The real app over `backends` (each configured as if remote; `roles` name the
    teacher), as a TestClient that answers server errors as responses; enter it, then
    `wait_ready`. The traffic log is off unless `traffic` configures it."""
    roles = roles or {}
    models = [
        {
            "name": n,
            "backend": "openai",
            "url": "http://127.0.0.1:9",
            "role": roles.get(n, "student"),
        }
        for n in backends
    ]
    data = {"models": models, "limits": limits, "traffic": traffic or {"enabled": False}}
    if routing is not None:
        data["routing"] = routing
    config = parse_config(data)
    app = create_app(config, factory=lambda m: backends[m.name])
    return TestClient(app, raise_server_exceptions=False)


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("gateway never became ready")


def sdk_for(client: TestClient) -> openai.OpenAI:
    """The official SDK talking to the app in process."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0
    )
