"""The HTTP face against scripted backends: OpenAI shapes, SSE framing, every error
case with the exception class the official SDK raises, and the metrics."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from models.backends.base import Overloaded, PromptTooLong, Unavailable, UpstreamError
from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend("tiny")


@pytest.fixture
def http(backend: ScriptedBackend):
    with scripted_app(
        {"tiny": backend}, max_body_bytes=4096, max_tokens=100, default_max_tokens=50
    ) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return sdk_for(http)


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_chat_plain(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    out = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=["x"],
        user="u1",
    )
    assert (
        out.object == "chat.completion" and out.model == "tiny" and out.id.startswith("chatcmpl-")
    )
    assert out.choices[0].message.content == "Hello, world!"
    assert out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        3,
        4,
        7,
    )
    params = backend.seen[-1].params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (
        7,
        0.5,
        0.9,
        3,
        ("x",),
    )
    assert backend.seen[-1].messages == ({"role": "user", "content": "hi"},)


def test_chat_stream_with_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(http: TestClient) -> None:
    with http.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])


def test_completions_plain_and_stream(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    out = sdk.completions.create(model="tiny", prompt="Once", max_tokens=5)
    assert out.object == "text_completion" and out.choices[0].text == "Hello, world!"
    assert backend.seen[-1].prompt == "Once" and backend.seen[-1].messages is None
    parts = list(
        sdk.completions.create(
            model="tiny", prompt=["Once"], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == "Hello, world!"
    assert parts[-1].usage.completion_tokens == 4


def test_max_completion_tokens_wins(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=9,
        max_completion_tokens=4,
    )
    assert backend.seen[-1].params.max_tokens == 4


def test_unknown_fields_are_ignored(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json=_chat(frobnicate=True, logit_bias={}))
    assert r.status_code == 200


def test_models_list(sdk: openai.OpenAI) -> None:
    models = sdk.models.list().data
    classes = ["auto:interactive", "auto:batch", "auto:exact", "auto:cheapest"]  # deploy/policy
    assert [m.id for m in models] == ["tiny", "auto", *classes]
    assert models[0].object == "model" and models[1].role == "router"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(n=129), "n"),
        (_chat(n=65), "n"),
        (_chat(temperature=3), "temperature"),
        (_chat(top_p=0), "top_p"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_tokens=101), "max_tokens"),
        (_chat(max_completion_tokens=500), "max_completion_tokens"),
        (_chat(messages=[]), "messages"),
        (_chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (_chat(stop=""), "stop"),
        (_chat(top_logprobs=2), "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_request_names_param(sdk: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.post("/chat/completions", body=body, cast_to=object)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]


def test_limit_is_named_in_message(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json=_chat(max_tokens=101))
    assert "101" in r.json()["error"]["message"] and "100" in r.json()["error"]["message"]


def test_invalid_json_is_400_not_422(http: TestClient) -> None:
    r = http.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404_listing_models(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in info.value.message and "tiny" in info.value.message
    assert info.value.body["code"] == "model_not_found"


def test_body_over_limit_is_413(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert info.value.status_code == 413 and "4096" in info.value.message


def test_chunked_body_over_limit_is_413(http: TestClient) -> None:
    def parts():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        yield b"y" * 5000
        yield b'"}]}'

    r = http.post("/v1/chat/completions", content=parts())
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("error", "status", "cls", "retry"),
    [
        (Overloaded("queue full (64 waiting)", retry_after=2), 429, openai.RateLimitError, "2"),
        (Unavailable("worker gone"), 503, openai.InternalServerError, "5"),
        (PromptTooLong(70, 10, 64), 400, openai.BadRequestError, None),
        (
            UpstreamError(422, "bad thing", param="top_k", code="x"),
            422,
            openai.UnprocessableEntityError,
            None,
        ),
    ],
)
def test_backend_errors_map_to_sdk_classes(backend, sdk, http, error, status, cls, retry) -> None:
    backend.fail_before = error
    with pytest.raises(cls) as info:
        sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10
        )
    assert info.value.status_code == status
    assert info.value.response.headers.get("retry-after") == retry


def test_prompt_too_long_names_limit_and_value(backend, http) -> None:
    backend.fail_before = PromptTooLong(70, 10, 64)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert err["param"] == "prompt" and "64" in err["message"] and "70" in err["message"]


def test_internal_error_leaks_nothing(backend, http) -> None:
    backend.fail_before = RuntimeError("secret /home/x/path.py line 3")  # type: ignore[assignment]
    r = http.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text and "/home" not in r.text


def test_failure_mid_stream_is_error_event_then_done(backend, sdk, http) -> None:
    backend.fail_after = 2
    with http.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "internal_server_error"
    with pytest.raises(openai.APIError):
        list(
            sdk.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )


def test_route_errors_use_envelope(http: TestClient) -> None:
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_metrics(sdk: openai.OpenAI, http: TestClient, backend: ScriptedBackend) -> None:
    sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    list(
        sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    backend.fail_before = Overloaded("full")
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    text = http.get("/metrics").text
    assert 'distillgate_requests_total{endpoint="chat",model="tiny",outcome="success"} 2.0' in text
    assert 'distillgate_errors_total{model="tiny",type="rate_limit_error"} 1.0' in text
    assert 'distillgate_completion_tokens_total{model="tiny"} 8.0' in text
    assert 'distillgate_time_to_first_token_seconds_count{model="tiny"} 2.0' in text
    assert 'distillgate_queue_depth{model="tiny"} 0.0' in text
    assert 'distillgate_requests_in_flight{model="tiny"} 0.0' in text


def test_metrics_check_health_and_capacity_at_scrape() -> None:
    """distillgate_model_ready follows each backend's health at every scrape; the queue
    capacity is exported for backends that queue; the version is labelled."""
    queued, remote = ScriptedBackend("queued", capacity=64), ScriptedBackend("remote")
    with scripted_app({"queued": queued, "remote": remote}) as http:
        wait_ready(http)
        text = http.get("/metrics").text
        assert 'distillgate_model_ready{model="queued"} 1.0' in text
        assert 'distillgate_model_ready{model="remote"} 1.0' in text
        assert 'distillgate_queue_capacity{model="queued"} 64.0' in text
        assert 'distillgate_queue_capacity{model="remote"}' not in text
        assert "distillgate_build_info{version=" in text
        remote.healthy = False
        text = http.get("/metrics").text
        assert 'distillgate_model_ready{model="remote"} 0.0' in text
        assert 'distillgate_model_ready{model="queued"} 1.0' in text


def test_not_ready_is_503() -> None:
    class Slow(ScriptedBackend):
        async def start(self) -> None:
            import asyncio

            await asyncio.sleep(60)

    with scripted_app({"tiny": Slow("tiny")}) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert 'distillgate_model_ready{model="tiny"} 0.0' in client.get("/metrics").text
