"""SIGTERM on a real `distillgate serve` process whose model is the instant server streaming
slowly: /ready answers 503 at once, in-flight requests finish, the port closes, and the
process exits 0 within server.drain_s + server.shutdown_timeout_s."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, gateway

SLOW = "#instant chunks={chunks} delay=0.1"  # the instant server streams one chunk each 0.1 s


def config(instant: str, **server: float) -> dict:
    model = {"name": "m", "backend": "openai", "url": instant, "served_model": "instant"}
    return {"models": [model], "traffic": {"enabled": False}, "server": server}


@dataclass
class Stream:
    """One streaming chat request run in a thread: its chunks, and how it ended."""

    url: str
    chunks: int
    started: threading.Event = field(default_factory=threading.Event)
    received: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the stream never started"
        return self

    def _run(self) -> None:
        sdk = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=30)
        content = SLOW.format(chunks=self.chunks)
        try:
            for chunk in sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": content}], stream=True
            ):
                self.started.set()
                if chunk.choices and chunk.choices[0].delta.content:
                    self.received += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish_reason = chunk.choices[0].finish_reason
        except Exception as exc:
            self.error = exc
        finally:
            self.started.set()

    def join(self) -> Stream:
        assert self.thread is not None
        self.thread.join(30)
        return self


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False


def exit_code(server: Server, within_s: float) -> int:
    return server.proc.wait(timeout=within_s)


@pytest.mark.slow
def test_sigterm_drains_finishes_in_flight_and_exits_0(tmp_path: Path, instant: str) -> None:
    with gateway(config(instant, drain_s=1.5, shutdown_timeout_s=10), tmp_path) as server:
        streams = [Stream(server.url, chunks=20).start() for _ in range(3)]  # 2 s each
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(f"{server.url}/ready", timeout=2)
        assert ready.status_code == 503, ready.text
        assert time.monotonic() - signalled < 0.5
        assert ready.json()["error"]["message"] == "Not ready: shutting down."
        # during the drain new requests are still served, and told to reconnect
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        late = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=5)
        assert late.status_code == 200 and late.headers["connection"] == "close"
        while not refused(server.url):
            assert time.monotonic() - signalled < 3, "the port stayed open past the drain"
            time.sleep(0.05)
        assert time.monotonic() - signalled >= 1.4  # not before drain_s
        for stream in streams:
            stream.join()
            assert stream.error is None, stream.error
            assert (stream.received, stream.finish_reason) == (20, "stop")
        assert exit_code(server, 15) == 0, server.output()
        assert time.monotonic() - signalled < 1.5 + 10


@pytest.mark.slow
def test_in_flight_past_the_timeout_are_cut_and_the_exit_is_still_0(
    tmp_path: Path, instant: str
) -> None:
    with gateway(config(instant, shutdown_timeout_s=1.5), tmp_path) as server:
        short = Stream(server.url, chunks=6).start()  # 0.6 s: finishes
        long = Stream(server.url, chunks=100).start()  # 10 s: cut at the timeout
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while not refused(server.url):  # no drain: the port closes at once
            assert time.monotonic() - signalled < 0.5, "the port stayed open"
            time.sleep(0.02)
        assert exit_code(server, 10) == 0, server.output()
        # the timeout, then the app's shutdown and the interpreter's (~1 s on a busy 2-core box)
        assert time.monotonic() - signalled < 1.5 + 4
        assert "timeout graceful shutdown exceeded" in server.output()
    short.join()
    assert short.error is None and (short.received, short.finish_reason) == (6, "stop")
    long.join()
    assert long.finish_reason is None and long.received < 100
