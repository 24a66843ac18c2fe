"""Structured outputs and tool calling through the gateway, with the official SDK against a
real `distillgate serve`: a tiny local Llama (constrained decoding, refuses tools) and the
instant server behind an openai backend (tools and response_format passed through, tool
calls read back whole and streamed). The router's part is tested without a server: a
model that cannot honour a request is never its candidate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import yaml
from pydantic import BaseModel, Field

from gateway.config import parse_config
from gateway.errors import Unsupported
from gateway.metrics import Metrics
from gateway.routing.domains import GENERAL, DomainDetector
from gateway.routing.policy import PolicyFile
from gateway.routing.quality import Quality, QualityTable
from gateway.routing.router import Router, _Models
from models.backends.base import Load, ModelCard
from models.store import ModelStore
from tests.servers import free_port, gateway

LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = {"role": "user", "content": "What is the weather in Paris?"}


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: int = Field(ge=0, le=9)


# -- the router: capabilities decide who is a candidate ------------------------------------


class Idle:
    """A served model as routing sees it (nothing is generated)."""

    def __init__(self, name: str, parameters: int, supports: frozenset[str]) -> None:
        self._card = ModelCard(name, "openai", parameters=parameters, supports=supports)

    def card(self) -> ModelCard:
        return self._card

    def load(self) -> Load:
        return Load()


@pytest.fixture
def router(tmp_path: Path) -> Router:
    """A teacher that does JSON, a cheap student that does nothing extra, and a mid-size
    remote model that also calls tools; all good enough for the class."""
    policy = tmp_path / "policy.yaml"
    classes = {"default": {"min_quality": 0.5}}
    policy.write_text(yaml.safe_dump({"classes": classes, "default_class": "default"}))
    models = {
        "teacher": (100, frozenset({"json_object", "json_schema"})),
        "plain": (10, frozenset()),
        "remote": (50, frozenset({"json_object", "json_schema", "tools"})),
    }
    config = parse_config({"models": [
        {"name": n, "backend": "openai", "url": "http://x",
         "role": "teacher" if n == "teacher" else "student"} for n in models]})  # fmt: skip
    backends = {n: Idle(n, p * 1_000_000, s) for n, (p, s) in models.items()}
    r = Router(config, ModelStore(tmp_path / "store"), backends, Metrics(lambda: {}),
               PolicyFile.open(policy))  # fmt: skip
    table = QualityTable({(n, GENERAL): Quality(0.8, 0.8, "measured") for n in models},
                         {GENERAL: "teacher"})  # fmt: skip
    r.models = _Models({n: None for n in models}, {}, table, DomainDetector.fit([]), 1.0)
    for n, (p, _) in models.items():
        r.estimates.prior(n, ttft_ms=p, per_token_ms=p / 10)
    return r


def route(router: Router, needs: set[str] = frozenset()):
    return router.route("hello", "auto", {}, None, 10, needs=frozenset(needs))


def test_auto_picks_the_cheapest_model_that_can_honour_the_request(router: Router) -> None:
    assert route(router).model == "plain"
    assert route(router, {"json_schema"}).model == "remote"
    assert route(router, {"tools"}).model == "remote"
    router.backends = {n: b for n, b in router.backends.items() if n != "remote"}
    assert route(router, {"json_object"}).model == "teacher"


def test_auto_with_no_capable_model_is_a_400(router: Router) -> None:
    router.backends = {n: b for n, b in router.backends.items() if n != "remote"}
    with pytest.raises(Unsupported) as info:
        route(router, {"tools"})
    assert info.value.status == 400 and "tools" in str(info.value)


# -- end to end: the SDK against a real gateway ------------------------------------------


@pytest.fixture(scope="module")
def instant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("instant") / "instant.log"
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "gateway.instant", "--port", str(port), "--model", "remote"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sdk(instant: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "models": [
            {"name": "tiny", "backend": "local", "path": str(tiny_model_dir), "role": "teacher"},
            {"name": "remote", "backend": "openai", "url": instant, "role": "student"},
        ],
        "limits": {"max_tokens": 96, "default_max_tokens": 64},
        "traffic": {"enabled": False},
    }
    with (
        gateway(config, tmp_path_factory.mktemp("structured")) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client,
    ):
        yield client


def upstream_saw(instant: str) -> dict:
    return httpx.get(f"{instant}/stats").json()["last_request"]


pytestmark = pytest.mark.slow


def test_json_schema_on_the_local_model(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="tiny", messages=[USER], temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "label", "schema": LABEL, "strict": True}},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), LABEL)


def test_parse_with_a_pydantic_model(sdk: openai.OpenAI) -> None:
    """The SDK's `.parse()`: strict json_schema from the class, parsed back into it."""
    out = sdk.chat.completions.parse(model="tiny", messages=[USER], response_format=Sentiment,
                                     temperature=0.8, seed=7)  # fmt: skip
    assert isinstance(out.choices[0].message.parsed, Sentiment)


def test_json_schema_streamed(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="tiny", messages=[USER], temperature=0.9, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": LABEL}},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), LABEL)


def test_json_object_opens_an_object(sdk: openai.OpenAI) -> None:
    """Random weights may fill a string until max_tokens; that it is a JSON object from the
    first token is the constraint's doing (the real teacher's answers: tests/integration)."""
    out = sdk.chat.completions.create(
        model="tiny", messages=[USER], temperature=0, max_tokens=8,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert out.choices[0].message.content.startswith('{"')


def test_a_schema_the_local_model_cannot_follow_is_a_400(sdk: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=[USER], response_format=fmt)
    assert info.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [WEATHER]}, "tools"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"messages": [USER, {"role": "tool", "tool_call_id": "c1", "content": "20C"}]},
         "messages[1].tool_call_id"),
    ],
)  # fmt: skip
def test_the_local_model_refuses_tools(sdk: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(**{"model": "tiny", "messages": [USER], **kwargs})
    body = info.value.body
    assert body["param"] == param and body["code"] == "unsupported_parameter"
    assert "not supported by model 'tiny'" in body["message"]


def test_tool_call_through_a_remote_model(sdk: openai.OpenAI, instant: str) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = sdk.chat.completions.create(model="remote", messages=[USER], tools=[WEATHER],
                                      tool_choice=choice, parallel_tool_calls=False)  # fmt: skip
    assert out.choices[0].finish_reason == "tool_calls"
    message = out.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"query": USER["content"]}
    sent = upstream_saw(instant)
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == choice
    assert sent["parallel_tool_calls"] is False


def test_tool_history_goes_upstream_intact(sdk: openai.OpenAI, instant: str) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    history = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "20C and sunny"},
    ]
    out = sdk.chat.completions.create(model="remote", messages=history, tools=[WEATHER],
                                      tool_choice="none")  # fmt: skip
    assert out.choices[0].message.content and out.choices[0].finish_reason != "tool_calls"
    assert upstream_saw(instant)["messages"] == history


def test_streamed_tool_call_deltas(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model="remote", messages=[USER], tools=[WEATHER],
                                         stream=True)  # fmt: skip
    pieces = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or ())]
    assert len(pieces) >= 3 and pieces[0].id and pieces[0].function.name == "get_weather"
    assert all(p.index == 0 for p in pieces) and not any(p.id for p in pieces[1:])
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"query": USER["content"]}
    # the SDK's own accumulator agrees
    with sdk.chat.completions.stream(model="remote", messages=[USER], tools=[WEATHER]) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {
        "query": USER["content"]}  # fmt: skip


def test_legacy_function_call(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(model="remote", messages=[USER],
                                      functions=[WEATHER["function"]])  # fmt: skip
    assert out.choices[0].finish_reason == "function_call"
    assert out.choices[0].message.function_call.name == "get_weather"


def test_response_format_passed_through(sdk: openai.OpenAI, instant: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL,
                                                  "strict": True}}  # fmt: skip
    sdk.chat.completions.create(model="remote", messages=[USER], response_format=fmt)
    assert upstream_saw(instant)["response_format"] == fmt


def test_auto_routes_tool_requests_to_a_model_that_calls_tools(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=[USER],
                                                        tools=[WEATHER])  # fmt: skip
    assert raw.headers["x-distillgate-model"] == "remote"
    assert raw.parse().choices[0].message.tool_calls
