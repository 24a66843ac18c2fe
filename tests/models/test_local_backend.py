"""LocalBackend on real models: a tiny random Llama with the real SmolLM2 tokenizer for the
mechanics (batching, limits, cancellation, streaming, faults, penalties, logit_bias,
logprobs), the real teacher for quality."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.backends.base import (
    Backend,
    BackendError,
    GenerationChunk,
    GenerationRequest,
    InvalidParams,
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
from models.backends.local import LocalBackend, set_threads

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
        assert b.load().capacity == 1
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


# -- faults, tokenisation, threads -----------------------------------------------------


class FailOnce:
    """A forward pre-hook on the loaded model that raises once, on the first forward
    whose input_ids `when` accepts (a fault inside the worker's step)."""

    def __init__(self, when) -> None:
        self.when = when
        self.fired = False

    def __call__(self, module, args, kwargs) -> None:
        if not self.fired and self.when(kwargs["input_ids"]):
            self.fired = True
            raise RuntimeError("injected fault")


def inject(backend: LocalBackend, when) -> FailOnce:
    fault = FailOnce(when)
    assert backend._loaded is not None
    backend._loaded.model.register_forward_pre_hook(fault, with_kwargs=True)
    return fault


def tracebacks(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.exc_info and r.name == "models.backends.local")


async def test_a_fault_in_a_decode_step_fails_that_batch_and_the_worker_goes_on(
    backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    expected, _ = await complete(backend, raw("Once upon a time", max_tokens=8))
    fault = inject(backend, lambda ids: tuple(ids.shape) == (2, 1))  # both are decoding
    prompts = ("Once upon a time", "Dear diary")
    with caplog.at_level(logging.ERROR):
        results = await asyncio.gather(
            *(collect(backend, raw(p, max_tokens=200)) for p in prompts), return_exceptions=True
        )
    assert fault.fired
    for result in results:
        assert type(result) is BackendError and "injected fault" in str(result)
    assert tracebacks(caplog) == 1
    assert await backend.health() and backend.load().running == 0
    text, last = await complete(backend, raw("Once upon a time", max_tokens=8))
    assert (text, last.finish_reason, last.batch_size) == (expected, "length", 1)


async def test_a_fault_prefilling_newcomers_spares_the_running_batch(
    backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    expected, _ = await complete(backend, raw("Once upon a time", max_tokens=200))
    running = backend.generate(raw("Once upon a time", max_tokens=200))
    first = await anext(running)
    # Fires on a prefill (several positions) while the first request is decoding.
    fault = inject(backend, lambda ids: ids.shape[1] > 1 and backend.load().running == 1)
    with caplog.at_level(logging.ERROR), pytest.raises(BackendError, match="prefill") as info:
        await collect(backend, raw("Dear diary", max_tokens=4))
    assert fault.fired and type(info.value) is BackendError
    rest = [chunk async for chunk in running]
    assert first.text + "".join(c.text for c in rest) == expected  # its cache was untouched
    assert rest[-1].finish_reason == "length" and tracebacks(caplog) == 1
    _, last = await complete(backend, raw("Dear diary", max_tokens=4))
    assert last.finish_reason == "length" and await backend.health()


async def test_tokenisation_runs_off_the_event_loop(backend: LocalBackend) -> None:
    assert backend._loaded is not None
    real = backend._loaded.tokenizer
    threads: list[int] = []

    class Recording:
        """The real tokenizer, noting which thread encodes."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        def __call__(self, *args, **kwargs):
            threads.append(threading.get_ident())
            return real(*args, **kwargs)

    backend._loaded.tokenizer = Recording()
    try:
        await complete(backend, chat("Hello", max_tokens=2))
        await complete(backend, raw("Hello", max_tokens=2))
    finally:
        backend._loaded.tokenizer = real
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_set_threads_is_process_wide_and_none_means_every_core(tiny_model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        with pytest.raises(ValueError, match="got 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(TypeError):
        LocalBackend("tiny", tiny_model_dir, threads=2)  # type: ignore[call-arg]


# -- penalties, logit_bias, logprobs ----------------------------------------------------


def tokens_of(chunks: list[GenerationChunk]) -> list[str]:
    return [entry.token for chunk in chunks for entry in chunk.logprobs or ()]


async def test_logit_bias_outside_the_vocabulary_is_refused(backend: LocalBackend) -> None:
    with pytest.raises(InvalidParams) as info:
        await collect(backend, raw("Hi", logit_bias=((5, 1.0), (1_000_000, -100.0))))
    assert info.value.param == "logit_bias"
    assert "1000000" in str(info.value) and "vocabulary size 49152" in str(info.value)
    assert backend.load().waiting == 0


async def test_banned_greedy_tokens_never_appear(backend: LocalBackend, tokenizer) -> None:
    plain = await collect(backend, raw("Once upon a time", max_tokens=12, logprobs=True))
    banned = {tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t))[0] for t in tokens_of(plain)}
    bias = tuple((token_id, -100.0) for token_id in sorted(banned))
    request = raw("Once upon a time", max_tokens=12, logprobs=True, logit_bias=bias)
    biased = tokens_of(await collect(backend, request))
    assert len(biased) == 12 and not set(biased) & set(tokens_of(plain))


async def test_presence_penalty_stops_repetition(backend: LocalBackend) -> None:
    # The tiny random model repeats its greedy token; a penalty of 2 dwarfs its logits.
    plain = tokens_of(await collect(backend, raw("Once upon a time", logprobs=True)))
    assert len(set(plain)) < len(plain) == 16
    request = raw("Once upon a time", logprobs=True, presence_penalty=2.0)
    penalised = tokens_of(await collect(backend, request))
    assert len(set(penalised)) == len(penalised) == 16


async def test_greedy_logprobs_are_the_top_log_probabilities(backend: LocalBackend) -> None:
    request = raw("Once upon a time", max_tokens=12, logprobs=True, top_logprobs=5)
    streamed = await collect(backend, request)
    whole = await collect(backend, replace(request, stream=False))
    entries = [entry for chunk in streamed for entry in chunk.logprobs or ()]
    assert len(entries) == whole[-1].completion_tokens == 12
    assert whole[-1].logprobs == tuple(entries)  # the non-streamed answer holds them all
    for entry in entries:
        values = [value for _, value in entry.top]
        assert len(entry.top) == 5 and values == sorted(values, reverse=True)
        assert entry.top[0] == (entry.token, entry.logprob) and entry.logprob < 0
    assert all(chunk.logprobs is None for chunk in await collect(backend, raw("Hi")))


async def test_held_back_text_brings_its_logprobs(backend: LocalBackend) -> None:
    request = raw("Once upon a time", max_tokens=40, logprobs=True, **SAMPLED)
    texts = [chunk.text for chunk in await collect(backend, request)]  # one token each
    full = "".join(texts)
    # A stop string that starts in token k-1, spans token k and ends in token k+1: token
    # k's text is held back, so its entry waits for the final chunk beside token k+1's.
    for k in range(len(texts) // 2, len(texts) - 1):
        stop = texts[k - 1][-1:] + texts[k] + texts[k + 1][:1]
        if len(stop) >= 3 and full.find(stop) == len("".join(texts[:k])) - 1:
            break
    else:
        pytest.fail(f"no stop string found in {texts}")
    chunks = await collect(backend, replace(request, params=replace(request.params, stop=(stop,))))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == k + 2
    assert all(chunk.logprobs for chunk in chunks)  # each chunk with its tokens
    assert [len(chunk.logprobs or ()) for chunk in chunks] == [1] * k + [2]


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
