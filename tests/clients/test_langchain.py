"""LangChain's `ChatOpenAI` (langchain-openai), unmodified, against a real gateway: invoke,
stream, batch, ainvoke, the Responses API path, and `with_structured_output` in its
json_schema and json_mode methods."""

from __future__ import annotations

from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel

from tests.clients.conftest import MODEL, library

pytestmark = pytest.mark.slow
PIN = "langchain-openai==1.8.1"


class Label(BaseModel):
    label: Literal["up", "down"]  # an enum: the decoder must close the string at once


@pytest.fixture(scope="module")
def chat_openai(base_url: str) -> Any:
    def make(**kw: Any) -> Any:
        ChatOpenAI = library("langchain_openai", PIN).ChatOpenAI
        kw = {"max_tokens": 6, **kw}
        return ChatOpenAI(model=MODEL, base_url=base_url, api_key="x", max_retries=0, **kw)

    return make


def test_invoke_stream_batch(chat_openai: Any) -> None:
    llm = chat_openai(temperature=0)
    reply = llm.invoke("Say hi.")
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] <= 6
    chunks = list(llm.stream("Say hi."))
    assert "".join(c.content for c in chunks) == reply.content  # greedy: the same answer
    assert [r.content for r in llm.batch(["Say hi.", "Say hi."])] == [reply.content] * 2


async def test_ainvoke(chat_openai: Any) -> None:
    # our own client, closed on this test's event loop (LangChain's default one is shared
    # by the process and would outlive the loop)
    async with httpx.AsyncClient() as client:
        reply = await chat_openai(temperature=0, http_async_client=client).ainvoke("Say hi.")
    assert isinstance(reply.content, str)


def test_responses_api(chat_openai: Any) -> None:
    reply = chat_openai(use_responses_api=True).invoke("Say hi.")
    assert reply.response_metadata["status"] in ("completed", "incomplete")
    assert reply.usage_metadata["output_tokens"] <= 6


def test_structured_output_json_schema(chat_openai: Any) -> None:
    llm = chat_openai(temperature=0, max_tokens=32)
    out = llm.with_structured_output(Label, method="json_schema").invoke("Up or down?")
    assert isinstance(out, Label)


def test_structured_output_json_mode(chat_openai: Any, close_early: dict[str, int]) -> None:
    llm = chat_openai(temperature=0, max_tokens=32, logit_bias=close_early)
    out = llm.with_structured_output(method="json_mode").invoke("Answer in JSON.")
    assert isinstance(out, dict)
