"""The litellm SDK as a client (`openai/<model>` at our `api_base`), unmodified, against a
real gateway: plain, streamed, and JSON mode."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.clients.conftest import MODEL, library

pytestmark = [
    pytest.mark.slow,
    # litellm's own types, warned about by pydantic when a stream is parsed
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
]
PIN = "litellm==1.110.2"
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def litellm() -> Any:
    # litellm fetches its model price list from the internet at import unless told to
    # use the copy it ships; tests reach nothing but loopback
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        module = library("litellm", PIN)
    return module


def _call(litellm: Any, base_url: str, **kw: Any) -> Any:
    return litellm.completion(
        model=f"openai/{MODEL}", api_base=base_url, api_key="x", messages=HI, num_retries=0, **kw
    )


def test_plain(litellm: Any, base_url: str) -> None:
    out = _call(litellm, base_url, max_tokens=5, temperature=0)
    assert isinstance(out.choices[0].message.content, str) and out.usage.completion_tokens <= 5


def test_stream(litellm: Any, base_url: str) -> None:
    chunks = list(_call(litellm, base_url, max_tokens=5, temperature=0, stream=True))
    assert chunks and any(c.choices[0].delta.content for c in chunks)


def test_json_mode(litellm: Any, base_url: str, close_early: dict[str, int]) -> None:
    json_mode = {"type": "json_object"}
    out = _call(litellm, base_url, max_tokens=32, response_format=json_mode, logit_bias=close_early)
    assert isinstance(json.loads(out.choices[0].message.content), dict)
