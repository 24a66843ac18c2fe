"""A backend that launches one `vllm serve` process per model and talks to it over the
OpenAI protocol (it composes an `OpenAIHTTPBackend`; no inheritance).

`start()` spawns the server in its own process group, drains its output into a ring
buffer (so a full pipe never blocks it, and a failed start can show its last lines),
and waits for GET /health. `stop()` sends SIGTERM to the whole group, then SIGKILL after
~10 s, so no engine worker is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from models.backends.base import (
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
    Role,
    Unavailable,
)
from models.backends.openai_http import SUPPORTS, OpenAIHTTPBackend, answers_200, make_session

STOP_GRACE_S = 10.0
OUTPUT_LINES = 200
TAIL_LINES = 20


class VLLMBackend:
    """One `vllm serve MODEL_DIR` child process, served through OpenAIHTTPBackend."""

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        *,
        port: int,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int = 2048,
        role: Role = "student",
        host: str = "127.0.0.1",
        executable: str = "vllm",
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self.port, self.host = port, host
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.executable = executable
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self._role: Role = role
        self._env = dict(env) if env is not None else None
        self._proc: asyncio.subprocess.Process | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._drain: asyncio.Task[None] | None = None
        self._inner: OpenAIHTTPBackend | None = None
        self._log = logging.getLogger(f"{__name__}.{name}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.executable, "serve", str(self.model_dir),
            "--served-model-name", self.name,
            "--host", self.host,
            "--port", str(self.port),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--max-model-len", str(self.max_model_len),
            *self.extra_args,
        ]  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._proc is not None:
            return
        try:
            await self._spawn()
            await self._wait_healthy()
            inner = OpenAIHTTPBackend(
                self.name, self.url, served_model=self.name, role=self._role,
                context_length=self.max_model_len,
            )  # fmt: skip
            await inner.start()
            self._inner = inner
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self) -> None:
        env = {**os.environ, **self._env} if self._env is not None else None
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals them all
                env=env,
            )
        except OSError as exc:
            raise Unavailable(
                f"vllm backend {self.name!r}: cannot run {self.executable!r}: {exc.strerror}"
            ) from exc
        self._output.clear()
        self._drain = asyncio.create_task(self._read_output(self._proc.stdout))

    async def _read_output(self, stream: asyncio.StreamReader | None) -> None:
        while stream is not None and (line := await stream.readline()):
            text = line.decode("utf-8", "replace").rstrip()
            self._output.append(text)
            self._log.debug("%s", text)

    async def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.05
        async with make_session(timeout_s=2.0, connect_timeout_s=2.0) as session:
            while not await answers_200(session, self.url, "/health"):
                if self._proc.returncode is not None:
                    await self._settle_output()
                    raise self._startup_failure(f"exited with code {self._proc.returncode}")
                if time.monotonic() >= deadline:
                    raise self._startup_failure(
                        f"was not healthy within {self.startup_timeout_s:g} s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), delay)
                delay = min(delay * 1.5, 1.0)

    async def _settle_output(self) -> None:
        """Let the drain task read what the process wrote before it exited."""
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain), 1.0)

    def _startup_failure(self, what: str) -> Unavailable:
        tail = "\n".join(list(self._output)[-TAIL_LINES:]) or "(no output)"
        return Unavailable(
            f"vllm backend {self.name!r} ({' '.join(self.command())}) {what}; last output:\n{tail}"
        )

    async def stop(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.stop()
        proc, self._proc = self._proc, None
        if proc is not None:
            await _terminate_group(proc, STOP_GRACE_S)
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    # -- the Backend protocol (delegated) ---------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._inner is None or self._proc is None or self._proc.returncode is not None:
            return _failing(Unavailable(f"vllm backend {self.name!r} is not running"))
        return self._inner.generate(request)

    async def health(self) -> bool:
        if self._inner is None or self._proc is None or self._proc.returncode is not None:
            return False
        return await self._inner.health()

    def card(self) -> ModelCard:
        # vLLM follows response_format always; it calls tools only with a tool parser
        parser = "--tool-call-parser" in self.extra_args
        supports = SUPPORTS if parser else SUPPORTS - {"tools"}
        if self._inner is not None:
            base = self._inner.card()
            return dataclasses.replace(
                base, backend="vllm", extra={**base.extra, "port": self.port}, supports=supports
            )
        return ModelCard(
            name=self.name, backend="vllm", role=self._role, context_length=self.max_model_len,
            supports=supports,
        )  # fmt: skip

    def load(self) -> Load:
        return self._inner.load() if self._inner is not None else Load()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


async def _terminate_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`, and kill any leftovers."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    # Workers that outlived their leader (the group id stays the leader's pid).
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _failing(error: Exception) -> AsyncIterator[GenerationChunk]:
    raise error
    yield  # an async generator that raises on first use
