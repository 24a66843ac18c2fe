"""The real gateway process serving the real SmolLM2 teacher, driven by the official
`openai` SDK: listing, chat (plain and streamed), completions, batching, errors and
cancellation."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Server, gateway

pytestmark = pytest.mark.integration
TEACHER = "smollm2-135m-instruct"
CONTEXT = 512


@pytest.fixture(scope="module")
def server(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "models": [
            {
                "name": TEACHER,
                "backend": "local",
                "role": "teacher",
                "path": str(teacher_dir),
                "context_length": CONTEXT,
            }
        ],
        "limits": {"max_body_bytes": 65536, "max_tokens": 256, "default_max_tokens": 64},
    }
    with gateway(config, tmp_path_factory.mktemp("teacher")) as srv:
        yield srv


@pytest.fixture
def sdk(server: Server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
        yield client


def _ask(sdk: openai.OpenAI, content: str, **kw):
    return sdk.chat.completions.create(
        model=TEACHER, messages=[{"role": "user", "content": content}], **kw
    )


def _metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_are_listed(sdk: openai.OpenAI) -> None:
    model, *router = sdk.models.list().data
    assert model.id == TEACHER and model.model_extra["max_model_len"] == CONTEXT
    assert [m.id for m in router] == [
        "auto",
        "auto:interactive",
        "auto:batch",
        "auto:exact",
        "auto:cheapest",
    ]  # the shipped policy's classes


def test_chat_answers_with_real_text(sdk: openai.OpenAI) -> None:
    out = _ask(sdk, "What is the capital of France?", temperature=0, max_tokens=20)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 20


def test_streamed_chat_matches_plain_and_reports_usage(sdk: openai.OpenAI) -> None:
    kw = {"temperature": 0, "max_tokens": 24}
    plain = _ask(sdk, "Name three colours.", **kw)
    chunks = list(
        _ask(sdk, "Name three colours.", stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len(chunks) > 5
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_stop_at_length(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model=TEACHER, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert out.choices[0].text


def test_concurrent_requests_are_batched(sdk: openai.OpenAI, server: Server) -> None:
    before = _metric(server, "distillgate_batch_size_sum", model=TEACHER)
    count = _metric(server, "distillgate_batch_size_count", model=TEACHER)
    with ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(
                lambda i: _ask(sdk, f"Count from {i} to {i + 9}.", temperature=0, max_tokens=32),
                range(4),
            )
        )
    assert all(o.choices[0].message.content for o in outs)
    sizes = _metric(server, "distillgate_batch_size_sum", model=TEACHER) - before
    n = _metric(server, "distillgate_batch_size_count", model=TEACHER) - count
    assert n == 4 and sizes / n >= 2, f"mean batch size {sizes / n}: no batch formed"


def test_error_cases_raise_the_sdk_classes(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match=TEACHER):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        _ask(sdk, "x", n=129)  # OpenAI's bound is 128
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        _ask(sdk, "x", max_tokens=257)
    assert bad.value.body["param"] == "max_tokens" and "256" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        _ask(sdk, "word " * 600, max_tokens=10)
    assert bad.value.body["code"] == "context_length_exceeded"
    assert str(CONTEXT) in bad.value.message and "10" in bad.value.message
    with pytest.raises(openai.APIStatusError) as big:
        _ask(sdk, "x" * 70_000)
    assert big.value.status_code == 413


def test_long_prompt_without_max_tokens_shrinks_to_fit(sdk: openai.OpenAI) -> None:
    out = _ask(sdk, "word " * 470)  # leaves fewer than default_max_tokens=64 in context
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= CONTEXT


def test_cancelled_stream_frees_its_slot(server: Server) -> None:
    body = {
        "model": TEACHER,
        "stream": True,
        "max_tokens": 200,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a fox."}],
    }
    cancelled = _metric(
        server, "distillgate_requests_total", endpoint="chat", model=TEACHER, outcome="cancelled"
    )
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, timeout=60
    ) as r:  # the first token waits behind a loaded machine, not 5 s
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = _metric(server, "distillgate_backend_running", model=TEACHER)
        now = _metric(
            server,
            "distillgate_requests_total",
            endpoint="chat",
            model=TEACHER,
            outcome="cancelled",
        )
        if running == 0 and now == cancelled + 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"slot not freed: running={running}, cancelled={now - cancelled}")


def test_hung_up_plain_request_frees_its_slot(server: Server) -> None:
    labels = {"endpoint": "completions", "model": TEACHER, "outcome": "cancelled"}
    before = _metric(server, "distillgate_requests_total", **labels)
    body = {"model": TEACHER, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while (
        _metric(server, "distillgate_requests_total", **labels) < before + 1
        or _metric(server, "distillgate_backend_running", model=TEACHER) > 0
    ):
        assert time.monotonic() < deadline, "the hung-up request still holds its slot"
        time.sleep(0.05)


def test_auto_routes_through_the_sdk_with_the_shipped_policy(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4
    )
    reply = raw.parse()
    assert reply.model == TEACHER and reply.choices[0].message.content
    assert raw.headers["x-distillgate-model"] == TEACHER
    assert raw.headers["x-distillgate-class"] == "interactive"  # the shipped default class
    assert raw.headers["x-distillgate-route-reason"]
    with pytest.raises(openai.BadRequestError, match="Unknown SLO class 'nosuch'"):
        sdk.chat.completions.create(
            model="auto:nosuch", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
