"""Structured outputs on the local backend (models/backends/constrained.py): the grammar
mask with the real SmolLM2 tokenizer, and LocalBackend batches that mix constrained and
free rows on a tiny random Llama (whose free text is noise, so any valid JSON it writes is
the constraint's doing). Also the plain values tool calling carries (base.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from models.backends.base import (
    GenerationRequest,
    InvalidParams,
    OutputFormat,
    SamplingParams,
    ToolCall,
    Tools,
    merge_tool_calls,
)
from models.backends.constrained import Constraints, allowed_tokens, schema_text
from models.backends.decoding import TokenChooser, make_generator
from models.backends.local import LocalBackend

LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "score", "tags"],
    "additionalProperties": False,
}


def fmt(schema: dict | None = None) -> OutputFormat:
    if schema is None:
        return OutputFormat("json_object")
    return OutputFormat("json_schema", json.dumps(schema), name="answer", strict=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def constraints(tokenizer) -> Constraints:
    return Constraints(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


# -- the mask, with the real tokenizer ----------------------------------------------------


def test_bitmask_bits_map_to_token_ids() -> None:
    words = np.zeros(3, dtype=np.int32)
    words[0], words[2] = 1 << 5, -(2**31)  # token 5; bit 31 of word 2 = token 95
    assert allowed_tokens(words, 90).nonzero()[0].tolist() == [5]
    assert allowed_tokens(words, 96).nonzero()[0].tolist() == [5, 95]


def test_schema_text_per_type() -> None:
    assert json.loads(schema_text(fmt())) == {"type": "object"}
    assert json.loads(schema_text(fmt(LABEL))) == LABEL
    assert schema_text(OutputFormat("json_schema")) == "{}"


def sample_constrained(constraints: Constraints, f: OutputFormat, seed: int, limit=60) -> str:
    """Greedy over random logits (pure noise) through the constraint until EOS."""
    tok = constraints.tokenizer
    chooser = TokenChooser(SamplingParams(temperature=0.0), make_generator(seed),
                           constraint=constraints.create(f))  # fmt: skip
    noise = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(limit):
        token = chooser.choose(torch.randn(constraints.vocab_size, generator=noise))
        if token in constraints.eos_ids:
            return tok.decode(ids)
        ids.append(token)
    raise AssertionError(f"no EOS within {limit} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("schema", [LABEL, NESTED])
def test_noise_through_the_mask_follows_the_schema(constraints: Constraints, schema) -> None:
    for seed in range(3):
        text = sample_constrained(constraints, fmt(schema), seed)
        jsonschema.validate(json.loads(text), schema)


def allowed_texts(constraint, tokenizer, vocab_size: int) -> set[str]:
    allowed = constraint.apply(torch.zeros(vocab_size)).isfinite().nonzero().flatten()
    return {tokenizer.decode([i], skip_special_tokens=False) for i in allowed.tolist()}


def test_json_object_opens_an_object_and_ends_after_it(constraints, tokenizer) -> None:
    c = constraints.create(fmt())
    first = allowed_texts(c, tokenizer, constraints.vocab_size)
    assert first and all(t.startswith("{") for t in first), sorted(first)[:10]
    for token in tokenizer('{"a": [1, "x"]}', add_special_tokens=False)["input_ids"]:
        c.accept(token)
    assert allowed_texts(c, tokenizer, constraints.vocab_size) == {tokenizer.eos_token}


def test_no_free_whitespace(constraints: Constraints, tokenizer) -> None:
    """Between JSON tokens only the fixed separators: no newline loops."""
    c = constraints.create(fmt(LABEL))
    for token in tokenizer('{"label"', add_special_tokens=False)["input_ids"]:
        c.accept(token)
    texts = allowed_texts(c, tokenizer, constraints.vocab_size)
    assert texts and all(t.startswith(":") for t in texts), sorted(texts)[:10]


def test_a_refused_token_ends_the_answer(constraints: Constraints, tokenizer) -> None:
    c = constraints.create(fmt(LABEL))
    c.accept(tokenizer("hello", add_special_tokens=False)["input_ids"][0])
    assert allowed_texts(c, tokenizer, constraints.vocab_size) == {tokenizer.eos_token}


@pytest.mark.parametrize(
    ("schema", "param", "words"),
    [
        ({"type": "wat"}, "response_format.json_schema.schema", ["wat"]),
        ({"type": "string", "pattern": "(?<=a)b"}, "response_format.json_schema.schema",
         ["look-around"]),
    ],
)  # fmt: skip
def test_a_schema_that_cannot_be_followed_is_a_400(constraints, schema, param, words) -> None:
    with pytest.raises(InvalidParams) as info:
        constraints.create(fmt(schema))
    assert info.value.param == param
    assert all(w in str(info.value) for w in words), str(info.value)


def test_schema_that_is_not_json_is_a_400(constraints: Constraints) -> None:
    with pytest.raises(InvalidParams) as info:
        constraints.create(OutputFormat("json_schema", "{not json"))
    assert info.value.param == "response_format"


# -- LocalBackend: mixed batches ------------------------------------------------------------


@pytest.fixture
async def backend(tiny_model_dir: Path) -> AsyncIterator[LocalBackend]:
    b = LocalBackend("tiny", tiny_model_dir, max_batch_size=8)
    await b.start()
    yield b
    await b.stop()


def chat(text: str, f: OutputFormat | None = None, **params) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 48, **params},
                              response_format=f)  # fmt: skip
    return GenerationRequest("r", sampling, messages=({"role": "user", "content": text},))


async def answer(backend: LocalBackend, request: GenerationRequest) -> tuple[str, str | None]:
    chunks = [c async for c in backend.generate(request)]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


async def test_card_says_structured_outputs_not_tools(backend: LocalBackend) -> None:
    assert backend.card().supports == frozenset({"json_object", "json_schema"})


async def test_mixed_batch_constrained_and_free_rows(backend: LocalBackend) -> None:
    prompts = [f"Classify headline {i}: shares rise" for i in range(6)]
    alone = [await answer(backend, chat(p)) for p in prompts[:3]]
    together = await asyncio.gather(
        *(answer(backend, chat(p)) for p in prompts[:3]),
        *(answer(backend, chat(p, fmt(LABEL))) for p in prompts[3:5]),
        answer(backend, chat(prompts[5], fmt(NESTED), temperature=0.7, seed=3)),
    )
    assert list(together[:3]) == alone  # the free rows are untouched by their neighbours
    for (text, reason), schema in zip(together[3:], [LABEL, LABEL, NESTED], strict=True):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


async def test_streamed_constrained_answer_is_valid(backend: LocalBackend) -> None:
    request = chat("Label it.", fmt(LABEL))
    chunks = [c async for c in backend.generate(request)]
    assert len(chunks) > 2  # it really streamed
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), LABEL)


async def test_bad_schema_refused_before_queueing(backend: LocalBackend) -> None:
    with pytest.raises(InvalidParams) as info:
        await answer(backend, chat("x", fmt({"type": "wat"})))
    assert info.value.param == "response_format.json_schema.schema"
    assert backend.load().waiting == 0


async def test_tools_are_refused(backend: LocalBackend) -> None:
    tools = Tools(tools=({"type": "function", "function": {"name": "f"}},))
    request = GenerationRequest("r", SamplingParams(), messages=({"role": "user", "content": "x"},),
                                tools=tools)  # fmt: skip
    with pytest.raises(InvalidParams) as info:
        await answer(backend, request)
    assert info.value.param == "tools" and "cannot call tools" in str(info.value)


# -- the values tool calling carries ------------------------------------------------------


def test_output_format_wire_form() -> None:
    assert fmt().openai() == {"type": "json_object"}
    assert fmt(LABEL).openai() == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": LABEL, "strict": True},
    }


def test_tools_wire_form_leaves_unset_fields_out() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert Tools(tools=(tool,), tool_choice="required").openai() == {
        "tools": [tool], "tool_choice": "required"}  # fmt: skip
    assert Tools(functions=({"name": "g"},), function_call={"name": "g"},
                 parallel_tool_calls=False).openai() == {
        "functions": [{"name": "g"}], "function_call": {"name": "g"},
        "parallel_tool_calls": False}  # fmt: skip


def test_merge_tool_call_pieces() -> None:
    pieces = [
        ToolCall(0, "call_a", "get_weather", ""),
        ToolCall(1, "call_b", "get_time", '{"tz"'),
        ToolCall(0, None, None, '{"city": '),
        ToolCall(0, None, None, '"Paris"}'),
        ToolCall(1, None, None, ': "UTC"}'),
    ]
    assert merge_tool_calls(pieces) == (
        ToolCall(0, "call_a", "get_weather", '{"city": "Paris"}'),
        ToolCall(1, "call_b", "get_time", '{"tz": "UTC"}'),
    )
    legacy = [ToolCall(0, None, "f", '{"a"', legacy=True), ToolCall(0, None, None, ": 1}", True)]
    assert merge_tool_calls(legacy) == (ToolCall(0, None, "f", '{"a": 1}', legacy=True),)
