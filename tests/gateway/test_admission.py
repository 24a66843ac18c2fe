"""Admission control and draining (gateway/admission.py) on the real app over a scripted
backend, driven in process through its lifespan, with the official SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi import FastAPI

from gateway.admission import GracefulServer, capacity_of, mark_draining
from gateway.app import create_app
from gateway.config import parse_config
from tests.gateway.scripted import ScriptedBackend

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_capacity_is_what_the_models_hold() -> None:
    models = [
        {"name": "t", "backend": "local", "role": "teacher", "path": "/x", "max_batch_size": 8},
        {"name": "s", "backend": "openai", "url": "http://h", "max_connections": 4},
    ]
    config = parse_config({"models": models, "limits": {"queue_size": 10}})
    assert capacity_of(config) == 10 + (4 + 10)  # local: its queue; remote: + connections
    configured = parse_config({"models": models, "server": {"max_in_flight": 5}})
    assert capacity_of(configured) == 5


def test_server_settings_are_checked() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"server\.shutdown_timeout_s"):
        parse_config({"models": [{"name": "m", "backend": "openai", "url": "http://h"}],
                      "server": {"shutdown_timeout_s": 0}})  # fmt: skip


@contextlib.asynccontextmanager
async def serving(backend: ScriptedBackend, max_in_flight: int) -> AsyncIterator[FastAPI]:
    """The app over `backend`, its lifespan entered and its models ready."""
    config = parse_config({
        "models": [{"name": backend.name, "backend": "openai", "url": "http://127.0.0.1:9"}],
        "traffic": {"enabled": False},
        "server": {"max_in_flight": max_in_flight},
    })  # fmt: skip
    app = create_app(config, factory=lambda m: backend)
    async with app.router.lifespan_context(app):
        async with client(app) as http:
            for _ in range(200):
                if (await http.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
        yield app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver")


def sdk(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
    )


async def until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_past_capacity_is_429_at_once_and_capacity_frees_up() -> None:
    backend = ScriptedBackend("m", delay_s=0.1)  # 4 pieces: 0.4 s a request
    async with serving(backend, max_in_flight=2) as app, client(app) as http:
        api = sdk(http)
        held = [
            asyncio.ensure_future(api.chat.completions.create(model="m", messages=CHAT["messages"]))
            for _ in range(2)
        ]
        await until(lambda: backend.running == 2)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(openai.RateLimitError) as caught:
            await api.chat.completions.create(model="m", messages=CHAT["messages"])
        assert loop.time() - began < 0.1  # not behind the held requests' 0.4 s
        response = caught.value.response
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "server.max_in_flight" in error["message"]
        # everything that does not reach a model is never refused
        for path in ("/health", "/ready", "/v1/models", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        answers = await asyncio.gather(*held)
        assert [a.choices[0].message.content for a in answers] == ["Hello, world!"] * 2
        assert (await http.post("/v1/completions", json={"model": "m", "prompt": "x"})).is_success
        metrics = (await http.get("/metrics")).text
    assert 'distillgate_rejected_total{reason="capacity"} 1.0' in metrics
    assert 'distillgate_errors_total{model="",type="rate_limit_error"} 1.0' in metrics
    assert "distillgate_admitted_requests 0.0" in metrics
    assert "distillgate_admission_capacity 2.0" in metrics


async def test_a_refusal_reads_no_body() -> None:
    """The 429 is written before the body is read: a client still uploading a large body
    (here: a receive that never returns) is answered at once."""
    backend = ScriptedBackend("m", stall_after=0, stall_s=30)
    async with serving(backend, max_in_flight=1) as app, client(app) as http:
        held = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await until(lambda: backend.running == 1)
        sent: list[dict] = []
        reads = 0

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                        (b"content-length", b"100000000")],
            "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        }  # fmt: skip
        await asyncio.wait_for(app(scope, receive, send), 1.0)
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
    assert reads == 0
    assert sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b'"rate_limit_exceeded"' in sent[1]["body"]


async def test_a_cancelled_request_frees_its_place() -> None:
    backend = ScriptedBackend("m", stall_after=0, stall_s=30)
    async with serving(backend, max_in_flight=1) as app, client(app) as http:
        held = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await until(lambda: backend.running == 1)
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 429
        held.cancel()  # the client went away
        with contextlib.suppress(asyncio.CancelledError):
            await held
        await until(lambda: backend.running == 0)
        backend.stall_after = None
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_draining_ready_is_503_and_answers_close_their_connection() -> None:
    async with serving(ScriptedBackend("m"), max_in_flight=4) as app, client(app) as http:
        mark_draining(app)
        ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["error"]["code"] == "service_unavailable"
        assert "shutting down" in ready.json()["error"]["message"]
        answer = await http.post("/v1/chat/completions", json=CHAT)  # still served
        assert answer.status_code == 200 and answer.headers["connection"] == "close"
        assert (await http.get("/health")).status_code == 200  # alive, just leaving


def test_sigterm_drains_then_exits_without_reraising() -> None:
    """GracefulServer's signal handling, without serving: a SIGTERM marks the gateway
    draining and ends the main loop after `drain_s`; it is not re-raised at the end (so
    the exit code is 0), a SIGINT is (Ctrl+C ends as uvicorn ends it)."""
    import uvicorn

    drained: list[bool] = []
    server = GracefulServer(
        uvicorn.Config(FastAPI()), drain_s=0.05, on_drain=lambda: drained.append(True)
    )
    server.handle_exit(signal.SIGTERM, None)
    assert drained == [True] and not server.should_exit
    assert server._captured_signals == []
    assert asyncio.run(server.on_tick(1)) is False  # still draining
    asyncio.run(asyncio.sleep(0.06))
    assert asyncio.run(server.on_tick(1)) is True
    server.handle_exit(signal.SIGINT, None)  # a second signal: stop waiting
    assert server.should_exit and server.force_exit and drained == [True]

    ctrl_c = GracefulServer(uvicorn.Config(FastAPI()), drain_s=0, on_drain=lambda: None)
    ctrl_c.handle_exit(signal.SIGINT, None)
    assert ctrl_c._captured_signals == [signal.SIGINT]


async def test_a_client_that_goes_away_frees_the_model_and_is_not_an_error() -> None:
    """The body is read, the model starts, then the client disconnects: the generation is
    cancelled (its slot freed), the app returns normally (uvicorn logs no 'Exception in
    ASGI application') and the request counts as cancelled."""
    backend = ScriptedBackend("m", stall_after=0, stall_s=30)
    async with serving(backend, max_in_flight=4) as app, client(app) as http:
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await until(lambda: backend.running == 1)
            return {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        }  # fmt: skip
        await asyncio.wait_for(app(scope, receive, send), 5.0)  # returns, no exception
        assert (backend.cancelled, backend.running) == (1, 0)
        assert sent[0]["status"] == 499
        metrics = (await http.get("/metrics")).text
        assert 'endpoint="chat",model="m",outcome="cancelled"} 1.0' in metrics
