"""OpenAIHTTPBackend against real OpenAI-compatible servers on loopback (no mocks).

`server` is the server under test, a parameter: the instant server (gateway/instant.py,
always), and a second distillgate gateway serving a tiny local model (`gateway`, runs
once `gateway/cli.py` exists). Tests that steer the remote into errors, slow streams or
dropped connections need the instant server's `#instant` directives and its /stats, so
they use the `instant` fixture directly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from models.backends.base import (
    GenerationChunk,
    GenerationRequest,
    Overloaded,
    SamplingParams,
    TokenLogprob,
    Unavailable,
    UpstreamError,
)
from models.backends.openai_http import OpenAIHTTPBackend
from models.backends.openai_wire import parse_logprobs

REPO = Path(__file__).resolve().parents[2]
INSTANT_SERVER = "gateway.instant"  # the instant server, run with `python -m`
INSTANT_TEXT = "Hello! This is the instant server answering right away."


@dataclass(frozen=True)
class Target:
    """A running OpenAI-compatible server: where it is and the model it serves."""

    url: str
    model: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(
    argv: list[str], url: str, log: Path, timeout_s: float = 30.0, ready: str = "/health"
) -> Iterator[None]:
    """Run a server process until `ready` answers 200; terminate it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers_200(url + ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[:4]} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def instant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", INSTANT_SERVER, "--port", str(port), "--model", "instant"]
    with serving(argv, url, tmp_path_factory.mktemp("instant") / "server.log"):
        yield Target(url, "instant")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A second distillgate gateway (`distillgate serve`) serving a tiny local model."""
    if importlib.util.find_spec("gateway.cli") is None:
        pytest.skip("gateway/cli.py is not built yet")
    model_dir = request.getfixturevalue("tiny_model_dir")
    root = tmp_path_factory.mktemp("gateway")
    config = root / "gateway.yaml"
    config.write_text(
        f"models:\n  - name: tiny\n    backend: local\n    path: {model_dir}\n"
        "traffic:\n  enabled: false\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with serving(argv, url, root / "gateway.log", timeout_s=180.0, ready="/ready"):
        yield Target(url, "tiny")


@pytest.fixture(
    scope="module",
    params=["instant", pytest.param("gateway", marks=[pytest.mark.integration, pytest.mark.slow])],
)
def server(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(request.param)


async def started(target: Target, **kwargs) -> OpenAIHTTPBackend:
    backend = OpenAIHTTPBackend("remote", target.url, served_model=target.model, **kwargs)
    await backend.start()
    return backend


@pytest.fixture
async def backend(server: Target):
    b = await started(server)
    yield b
    await b.stop()


@pytest.fixture
async def steerable(instant: Target):
    b = await started(instant)
    yield b
    await b.stop()


def chat(content: str = "Say hello.", stream: bool = True, **params) -> GenerationRequest:
    messages = ({"role": "user", "content": content},)
    return GenerationRequest("t", SamplingParams(**params), messages=messages, stream=stream)


def completion(prompt: str = "Say hello.", stream: bool = True, **params) -> GenerationRequest:
    return GenerationRequest("t", SamplingParams(**params), prompt=prompt, stream=stream)


async def collect(backend: OpenAIHTTPBackend, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in backend.generate(request)]


def stats(target: Target) -> dict:
    return httpx.get(f"{target.url}/stats", timeout=5.0).json()


def assert_final(chunk: GenerationChunk, max_tokens: int) -> None:
    assert chunk.finish_reason in ("stop", "length")
    assert chunk.prompt_tokens is not None and chunk.prompt_tokens > 0
    assert chunk.completion_tokens is not None and 0 < chunk.completion_tokens <= max_tokens


# -- against any server under test -----------------------------------------------------


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
async def test_whole_answer_is_one_final_chunk(backend, make) -> None:
    chunks = await collect(backend, make(stream=False, max_tokens=8, temperature=0.0))
    assert len(chunks) == 1
    assert chunks[0].text
    assert_final(chunks[0], 8)


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
async def test_stream_yields_deltas_then_a_final_chunk(backend, make) -> None:
    chunks = await collect(backend, make(stream=True, max_tokens=8, temperature=0.0))
    *deltas, last = chunks
    assert deltas and all(c.text and c.finish_reason is None for c in deltas)
    assert_final(last, 8)
    whole = await collect(backend, make(stream=False, max_tokens=8, temperature=0.0))
    assert "".join(c.text for c in deltas) + last.text == whole[0].text


async def test_remote_error_envelope_keeps_status_and_param(backend) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(backend, chat(stream=False, temperature=5.0))
    assert caught.value.status == 400
    assert caught.value.param == "temperature"
    assert caught.value.type == "invalid_request_error"


async def test_unknown_model_is_a_404_upstream_error(server: Target) -> None:
    backend = OpenAIHTTPBackend("remote", server.url, served_model="no-such-model")
    await backend.start()
    try:
        with pytest.raises(UpstreamError) as caught:
            await collect(backend, chat(stream=True))
        assert caught.value.status == 404
        assert caught.value.code == "model_not_found"
    finally:
        await backend.stop()


async def test_health_is_true_for_a_live_server(backend) -> None:
    assert await backend.health() is True


async def test_many_concurrent_requests_share_a_small_pool(server: Target) -> None:
    backend = await started(server, max_connections=2)
    try:
        results = await asyncio.gather(
            *(collect(backend, chat(stream=i % 2 == 0, max_tokens=4)) for i in range(12))
        )
        assert all(r[-1].finish_reason for r in results)
        assert backend.load().running == 0
    finally:
        await backend.stop()


# -- against the steerable instant server --------------------------------------------


async def test_sampling_params_and_model_are_forwarded(steerable, instant: Target) -> None:
    params = {"max_tokens": 7, "temperature": 0.25, "top_p": 0.5, "seed": 42, "stop": ("\n",)}
    await collect(steerable, chat(stream=False, **params))
    sent = stats(instant)["last_request"]
    assert sent["model"] == "instant"
    assert sent["messages"] == [{"role": "user", "content": "Say hello."}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (7, 0.25, 0.5)
    assert (sent["seed"], sent["stop"]) == (42, ["\n"])
    assert "stream" not in sent
    await collect(steerable, completion(stream=True))
    sent = stats(instant)["last_request"]
    assert sent["prompt"] == "Say hello."
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_exact_text_finish_reason_and_usage(steerable) -> None:
    [whole] = await collect(steerable, chat("one two three", stream=False, max_tokens=3))
    assert whole == GenerationChunk("Hello! This is", "length", 3, 3)
    chunks = await collect(steerable, completion("a b", max_tokens=100))
    assert [c.text for c in chunks[:-1]] == [
        "Hello!",
        " This",
        " is",
        " the",
        " instant",
        " server",
        " answering",
        " right",
        " away.",
    ]
    assert chunks[-1] == GenerationChunk("", "stop", 2, 9)


NEW_FIELDS = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs")


async def test_new_sampling_fields_are_sent_only_when_set(steerable, instant: Target) -> None:
    await collect(steerable, chat(stream=False))
    sent = stats(instant)["last_request"]
    assert not set(NEW_FIELDS) & set(sent)  # neutral values: servers that lack them work
    params = {
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": ((42, -100.0), (7, 5.5)),
        "logprobs": True,
        "top_logprobs": 2,
    }
    await collect(steerable, chat(stream=True, **params))  # fmt: skip
    sent = stats(instant)["last_request"]
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, -0.25)
    assert sent["logit_bias"] == {"42": -100.0, "7": 5.5}  # OpenAI's keys are strings
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    await collect(steerable, chat(stream=False, logprobs=True))
    assert "top_logprobs" not in stats(instant)["last_request"]
    # legacy completions: `logprobs` is the number of alternatives, 0 for none
    await collect(steerable, completion(stream=False, logprobs=True))
    sent = stats(instant)["last_request"]
    assert sent["logprobs"] == 0 and "top_logprobs" not in sent
    await collect(steerable, completion(stream=False, logprobs=True, top_logprobs=3))
    assert stats(instant)["last_request"]["logprobs"] == 3


# The instant server's made-up log-probabilities: a word's is -len/10, its k-th alternative
# `alt<k>` k lower, the first alternative the word itself.
WORDS = ("Hello!", " This", " is")


def expected(word: str, top: int) -> TokenLogprob:
    lp = -len(word.strip()) / 10
    return TokenLogprob(word, lp, tuple([(word, lp), *((f"alt{k}", lp - k) for k in
                                                          range(1, top))][:top]))  # fmt: skip


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
async def test_logprobs_come_back_whole_and_streamed(steerable, make) -> None:
    [whole] = await collect(steerable, make(stream=False, max_tokens=3, logprobs=True,
                                            top_logprobs=2))  # fmt: skip
    assert whole.text == "Hello! This is"
    assert whole.logprobs == tuple(expected(w, 2) for w in WORDS)
    *deltas, last = await collect(steerable, make(max_tokens=3, logprobs=True, top_logprobs=2))
    assert [c.logprobs for c in deltas] == [(expected(w, 2),) for w in WORDS]
    assert [c.text for c in deltas] == list(WORDS) and last.logprobs == ()
    bare = await collect(steerable, make(max_tokens=3, logprobs=True))  # no alternatives
    assert bare[0].logprobs == (TokenLogprob("Hello!", -0.6),)
    unasked = await collect(steerable, make(max_tokens=3)) + await collect(
        steerable, make(stream=False, max_tokens=3)
    )
    assert all(c.logprobs is None for c in unasked)


def test_malformed_remote_logprobs_are_a_502() -> None:
    good = {"logprobs": {"content": [{"token": "a", "logprob": None, "top_logprobs": []}]}}
    assert parse_logprobs(good, chat=True, backend="r") == [TokenLogprob("a", -9999.0)]
    for choice, chat_shape in (
        ({"logprobs": {"content": [{"token": "a", "logprob": "high"}]}}, True),
        ({"logprobs": {"content": [{"logprob": -1.0}]}}, True),
        ({"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0]}}, False),
        ({"logprobs": ["a"]}, False),
    ):
        with pytest.raises(UpstreamError, match="'r' answered with malformed logprobs") as caught:
            parse_logprobs(choice, chat=chat_shape, backend="r")
        assert caught.value.status == 502


async def test_context_length_comes_from_the_remote_model_list(steerable) -> None:
    card = steerable.card()
    assert (card.backend, card.role, card.name, card.context_length) == (
        "openai",
        "student",
        "remote",
        4096,
    )


async def test_base_url_may_end_with_v1(instant: Target) -> None:
    backend = OpenAIHTTPBackend("x", f"{instant.url}/v1/", served_model="instant")
    await backend.start()
    try:
        assert (await collect(backend, chat(stream=False)))[0].text == INSTANT_TEXT
    finally:
        await backend.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_429_with_retry_after_is_overloaded(steerable, stream: bool) -> None:
    with pytest.raises(Overloaded) as caught:
        await collect(steerable, chat("#instant status=429 retry_after=7", stream=stream))
    assert caught.value.retry_after == 7.0


async def test_503_without_retry_after_is_overloaded_for_a_second(steerable) -> None:
    with pytest.raises(Overloaded) as caught:
        await collect(steerable, chat("#instant status=503 message=busy", stream=False))
    assert (caught.value.retry_after, str(caught.value)) == (1.0, "busy")


@pytest.mark.parametrize("stream", [False, True])
async def test_non_json_error_body_is_an_upstream_error(steerable, stream: bool) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(steerable, completion("#instant status=502 body=text", stream=stream))
    assert (caught.value.status, str(caught.value)) == (502, "upstream exploded")


async def test_streamed_error_status_keeps_param_and_code(steerable) -> None:
    prompt = "#instant status=422 param=stop code=bad_stop type=invalid_request_error"
    with pytest.raises(UpstreamError) as caught:
        await collect(steerable, completion(prompt, stream=True))
    error = caught.value
    assert (error.status, error.param, error.code, error.type) == (
        422,
        "stop",
        "bad_stop",
        "invalid_request_error",
    )


async def test_error_event_mid_stream_raises_after_the_first_chunks(steerable) -> None:
    seen: list[str] = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in steerable.generate(chat("#instant fail_after=2")):
            seen.append(chunk.text)
    assert seen == ["Hello!", " This"]
    assert "failed mid-stream" in str(caught.value)
    assert caught.value.type == "server_error"


async def test_connection_dropped_mid_stream_is_unavailable(steerable, instant) -> None:
    seen: list[str] = []
    with pytest.raises(Unavailable) as caught:
        async for chunk in steerable.generate(chat("#instant drop_after=2")):
            seen.append(chunk.text)
    assert seen == ["Hello!", " This"]
    assert "'remote'" in str(caught.value) and instant.url in str(caught.value)
    # the pool recovers: the next request gets a fresh connection
    assert (await collect(steerable, chat(stream=False)))[0].text == INSTANT_TEXT


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_is_unavailable_naming_backend_and_url(stream: bool) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = OpenAIHTTPBackend("gone", url)
    await backend.start()
    try:
        assert await backend.health() is False
        with pytest.raises(Unavailable) as caught:
            await collect(backend, chat(stream=stream))
    finally:
        await backend.stop()
    message = str(caught.value)
    assert "'gone'" in message and url in message and "cannot connect" in message
    assert "Traceback" not in message and "\n" not in message


async def test_slow_answer_times_out_as_unavailable(instant: Target) -> None:
    backend = await started(instant, timeout_s=0.3)
    try:
        with pytest.raises(Unavailable, match=r"no answer within 0\.3 s"):
            await collect(backend, chat("#instant chunks=3 delay=2"))
    finally:
        await backend.stop()


async def test_closing_the_stream_closes_the_upstream_stream(steerable, instant) -> None:
    before = stats(instant)
    stream = steerable.generate(chat("#instant chunks=200 delay=0.05"))
    assert (await anext(stream)).text == "Hello!"
    assert (await anext(stream)).text == " This"
    assert stats(instant)["open_streams"] == before["open_streams"] + 1
    assert steerable.load().running == 1
    await stream.aclose()
    assert steerable.load().running == 0
    deadline = time.monotonic() + 2.0
    while stats(instant)["open_streams"] != before["open_streams"]:
        assert time.monotonic() < deadline, "the instant server still streams"
        await asyncio.sleep(0.02)
    assert stats(instant)["streams_cancelled"] == before["streams_cancelled"] + 1


async def test_health_is_false_before_start_and_after_stop(instant: Target) -> None:
    backend = OpenAIHTTPBackend("remote", instant.url, served_model="instant")
    assert await backend.health() is False
    await backend.start()
    assert await backend.health() is True
    await backend.stop()
    assert await backend.health() is False
    with pytest.raises(Unavailable, match="not started"):
        await collect(backend, chat(stream=False))


# -- against a raw HTTP/1.1 server that drops kept-alive connections -------------------

ANSWER = json.dumps(
    {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}
).encode()


async def answer_once_per_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer a connection's first request; close it when the second one arrives, as a
    server whose keep-alive timeout ends just as the client reuses the connection."""
    for answered in (False, True):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = re.search(r"content-length: *(\d+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        if answered:
            break
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
        await writer.drain()
    writer.close()


async def test_a_post_on_a_connection_the_server_closed_is_retried_once() -> None:
    server = await asyncio.start_server(answer_once_per_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIHTTPBackend("raw", f"http://127.0.0.1:{port}")
    await backend.start()  # GET /v1/models leaves one kept-alive connection
    try:
        for _ in range(3):
            assert (await collect(backend, chat(stream=False)))[0].text == "ok"
    finally:
        await backend.stop()
        server.close()
        await server.wait_closed()
