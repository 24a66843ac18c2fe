"""A Backend that answers from a script: the protocol's boundary, for the gateway's own
tests of what no real model does on demand (fail mid-stream, be full, hang)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from models.backends.base import (
    BackendError,
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
)


@dataclass
class ScriptedBackend:
    name: str
    pieces: tuple[str, ...] = ("Hello", ", ", "world", "!")
    fail_before: BackendError | None = None
    fail_after: int | None = None  # raise after this many pieces
    delay_s: float = 0.0
    context_length: int = 64
    seen: list[GenerationRequest] = field(default_factory=list)
    running: int = 0
    cancelled: int = 0
    started: bool = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def health(self) -> bool:
        return self.started

    def card(self) -> ModelCard:
        return ModelCard(name=self.name, backend="scripted", context_length=self.context_length)

    def load(self) -> Load:
        return Load(waiting=0, running=self.running)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.seen.append(request)
        if self.fail_before is not None:
            raise self.fail_before
        self.running += 1
        try:
            for i, piece in enumerate(self.pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendError("the model worker died")
                await asyncio.sleep(self.delay_s)
                yield GenerationChunk(text=piece)
            yield GenerationChunk(
                text="",
                finish_reason="stop",
                prompt_tokens=3,
                completion_tokens=len(self.pieces),
                batch_size=1,
            )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
