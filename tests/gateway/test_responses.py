"""POST /v1/responses against scripted backends, with the official SDK: the response
object, `output_text`, the stream's events in OpenAI's order, routing with `auto`, the
traffic log, and a clear 400 for every field a stateless text gateway cannot honour."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from gateway.adapt.log import TrafficLog
from models.backends.base import BackendError, GenerationChunk, GenerationRequest, ModelCard
from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready


class Label(BaseModel):
    label: str


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend("tiny")


@pytest.fixture
def http(backend: ScriptedBackend):
    with scripted_app({"tiny": backend}, max_tokens=100, default_max_tokens=50) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return sdk_for(http)


def test_text_in_text_out(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    out = sdk.responses.create(
        model="tiny",
        input="hi",
        instructions="Be brief.",
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        metadata={"team": "a"},
    )
    assert out.object == "response" and out.status == "completed" and out.model == "tiny"
    assert out.output_text == "Hello, world!"
    (item,) = out.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text"
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.total_tokens) == (3, 4, 7)
    assert out.instructions == "Be brief." and out.metadata == {"team": "a"}
    seen = backend.seen[-1]
    assert seen.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    )
    assert (seen.params.max_tokens, seen.params.temperature, seen.params.top_p) == (7, 0.5, 0.9)


def test_counted_under_its_own_endpoint(sdk: openai.OpenAI, http: TestClient) -> None:
    sdk.responses.create(model="tiny", input="hi")
    text = http.get("/metrics").text
    assert (
        'distillgate_requests_total{endpoint="responses",model="tiny",outcome="success"} 1.0'
        in text
    )


def test_message_items_and_history(sdk: openai.OpenAI, backend: ScriptedBackend) -> None:
    sdk.responses.create(
        model="tiny",
        input=[
            {"role": "developer", "content": "Label it."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A"}]},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg-1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "B", "annotations": []}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "C"},
                                         {"type": "input_text", "text": "D"}]},
        ],
    )  # fmt: skip
    assert backend.seen[-1].messages == (
        {"role": "developer", "content": "Label it."},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "CD"},
    )
    assert backend.seen[-1].params.max_tokens == 50  # limits.default_max_tokens


class Truncating(ScriptedBackend):
    """Stops at max_output_tokens, as a model that would say more does."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.seen.append(request)
        yield GenerationChunk(
            text="a", finish_reason="length", prompt_tokens=2, completion_tokens=1
        )


def test_length_is_incomplete() -> None:
    with scripted_app({"tiny": Truncating("tiny")}) as http:
        wait_ready(http)
        sdk = sdk_for(http)
        out = sdk.responses.create(model="tiny", input="hi", max_output_tokens=1)
        assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
        assert out.output[0].status == "incomplete" and out.output_text == "a"
        events = list(sdk.responses.create(model="tiny", input="hi", stream=True))
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.output_text == "a"


EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_stream_events(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model="tiny", input="hi", stream=True))
    assert [e.type for e in events] == EVENTS
    assert [e.sequence_number for e in events] == list(range(len(EVENTS)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        "Hello, world!"
    )
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "Hello, world!"
    assert done.usage.output_tokens == 4 and done.id == events[0].response.id


def test_stream_helper(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model="tiny", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello, world!"


def test_stream_wire_format(http: TestClient) -> None:
    """Each event named after its type, as OpenAI sends them, and no `[DONE]`."""
    body = {"model": "tiny", "input": "hi", "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as r:
        raw = "".join(r.iter_text())
    frames = [f for f in raw.split("\n\n") if f]
    assert "[DONE]" not in raw
    for frame in frames:
        name, data = frame.split("\n")
        assert name.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]


def test_failure_mid_stream_is_error_then_failed(
    backend: ScriptedBackend, sdk: openai.OpenAI
) -> None:
    backend.fail_after = 2
    events = list(sdk.responses.create(model="tiny", input="hi", stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-2].code == "server_error"
    assert events[-1].response.status == "failed" and events[-1].response.error.message


def test_failure_before_output_is_http_error(backend: ScriptedBackend, sdk: openai.OpenAI) -> None:
    backend.fail_before = BackendError("the model worker died")
    with pytest.raises(openai.InternalServerError):
        sdk.responses.create(model="tiny", input="hi", stream=True)


def test_logprobs(sdk: openai.OpenAI) -> None:
    out = sdk.responses.create(
        model="tiny", input="hi", include=["message.output_text.logprobs"], top_logprobs=2
    )
    logprobs = out.output[0].content[0].logprobs
    assert [t.token for t in logprobs] == ["Hello", ", ", "world", "!"]
    assert [a.token for a in logprobs[0].top_logprobs] == ["alt0", "alt1"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "name": "f", "parameters": {}}]),
        ("tool_choice", "required"),
        ("previous_response_id", "resp-1"),
        ("store", True),
        ("background", True),
        ("conversation", "conv-1"),
        ("prompt", {"id": "pmpt-1"}),
        ("reasoning", {"effort": "high"}),
        ("truncation", "auto"),
    ],
)
def test_unsupported_fields_are_clear_400s(sdk: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model="tiny", input="hi", **{field: value})
    assert err.value.body["code"] == "unsupported_parameter"
    assert err.value.body["param"] == field and field in err.value.body["message"]


@pytest.mark.parametrize(
    ("input_", "param", "code"),
    [
        ([], "input", "invalid_value"),
        ([{"type": "function_call_output", "call_id": "c", "output": "x"}], "input[0].type",
         "unsupported_parameter"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
         "input[0].content[0]", "unsupported_parameter"),
        ([{"role": "robot", "content": "x"}], "input[0].role", "invalid_value"),
        (["hi"], "input[0]", "invalid_value"),
    ],
)  # fmt: skip
def test_bad_input_names_param(sdk: openai.OpenAI, input_: list, param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model="tiny", input=input_)
    assert (err.value.body["param"], err.value.body["code"]) == (param, code)


def test_neutral_values_are_accepted(sdk: openai.OpenAI) -> None:
    out = sdk.responses.create(
        model="tiny", input="hi", store=False, tools=[], tool_choice="none", truncation="disabled",
        parallel_tool_calls=False, service_tier="auto", include=["reasoning.encrypted_content"],
        text={"format": {"type": "text"}}, user="u", safety_identifier="s",
    )  # fmt: skip
    assert out.output_text == "Hello, world!"


class Structured(ScriptedBackend):
    def card(self) -> ModelCard:
        return replace(super().card(), supports=frozenset({"json_object", "json_schema"}))


def test_text_format_is_response_format() -> None:
    """`text.format` is chat's `response_format`: passed to a model that supports it
    (`responses.parse` sends a pydantic model's schema), a 400 for one that does not."""
    structured, plain = (
        Structured("structured", pieces=('{"label": "up"}',)),
        ScriptedBackend("plain"),
    )
    with scripted_app({"structured": structured, "plain": plain}) as http:
        wait_ready(http)
        sdk = sdk_for(http)
        out = sdk.responses.parse(model="structured", input="hi", text_format=Label)
        assert out.output_parsed == Label(label="up")
        fmt = structured.seen[-1].params.response_format
        assert fmt.type == "json_schema" and fmt.name == "Label" and fmt.strict
        assert json.loads(fmt.schema)["properties"]["label"]["type"] == "string"
        assert out.text.format.type == "json_schema" and out.text.format.name == "Label"
        sdk.responses.create(
            model="structured", input="hi", text={"format": {"type": "json_object"}}
        )
        assert structured.seen[-1].params.response_format.type == "json_object"
        with pytest.raises(openai.BadRequestError) as err:
            sdk.responses.create(
                model="plain", input="hi", text={"format": {"type": "json_object"}}
            )
        assert err.value.body["param"] == "text.format" and "plain" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            sdk.responses.create(
                model="structured",
                input="hi",
                text={"format": {"type": "json_schema", "name": "x"}},
            )
        assert err.value.body["param"] == "text.format.schema"


def test_limits_and_types_are_checked(sdk: openai.OpenAI, http: TestClient) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model="tiny", input="hi", max_output_tokens=101)
    assert err.value.body["param"] == "max_output_tokens" and "100" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="nope", input="hi")
    r = http.post("/v1/responses", json={"model": "tiny", "input": "hi", "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/responses", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_auto_is_routed_and_recorded(tmp_path: Path) -> None:
    big, small = ScriptedBackend("big"), ScriptedBackend("small")
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    traffic = {"dsn": url, "flush_interval_s": 0.05, "audit": {"share": 0.0}}
    with scripted_app(
        {"big": big, "small": small}, roles={"big": "teacher"}, traffic=traffic
    ) as http:
        wait_ready(http)
        raw = sdk_for(http).responses.with_raw_response.create(model="auto", input="Headline: x")
        out = raw.parse()
        assert out.output_text == "Hello, world!" and out.model in ("big", "small")
        assert raw.headers["x-distillgate-model"] == out.model
        assert raw.headers["x-distillgate-route-reason"]
    log = TrafficLog.open(url)
    try:
        for _ in range(100):
            rows = log.read(content=True)
            if rows:
                break
            time.sleep(0.05)
    finally:
        log.close()
    (row,) = [r.record for r in rows]
    assert row.requested_model == "auto" and row.model == out.model
    assert row.outcome == "success" and row.completion_tokens == 4
