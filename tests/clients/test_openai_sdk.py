"""The official `openai` SDK, unmodified, against a real gateway: sync and async clients,
streaming, `with_raw_response`, `.parse()` with a pydantic model, and the Responses API."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.clients.conftest import MODEL

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Say hi."}]


class Label(BaseModel):
    label: Literal["up", "down"]  # an enum: the decoder must close the string at once


@pytest.fixture(scope="module")
def sdk(base_url: str):
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        yield client


def test_chat_and_completions(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, seed=1)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 5
    text = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=4, seed=1)
    assert text.choices[0].text and text.usage.completion_tokens <= 4


def test_streaming(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
    assert any(c.choices and c.choices[0].delta.content for c in chunks)


async def test_async_client(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        out = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        assert out.choices[0].finish_reason in ("stop", "length")
        stream = await client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=4, stream=True
        )
        assert [c async for c in stream]
        answer = await client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4)
        assert answer.output_text is not None


def test_with_raw_response(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=3)
    assert raw.status_code == 200 and raw.headers["x-distillgate-model"] == MODEL
    assert raw.parse().model == MODEL


def test_parse_with_a_pydantic_model(sdk: openai.OpenAI) -> None:
    """response_format json_schema from the model (text.format for Responses): the
    constrained decoder makes even a random model's answer valid."""
    out = sdk.chat.completions.parse(
        model=MODEL, messages=HI, response_format=Label, max_tokens=32, temperature=0
    )
    assert isinstance(out.choices[0].message.parsed, Label)
    answer = sdk.responses.parse(
        model=MODEL, input="Up or down?", text_format=Label, max_output_tokens=32, temperature=0
    )
    assert isinstance(answer.output_parsed, Label)


def test_responses_api(sdk: openai.OpenAI) -> None:
    out = sdk.responses.create(
        model=MODEL, input="Say hi.", instructions="Be brief.", max_output_tokens=4
    )
    assert out.status in ("completed", "incomplete") and out.usage.output_tokens <= 4
    assert out.output_text == out.output[0].content[0].text
    with sdk.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=4) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert deltas
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL, input="hi", previous_response_id="resp-1")
    assert err.value.body["code"] == "unsupported_parameter"
