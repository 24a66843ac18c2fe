"""The one error path: every error answered in OpenAI's shape and counted once (under its
model once a request reached one), the stream idle timeout, and start-up failures logged
once with their traceback."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from gateway.errors import param_path
from models.backends.base import InvalidParams, Overloaded
from tests.gateway.scripted import ScriptedBackend, scripted_app, wait_ready

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def _errors(http: TestClient) -> dict[tuple[str, str], float]:
    """distillgate_errors_total as {(model, type): count}."""
    found = re.findall(
        r'distillgate_errors_total\{model="([^"]*)",type="([^"]*)"\} (\S+)',
        http.get("/metrics").text,
    )
    return {(m, t): float(v) for m, t, v in found}


def _stream_events(http: TestClient, body: dict) -> list[str]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [e[6:] for e in r.read().decode().split("\n\n") if e]


def test_each_error_is_counted_once_under_its_model() -> None:
    backend = ScriptedBackend("tiny")
    with scripted_app({"tiny": backend}) as http:
        wait_ready(http)
        assert http.post("/v1/chat/completions", json={**CHAT, "n": 0}).status_code == 400
        assert http.post("/v1/chat/completions", json={**CHAT, "model": "x"}).status_code == 404
        backend.fail_before = Overloaded("full")
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 429
        backend.fail_before = InvalidParams(
            "token id 99999 is outside the vocabulary", "logit_bias"
        )
        r = http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
        assert r.headers["x-distillgate-model"] == "tiny"
        backend.fail_before, backend.fail_after = None, 1
        events = _stream_events(http, CHAT)
        assert json.loads(events[-2])["error"]["type"] == "internal_server_error"
        assert _errors(http) == {
            ("", "invalid_request_error"): 2.0,  # never reached a model
            ("tiny", "rate_limit_error"): 1.0,
            ("tiny", "invalid_request_error"): 1.0,
            ("tiny", "internal_server_error"): 1.0,
        }
        text = http.get("/metrics").text
        assert 'endpoint="chat",model="tiny",outcome="client_error"} 2.0' in text
        assert 'endpoint="chat",model="tiny",outcome="server_error"} 1.0' in text
        assert 'distillgate_requests_in_flight{model="tiny"} 0.0' in text


def test_stream_idle_timeout_ends_with_error_then_done() -> None:
    backend = ScriptedBackend("tiny", stall_after=2)
    with scripted_app({"tiny": backend}, stream_idle_timeout_s=0.2) as http:
        wait_ready(http)
        started = time.monotonic()
        events = _stream_events(http, CHAT)
        assert time.monotonic() - started < 10  # not the backend's 30 s stall
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "timeout")
        assert "limits.stream_idle_timeout_s=0.2" in error["message"]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert text == "Hello, "
        # the backend's generation was closed, so its slot is free again
        assert (backend.cancelled, backend.running) == (1, 0)
        assert _errors(http) == {("tiny", "service_unavailable"): 1.0}


def test_stream_idle_timeout_closes_every_choice() -> None:
    backend = ScriptedBackend("tiny", stall_after=1)
    with scripted_app({"tiny": backend}, stream_idle_timeout_s=0.2) as http:
        wait_ready(http)
        events = _stream_events(http, {**CHAT, "n": 3})
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert (backend.cancelled, backend.running) == (3, 0)


def test_no_first_token_within_idle_timeout_is_503() -> None:
    backend = ScriptedBackend("tiny", stall_after=0)
    with scripted_app({"tiny": backend}, stream_idle_timeout_s=0.2) as http:
        wait_ready(http)
        r = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        assert (backend.cancelled, backend.running) == (1, 0)


def test_failed_choice_cancels_the_others() -> None:
    class OneFails(ScriptedBackend):
        async def generate(self, request):
            if request.request_id.endswith("-1"):
                raise Overloaded("full")
            async for chunk in super().generate(request):
                yield chunk

    backend = OneFails("tiny", delay_s=0.05)
    with scripted_app({"tiny": backend}) as http:
        wait_ready(http)
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json={**CHAT, "n": 3, "stream": stream})
            assert r.status_code == 429
        assert backend.running == 0 and backend.cancelled == 4


def test_start_up_failure_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptedBackend):
        async def start(self) -> None:
            raise OSError("weights unreadable: model.safetensors")

    config = parse_config({"models": [{"name": "tiny", "backend": "openai", "url": "http://x"}]})
    reasons: list[str] = []
    app = create_app(config, factory=lambda m: Broken(m.name), on_failure=reasons.append)
    with caplog.at_level(logging.ERROR, "distillgate"), TestClient(app) as http:
        for _ in range(200):
            if reasons:
                break
            time.sleep(0.01)
        r = http.get("/health")
    assert r.status_code == 503 and "weights unreadable" in r.json()["error"]["message"]
    assert reasons == ["could not start tiny: weights unreadable: model.safetensors"]
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and "None" not in logged[0].getMessage()
    assert "Traceback" in caplog.text and "in start" in caplog.text  # Broken.start's frame
    assert "OSError: weights unreadable" in caplog.text


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "stop", "list[str]", 4), "stop[4]"),
        (("body", "stop", "str"), "stop"),
        (("body", "logit_bias", "50256"), "logit_bias.50256"),
        (("body",), ""),
    ],
)
def test_param_paths_read_like_openai(loc: tuple, param: str) -> None:
    assert param_path(loc) == param
