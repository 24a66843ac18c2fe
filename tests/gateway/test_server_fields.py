"""The request fields end to end: the official `openai` SDK against a real `distillgate
serve` process with a tiny random Llama: n=2, logprobs on both endpoints, the penalties
and logit_bias, and rejected fields as BadRequestError naming them."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.servers import gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdk(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "models": [{"name": "tiny", "backend": "local", "path": str(tiny_model_dir)}],
        "limits": {"max_tokens": 64, "default_max_tokens": 8},
    }
    with (
        gateway(config, tmp_path_factory.mktemp("fields")) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client,
    ):
        yield client


def test_n_choices(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6, seed=1
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 12  # both choices, random weights never stop early
    stream = sdk.completions.create(model="tiny", prompt="Hi", n=2, max_tokens=4, stream=True)
    finished = sorted(c.choices[0].index for c in stream if c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_chat_logprobs(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)


def test_completion_logprobs(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model="tiny", prompt="Hi", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0
    assert all(t in d for t, d in zip(lp.tokens, lp.top_logprobs, strict=True))


def test_logit_bias_forces_a_token(sdk: openai.OpenAI, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    word = AutoTokenizer.from_pretrained(tiny_model_dir).decode([1000])
    out = sdk.completions.create(
        model="tiny", prompt="Hi", max_tokens=4, temperature=0, logprobs=0,
        logit_bias={"1000": 100},
    )  # fmt: skip
    assert out.choices[0].logprobs.tokens == [word] * 4
    plain = sdk.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert plain.choices[0].text != word * 4


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_rejected_fields_name_their_param(sdk: openai.OpenAI, kwargs: dict, param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(**body)
    assert info.value.body["param"] == param
