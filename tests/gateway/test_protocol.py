"""OpenAI's request fields through the app with a scripted backend: each one implemented
(penalties, logit_bias, logprobs, n) or, unless at its neutral value, a 400 naming it;
messages checked per role; GET /v1/models/{id}."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready

USER = {"role": "user", "content": "hi"}


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend("tiny")


@pytest.fixture
def http(backend: ScriptedBackend):
    with scripted_app(
        {"tiny": backend}, max_tokens=100, default_max_tokens=50, queue_size=8
    ) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return sdk_for(http)


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [USER], **kw}


def _completion(**kw) -> dict:
    return {"model": "tiny", "prompt": "Once", **kw}


def _events(http: TestClient, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        raw = [e[6:] for e in r.read().decode().split("\n\n") if e]
    assert raw[-1] == "[DONE]"
    return [json.loads(e) for e in raw[:-1]]


def _error(http: TestClient, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


UNSUPPORTED_CHAT = [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
    ("service_tier", "flex"),
    ("store", True),
    ("verbosity", "low"),
    ("web_search_options", {}),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED_CHAT)
def test_unsupported_chat_fields_are_named(http: TestClient, field: str, value: object) -> None:
    err = _error(http, "/v1/chat/completions", _chat(**{field: value}))
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    assert "not supported" in err["message"] and field in err["message"]


def test_neutral_values_are_accepted(http: TestClient, backend: ScriptedBackend) -> None:
    body = _chat(
        response_format={"type": "text"},
        store=False,
        parallel_tool_calls=True,
        tools=[],
        tool_choice="none",
        function_call="none",
        metadata={"team": "a"},
        modalities=["text"],
        service_tier="auto",
        verbosity="medium",
        user="u1",
        safety_identifier="s1",
        prompt_cache_key="k",
        reasoning_effort=None,
        stream_options=None,
        some_vendor_field={"ignored": True},
    )
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (_chat(presence_penalty=2.5), "presence_penalty", ["2"]),
        (_chat(frequency_penalty=-3), "frequency_penalty", ["-2", "-3"]),
        (_chat(logit_bias={"abc": 1}), "logit_bias", ["integer", "abc"]),
        (_chat(logit_bias={"5": 101}), "logit_bias.5", ["100", "101"]),
        (_chat(logprobs=True, top_logprobs=21), "top_logprobs", ["20", "21"]),
        (_chat(top_logprobs=3), "top_logprobs", ["logprobs"]),
        (_chat(logprobs=False, top_logprobs=0), "top_logprobs", ["logprobs"]),
        (_chat(n=0), "n", ["1"]),
        (_chat(n=9), "n", ["limits.queue_size", "8", "9"]),
        (_chat(response_format={"type": "bogus"}), "response_format.type", ["bogus"]),
        (_chat(service_tier="gold"), "service_tier", ["gold"]),
        (_chat(stream_options={"include_usage": True}), "stream_options", ["stream"]),
    ],
)
def test_ranges_and_invalid_values(http: TestClient, body: dict, param: str, words) -> None:
    err = _error(http, "/v1/chat/completions", body)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert all(w in err["message"] for w in words), err["message"]


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ([{"role": "user"}], "messages[0].content", ["required", "user"]),
        ([{"role": "user", "content": None}], "messages[0].content", ["required"]),
        ([{"role": "system"}, USER], "messages[0].content", ["required", "system"]),
        ([{"role": "developer"}, USER], "messages[0].content", ["required"]),
        ([USER, {"role": "assistant"}], "messages[1].content", ["required", "assistant"]),
        (
            [USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}],
            "messages[1].tool_calls",
            ["not supported"],
        ),
        ([USER, {"role": "tool", "content": "42"}], "messages[1].tool_call_id", ["required"]),
        (
            [USER, {"role": "tool", "content": "42", "tool_call_id": "c1"}],
            "messages[1].tool_call_id",
            ["not supported"],
        ),
        ([{"role": "function", "name": "f", "content": "1"}], "messages[0].role", ["function"]),
        ([{"role": "wizard", "content": "x"}], "messages[0].role", ["wizard"]),
        ([{"role": "user", "content": []}], "messages[0].content", ["empty"]),
        ([{"role": "user", "content": 7}], "messages[0].content", ["string"]),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}],
            "messages[0].content[1]",
            ["video"],
        ),
    ],
)
def test_messages_checked_per_role(http: TestClient, messages, param: str, words) -> None:
    err = _error(http, "/v1/chat/completions", _chat(messages=messages))
    assert err["param"] == param, err
    assert all(w in err["message"] for w in words), err["message"]


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "f1"}}, "file"),
    ],
)
def test_media_parts_are_refused_plainly(sdk: openai.OpenAI, part: dict, kind: str) -> None:
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}])
    assert info.value.body["param"] == "messages[0].content[1]"
    assert info.value.body["message"] == f"{kind} input is not supported by this model."


def test_text_parts_are_joined(http: TestClient, backend: ScriptedBackend) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = _chat(messages=[{"role": "system", "content": parts}, USER])
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert backend.seen[-1].messages == ({"role": "system", "content": "ab"}, USER)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_completion(best_of=2), "best_of"),
        (_completion(n=2, best_of=3), "best_of"),
        (_completion(echo=True), "echo"),
        (_completion(suffix="end"), "suffix"),
        (_completion(logprobs=6), "logprobs"),
        (_completion(logprobs=-1), "logprobs"),
        (_completion(prompt=[1, 2, 3]), "prompt"),
        (_completion(prompt=[[1, 2]]), "prompt"),
        (_completion(prompt=["a", "b"]), "prompt"),
        (_completion(presence_penalty=-2.1), "presence_penalty"),
    ],
)
def test_completions_fields(http: TestClient, body: dict, param: str) -> None:
    assert _error(http, "/v1/completions", body)["param"] == param


def test_sampling_fields_reach_the_backend(http: TestClient, backend: ScriptedBackend) -> None:
    body = _chat(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": -100, "42": 3})
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    params = backend.seen[-1].params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((7, -100.0), (42, 3.0))
    assert (params.logprobs, params.top_logprobs) == (False, 0)
    http.post("/v1/completions", json=_completion(logprobs=0, best_of=1))
    assert (backend.seen[-1].params.logprobs, backend.seen[-1].params.top_logprobs) == (True, 0)


def test_chat_n_choices(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    out = sdk.chat.completions.create(model="tiny", messages=[USER], n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert {c.message.content for c in out.choices} == {"Hello, world!"}
    # the prompt is counted once, as OpenAI does; completions add up
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 12)
    seen = backend.seen[-3:]
    assert sorted(r.params.seed for r in seen) == [5, 6, 7]
    assert len({r.request_id for r in seen}) == 3


def test_chat_n_stream(http: TestClient) -> None:
    body = _chat(n=2, stream_options={"include_usage": True})
    events = _events(http, "/v1/chat/completions", body)
    texts, roles, finishes = {0: "", 1: ""}, [], []
    for e in events[:-1]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        roles += [choice["index"]] if choice["delta"].get("role") else []
        finishes += [choice["index"]] if choice["finish_reason"] else []
    assert texts == {0: "Hello, world!", 1: "Hello, world!"}
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    assert events[-1]["usage"]["prompt_tokens"] == 3


def test_chat_logprobs(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(model="tiny", messages=[USER], logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", ", ", "world", "!"]
    assert content[0].logprob == pytest.approx(-0.1) and content[0].bytes == list(b"Hello")
    assert [a.token for a in content[2].top_logprobs] == ["alt0", "alt1"]
    assert content[2].top_logprobs[1].logprob == pytest.approx(-0.3 - 2.0)
    plain = sdk.chat.completions.create(model="tiny", messages=[USER])
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_stream(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="tiny", messages=[USER], logprobs=True, top_logprobs=1, stream=True
        )
    )
    tokens = [
        t.token
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert tokens == ["Hello", ", ", "world", "!"]


def test_completion_logprobs_legacy_shape(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model="tiny", prompt="Once", logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["Hello", ", ", "world", "!"]
    assert lp.token_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert lp.text_offset == [0, 5, 7, 12]
    # the alternatives and, as OpenAI's, the chosen token
    assert lp.top_logprobs[0] == pytest.approx({"alt0": -1.1, "alt1": -2.1, "Hello": -0.1})
    only = sdk.completions.create(model="tiny", prompt="Once", logprobs=0).choices[0].logprobs
    assert only.top_logprobs[1] == pytest.approx({", ": -0.2})


def test_completion_logprobs_stream_offsets_continue(http: TestClient) -> None:
    events = _events(http, "/v1/completions", _completion(logprobs=1, n=2))
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for e in events:
        (choice,) = e["choices"]
        if choice["logprobs"]:
            offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    assert offsets == {0: [0, 5, 7, 12], 1: [0, 5, 7, 12]}


def test_retrieve_model(sdk: openai.OpenAI) -> None:
    model = sdk.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "distillgate")
    assert sdk.models.retrieve("auto:batch").model_extra["role"] == "router"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-9")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    assert "gpt-9" in info.value.message and "tiny" in info.value.message
