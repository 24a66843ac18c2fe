"""Rate limits: the decision and OpenAI's header formats as pure functions; the sliding
window in this process on a fake clock; the same window in a real redis-server (and what a
Redis failure does); and the app with a keyed SDK client: 429 with Retry-After and the
x-ratelimit-* headers, and a token reservation corrected to the real usage."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from gateway.api.tracking import Ending
from gateway.limits import (
    Figures,
    Limiter,
    LocalWindows,
    Quota,
    RedisWindows,
    duration,
    reservation,
    verdict,
)
from gateway.metrics import Metrics
from tests.gateway.scripted import wait_ready
from tests.gateway.test_auth import keyed_app, make_key, sdk
from tests.redis import redis_server


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0, 0.02, 0.5, 1, 1.5, 60, 360, 3723)] == [
        "0ms", "20ms", "500ms", "1s", "1.5s", "1m0s", "6m0s", "1h2m3s",
    ]  # fmt: skip


def test_verdict_says_what_remains_when_it_resets_and_when_to_retry() -> None:
    quota = Quota(rpm=2, tpm=100)
    full = Figures(now=30.0, count=2, tokens=40, oldest=10.0, newest=20.0)
    refused = verdict(False, full, quota, cost=10, window_s=60)
    assert refused.refused == "requests" and refused.retry_after_s == pytest.approx(40)
    assert refused.reset_s == pytest.approx(50) and refused.remaining_requests == 0
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "50s", "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "60", "x-ratelimit-reset-tokens": "50s",
    }  # fmt: skip
    tokens = Figures(now=30.0, count=1, tokens=90, oldest=10.0, newest=10.0, tokens_free_at=10.0)
    by_tokens = verdict(False, tokens, quota, cost=20, window_s=60)
    assert by_tokens.refused == "tokens" and by_tokens.retry_after_s == pytest.approx(40)
    huge = verdict(False, tokens, quota, cost=101, window_s=60)
    assert huge.retry_after_s is None and "lower max_tokens" in huge.error("k").message
    assert verdict(True, tokens, Quota(rpm=5), 0, 60).headers().keys() == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }  # fmt: skip


async def test_the_local_window_slides_and_never_admits_more_than_the_limit() -> None:
    clock = Clock()
    windows, quota = LocalWindows(clock), Quota(rpm=3)
    admitted = []
    for step in range(120):  # 4 requests a second for 30 s of a 10 s window
        clock.t = 1000.0 + step * 0.25
        ok, _ = await windows.admit("k", quota, 1, 10.0)
        admitted.append((clock.t, ok.admitted))
    times = [t for t, ok in admitted if ok]
    # every 10 s window holds at most 3 admissions, and the limit is used up every window
    assert max(sum(1 for u in times if t <= u < t + 10) for t, _ in admitted) == 3
    assert len(times) == 9
    refused = (await windows.admit("k", quota, 1, 10.0))[0]
    assert refused.retry_after_s == pytest.approx(times[-3] + 10 - clock.t)


async def test_tokens_are_reserved_then_corrected_to_the_real_usage() -> None:
    clock = Clock()
    windows, quota = LocalWindows(clock), Quota(tpm=100)
    first, ticket = await windows.admit("k", quota, 60, 60.0)
    assert first.admitted and first.remaining_tokens == 40
    second, _ = await windows.admit("k", quota, 60, 60.0)
    assert not second.admitted and second.refused == "tokens"
    assert ticket is not None
    await windows.correct(ticket, 10, 60.0)  # the request used 10 of its 60
    assert (await windows.admit("k", quota, 60, 60.0))[0].remaining_tokens == 30
    clock.t += 60
    assert (await windows.peek("k", quota, 60.0)).remaining_tokens == 100
    await windows.correct(ticket, 50, 60.0)  # expired: no longer counts
    assert (await windows.peek("k", quota, 60.0)).remaining_tokens == 100


def test_a_reservation_is_the_prompt_estimate_plus_n_times_max_tokens() -> None:
    assert reservation("x" * 40, 100, 3) == (310, 10)
    assert reservation("", 5, 1) == (6, 1)


async def test_settling_corrects_in_order_and_keeps_server_failures_reserved() -> None:
    clock = Clock()
    limiter = Limiter(None, 60.0, local=LocalWindows(clock))
    quota = Quota(tpm=1000)
    _, ticket = await limiter.admit("k", quota, 500)
    assert ticket is not None
    settle = limiter.settle(ticket, estimate=20)
    settle(_ending(None, 503))  # failed before any token (failover may retry it): kept
    await asyncio.sleep(0)
    assert (await limiter.peek("k", quota)).remaining_tokens == 500  # type: ignore[union-attr]
    settle(_ending(0.1, 200, prompt=30, completion=12))
    settle(_ending(0.1, 200, prompt=30, completion=40))
    await asyncio.gather(*limiter.pending)
    assert (await limiter.peek("k", quota)).remaining_tokens == 930  # type: ignore[union-attr]


def _ending(ttft: float | None, status: int, prompt: int = 0, completion: int = 0) -> Ending:
    outcome = "success" if status == 200 else "server_error"
    return Ending(outcome, status, ttft, 0.2, prompt, completion, completion, None)


# -- Redis ----------------------------------------------------------------------------------


async def test_redis_windows_admit_correct_and_expire_like_local_ones(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        windows = RedisWindows(url, 1.0, prefix=f"t{time.monotonic_ns()}")
        try:
            quota = Quota(rpm=3, tpm=100)
            results = [await windows.admit("k", quota, 30, 1.0) for _ in range(4)]
            assert [v.admitted for v, _ in results] == [True, True, True, False]
            refused = results[-1][0]
            assert refused.refused == "requests" and 0 < refused.retry_after_s <= 1.0
            ticket = results[0][1]
            assert ticket is not None
            await windows.correct(ticket, 5, 1.0)
            assert (await windows.peek("k", quota, 1.0)).remaining_tokens == 35
            big, _ = await windows.admit("k", Quota(tpm=100), 70, 1.0)
            assert big.refused == "tokens" and 0 < big.retry_after_s <= 1.0
            await asyncio.sleep(1.05)
            assert (await windows.peek("k", quota, 1.0)).remaining_requests == 3
        finally:
            await windows.close()


@pytest.mark.parametrize("fallback", ["local", "open", "closed"])
async def test_a_redis_failure_does_what_on_redis_error_says(fallback: str) -> None:
    metrics = Metrics(dict)
    down = RedisWindows("redis://127.0.0.1:9/0", 0.2)  # nothing listens on port 9
    limiter = Limiter(metrics, 60.0, down, fallback)  # type: ignore[arg-type]
    quota = Quota(rpm=1)
    try:
        if fallback == "closed":
            with pytest.raises(Exception, match="cannot be reached") as caught:
                await limiter.admit("k", quota, 1)
            assert getattr(caught.value, "status", None) == 503
        else:
            first, _ = await limiter.admit("k", quota, 1)
            second, _ = await limiter.admit("k", quota, 1)
            assert first.admitted and second.admitted == (fallback == "open")
        assert metrics.rate_limit_errors.labels(fallback)._value.get() == 1
    finally:
        await limiter.close()


# -- the app ----------------------------------------------------------------------------


def test_a_key_over_its_rpm_gets_429_with_retry_after_and_headers(tmp_path: Path) -> None:
    secret = make_key(tmp_path, "team-a", rpm=2)
    with keyed_app(tmp_path) as client:
        wait_ready(client)
        api = sdk(client, secret)
        messages = [{"role": "user", "content": "hi"}]
        raw = api.chat.completions.with_raw_response.create(model="m", messages=messages)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        api.chat.completions.create(model="m", messages=messages, stream=False)
        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model="m", messages=messages)
        answer = caught.value.response
        assert answer.status_code == 429 and 1 <= int(answer.headers["retry-after"]) <= 60
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        assert answer.json()["error"]["code"] == "rate_limit_exceeded"
        listed = client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert listed.headers["x-ratelimit-remaining-requests"] == "0"  # a look, not a use
        metrics = client.get("/metrics").text
        assert 'distillgate_rate_limited_total{key="team-a",kind="requests"} 1.0' in metrics


def test_a_token_limit_counts_what_requests_used_not_what_they_reserved(tmp_path: Path) -> None:
    secret = make_key(tmp_path, "team-b", tpm=200)
    with keyed_app(tmp_path) as client:
        wait_ready(client)
        api = sdk(client, secret)
        messages = [{"role": "user", "content": "hi"}]
        # each reserves 1 + 150 tokens and uses 3 + 4 (the scripted backend's usage)
        for _ in range(5):
            raw = api.chat.completions.with_raw_response.create(
                model="m", messages=messages, max_tokens=150
            )
            assert raw.headers["x-ratelimit-limit-tokens"] == "200"
            time.sleep(0.05)  # the correction runs just after the response
        stream = api.chat.completions.create(model="m", messages=messages, max_tokens=150,
                                             stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.RateLimitError, match="Request too large"):
            api.chat.completions.create(model="m", messages=messages, max_tokens=250)
