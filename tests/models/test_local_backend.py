"""LocalBackend on real models: a tiny random Llama with the real SmolLM2 tokenizer for the
mechanics (batching, limits, cancellation, streaming), the real teacher for quality."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.backends.base import (
    Backend,
    GenerationChunk,
    GenerationRequest,
    Overloaded,
    PromptTooLong,
    SamplingParams,
    Unavailable,
)
from models.backends.decoding import (
    IncrementalDetokenizer,
    TextState,
    find_stop,
    partial_stop_length,
)
from models.backends.local import LocalBackend

QUESTION = ({"role": "user", "content": "What is the capital of France?"},)


def chat(text: str = "Tell me a story.", **params: object) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 16, **params})  # type: ignore[arg-type]
    return GenerationRequest("req", sampling, messages=({"role": "user", "content": text},))


def raw(prompt: str, **params: object) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 16, **params})  # type: ignore[arg-type]
    return GenerationRequest("req", sampling, prompt=prompt)


async def collect(backend: LocalBackend, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in backend.generate(request)]


async def complete(
    backend: LocalBackend, request: GenerationRequest
) -> tuple[str, GenerationChunk]:
    chunks = await collect(backend, request)
    return "".join(c.text for c in chunks), chunks[-1]


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def backend(tiny_model_dir: Path) -> AsyncIterator[LocalBackend]:
    b = LocalBackend("tiny", tiny_model_dir, role="student", parent="teacher")
    await b.start()
    yield b
    await b.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# -- decoding helpers -------------------------------------------------------------------


def test_stop_string_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) == -1
    assert partial_stop_length("abc wo", ["world"]) == 2
    assert partial_stop_length("abc", ["world"]) == 0
    assert partial_stop_length("abc w", ["xyz", "wq", "cw"]) == 1


def test_detokenizer_never_splits_a_character(tokenizer) -> None:
    text = "Parrot: 🦜, melt: 🫠, Ωμέγα ሰላም."
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)


def test_text_state_holds_back_a_possible_stop(tokenizer) -> None:
    ids = tokenizer("one two three four")["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == ["one", " two", " three", " four"]

    def run(stop: str) -> list[tuple[str, str | None]]:
        params = SamplingParams(stop=(stop,))
        state = TextState(IncrementalDetokenizer(tokenizer), params, frozenset())
        return [state.push(i) for i in ids]

    # "two three" might still become the stop string, so it waits until " four" rules it out.
    assert run("two three!") == [("one", None), (" ", None), ("", None), ("two three four", None)]
    assert run("two thr")[:3] == [("one", None), (" ", None), ("", "stop")]


# -- lifecycle and card -----------------------------------------------------------------


async def test_not_started_is_unavailable(tiny_model_dir: Path) -> None:
    b = LocalBackend("tiny", tiny_model_dir)
    assert isinstance(b, Backend)
    assert not await b.health()
    assert b.card().context_length == 256 and b.card().parameters is None
    with pytest.raises(Unavailable):
        await collect(b, chat())


async def test_card_and_health(backend: LocalBackend) -> None:
    assert await backend.health()
    card = backend.card()
    assert (card.name, card.backend, card.role, card.parent) == (
        "tiny",
        "local",
        "student",
        "teacher",
    )
    assert card.context_length == 256 and card.created > 0
    assert card.parameters is not None
    assert 0 < card.extra["non_embedding_parameters"] < card.parameters  # type: ignore[operator]
    assert card.extra["device"] == "cpu" and card.extra["dtype"] == "float32"


# -- prompts, counts, finish reasons ----------------------------------------------------


async def test_chat_and_raw_prompt_token_counts(backend: LocalBackend, tokenizer) -> None:
    request = chat("Hello there", max_tokens=5)
    text, last = await complete(backend, request)
    expected = tokenizer.apply_chat_template(
        list(request.messages or ()), add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert last.prompt_tokens == len(expected)
    assert (last.finish_reason, last.completion_tokens) == ("length", 5)

    text, last = await complete(backend, raw("The quick brown fox", max_tokens=3))
    assert last.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])
    assert (last.finish_reason, last.completion_tokens) == ("length", 3)
    assert text


async def test_greedy_matches_transformers_generate(backend: LocalBackend, tiny_model_dir) -> None:
    text, _ = await complete(backend, raw("Once upon a time", max_tokens=12))
    assert text == greedy_reference(tiny_model_dir, "Once upon a time", 12)[1]


def greedy_reference(model_dir: Path, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens and text from plain `model.generate`, EOS ignored."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


async def test_eos_finishes_with_stop(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokens, _ = greedy_reference(tiny_model_dir, "Tell me a story", 8)
    k = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 2)
    model_dir = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, model_dir)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        config["eos_token_id"] = [tokens[k]]
        (model_dir / name).write_text(json.dumps(config))
    b = LocalBackend("eos", model_dir)
    await b.start()
    try:
        text, last = await complete(b, raw("Tell me a story", max_tokens=20))
    finally:
        await b.stop()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert last.finish_reason == "stop"
    assert last.completion_tokens == k + 1  # the EOS token counts, but adds no text
    assert text == tok.decode(tokens[:k], skip_special_tokens=True)


# Seeded sampling from the random tiny model gives varied text, multi-byte characters
# split across tokens included, and the same text on every run.
SAMPLED = {"temperature": 1.0, "seed": 3}


async def test_stop_string_truncates_across_chunks(backend: LocalBackend) -> None:
    full, _ = await complete(backend, raw("Once upon a time", max_tokens=40, **SAMPLED))
    start = len(full) // 2
    stop = full[start : start + 7]  # spans several tokens
    cut = full.find(stop)
    request = raw("Once upon a time", max_tokens=40, stop=("\x00", stop), **SAMPLED)
    chunks = await collect(backend, request)
    assert "".join(c.text for c in chunks) == full[:cut]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens is not None and chunks[-1].completion_tokens < 40


async def test_unfinished_stop_prefix_is_flushed(backend: LocalBackend) -> None:
    full, _ = await complete(backend, raw("Once upon a time", max_tokens=20, **SAMPLED))
    stop = full[-3:] + "\x00never"  # the text ends with the start of this stop string
    request = raw("Once upon a time", max_tokens=20, stop=(stop,), **SAMPLED)
    text, last = await complete(backend, request)
    assert (text, last.finish_reason) == (full, "length")


async def test_stream_deltas_concatenate_to_the_whole_text(backend: LocalBackend) -> None:
    request = chat("Tell me about cats.", max_tokens=24, **SAMPLED)
    streamed = await collect(backend, request)
    whole = await collect(backend, replace(request, stream=False))
    assert len(streamed) > 2 and len(whole) == 1
    assert all("\ufffd" not in c.text for c in streamed)
    assert "".join(c.text for c in streamed) == whole[0].text
    assert streamed[-1].completion_tokens == whole[0].completion_tokens == 24


# -- batching and sampling --------------------------------------------------------------


async def test_batch_forms_and_greedy_is_batch_invariant(backend: LocalBackend) -> None:
    prompts = ["Once upon a time", "The weather today", "In a galaxy far away", "Dear diary"]
    batched = await asyncio.gather(*(complete(backend, raw(p, max_tokens=24)) for p in prompts))
    assert all(last.batch_size is not None and last.batch_size >= 2 for _, last in batched)
    for prompt, (text, _) in zip(prompts, batched, strict=True):
        alone, last = await complete(backend, raw(prompt, max_tokens=24))
        assert last.batch_size == 1
        assert alone == text


async def test_seeded_sampling_is_the_same_alone_and_in_a_batch(backend: LocalBackend) -> None:
    def seeded(seed: int | None) -> GenerationRequest:
        return chat("Write a poem.", max_tokens=20, temperature=0.9, top_p=0.95, seed=seed)

    alone, _ = await complete(backend, seeded(1234))
    others = [seeded(None), seeded(7), seeded(None)]
    results = await asyncio.gather(*(complete(backend, r) for r in [*others, seeded(1234)]))
    assert results[-1][1].batch_size is not None and results[-1][1].batch_size >= 2
    assert results[-1][0] == alone
    assert results[1][0] != alone  # another seed samples another text


# -- limits, cancellation, shutdown -----------------------------------------------------


async def test_too_long_prompt_is_refused(backend: LocalBackend) -> None:
    with pytest.raises(PromptTooLong) as info:
        await collect(backend, chat("Hi", max_tokens=250))
    assert info.value.context_length == 256 and info.value.max_tokens == 250
    assert backend.load().waiting == 0


async def test_full_queue_is_overloaded(tiny_model_dir: Path) -> None:
    b = LocalBackend("tiny", tiny_model_dir, max_batch_size=1, queue_size=1)
    await b.start()
    try:
        running = asyncio.create_task(collect(b, raw("Once", max_tokens=200)))
        await wait_for(lambda: b.load().running == 1)
        waiting = asyncio.create_task(collect(b, raw("Twice", max_tokens=2)))
        await wait_for(lambda: b.load().waiting == 1)
        with pytest.raises(Overloaded, match="queue_size=1") as info:
            await collect(b, raw("Thrice", max_tokens=2))
        assert info.value.retry_after > 0
        assert (await waiting)[-1].finish_reason == "length"  # served once a slot freed
        await running
    finally:
        await b.stop()


async def test_cancellation_frees_the_slot(tiny_model_dir: Path) -> None:
    b = LocalBackend("tiny", tiny_model_dir, max_batch_size=1)
    await b.start()
    try:
        stream = b.generate(raw("Once", max_tokens=200))
        await anext(stream)
        queued = asyncio.create_task(collect(b, raw("Queued", max_tokens=200)))
        await wait_for(lambda: b.load().waiting == 1)
        queued.cancel()  # a waiting request is withdrawn from the queue
        await wait_for(lambda: b.load().waiting == 0)
        assert b.load().running == 1
        await stream.aclose()  # the consumer leaves mid-stream
        await wait_for(lambda: b.load().running == 0)
        _, last = await complete(b, raw("Next", max_tokens=4))
        assert last.finish_reason == "length" and last.batch_size == 1
    finally:
        await b.stop()


async def test_stop_fails_in_flight_requests(tiny_model_dir: Path) -> None:
    b = LocalBackend("tiny", tiny_model_dir, max_batch_size=1)
    await b.start()
    running = b.generate(raw("Once", max_tokens=200))
    await anext(running)
    waiting = asyncio.create_task(collect(b, raw("Twice", max_tokens=5)))
    await wait_for(lambda: b.load().waiting == 1)
    await b.stop()
    with pytest.raises(Unavailable):
        async for _ in running:
            pass
    with pytest.raises(Unavailable):
        await waiting
    assert not await b.health()
    with pytest.raises(Unavailable):
        await collect(b, raw("After", max_tokens=2))


# -- the real teacher -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
async def test_teacher_answers_and_batching_keeps_greedy_output(teacher_dir: Path) -> None:
    b = LocalBackend("teacher", teacher_dir)
    await b.start()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=24)
        questions = [QUESTION[0]["content"], "Name three colours.", "What is 2+2?", "Say hi."]
        requests = [
            GenerationRequest("q", params, ({"role": "user", "content": q},)) for q in questions
        ]
        batched = await asyncio.gather(*(complete(b, r) for r in requests))
        alone = [await complete(b, r) for r in requests]
    finally:
        await b.stop()
    assert "Paris" in alone[0][0]
    assert alone[0][1].finish_reason == "stop"
    assert max(last.batch_size or 0 for _, last in batched) >= 2
    assert [text for text, _ in batched] == [text for text, _ in alone]
