"""Per-key rate limits: requests and tokens per minute over a sliding window, kept in this
process or shared by every replica through Redis, and OpenAI's `x-ratelimit-*` headers.

A sliding log, not a token bucket: every admitted request is one entry (its time and its
tokens) that counts for exactly `window_s`, so no window of that length ever admits more
than the limit. A bucket that starts full admits its capacity plus a minute's refill in
the first minute: twice the limit. Tokens are reserved at admission (the prompt estimated
at 4 characters per token, plus n x max_tokens) and the entry is corrected to the real
usage when the request ends.

`verdict` is the decision, a pure function of the window's figures; `LocalWindows` and
`RedisWindows` only gather those figures (Redis in one Lua script, so check-and-reserve is
atomic across replicas, on the server's clock) and `Limiter` chooses between them: when
Redis fails, `on_redis_error` says what happens (local: each replica limits alone; open:
admit; closed: 503), counted in `distillgate_rate_limit_store_errors_total`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.errors import RateLimited, ServiceUnavailable

if TYPE_CHECKING:
    from gateway.api.tracking import Ending, Listener
    from gateway.metrics import Metrics

log = logging.getLogger("distillgate")

CHARS_PER_TOKEN = 4.0  # the prompt's reservation, before it is tokenised
REDIS_RETRY_S = 1.0  # after a Redis failure, the fallback answers for this long
WARN_EVERY_S = 60.0
Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Quota:
    """A key's limits per window; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True, slots=True)
class Figures:
    """What a window holds at `now`, after expiring old entries and (if admitted)
    adding the new one: the count, the tokens, when its oldest and newest entries were
    made, and when enough tokens will have expired for the refused request to fit."""

    now: float
    count: int
    tokens: int
    oldest: float | None
    newest: float | None
    tokens_free_at: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision and what the headers say. `refused` names the limit that refused."""

    admitted: bool
    quota: Quota
    remaining_requests: int | None
    remaining_tokens: int | None
    reset_s: float  # until the window is empty again (OpenAI: "resets to its initial state")
    retry_after_s: float | None = None
    refused: Kind | None = None
    needed: int = 0  # the tokens the request reserves

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits the key has."""
        out: dict[str, str] = {}
        reset = duration(self.reset_s)
        if self.quota.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.quota.rpm)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = reset
        if self.quota.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.quota.tpm)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = reset
        return out

    def error(self, name: str) -> RateLimited:
        if self.retry_after_s is None:  # it would never fit: no use retrying it
            return RateLimited(
                f"Request too large for key '{name}': it reserves {self.needed} tokens (the "
                f"prompt + n x max_tokens), the key's limit is {self.quota.tpm} tokens per "
                "minute; lower max_tokens or n.",
            )
        limit = self.quota.rpm if self.refused == "requests" else self.quota.tpm
        unit = "requests" if self.refused == "requests" else "tokens"
        return RateLimited(
            f"Rate limit reached for key '{name}': {limit} {unit} per minute. "
            f"Try again in {duration(self.retry_after_s or 0)}.",
            retry_after=self.retry_after_s,
        )


def admits(count: int, tokens: int, quota: Quota, cost: int) -> bool:
    """Whether one more request of `cost` tokens fits a window holding `count`, `tokens`."""
    return (quota.rpm is None or count < quota.rpm) and (
        quota.tpm is None or tokens + cost <= quota.tpm
    )


def verdict(admitted: bool, f: Figures, quota: Quota, cost: int, window_s: float) -> Verdict:
    """The decision for figures gathered after admission (or refusal): remaining counts,
    when the window is empty again, and, when refused, how long until the request fits."""
    remaining_r = None if quota.rpm is None else max(0, quota.rpm - f.count)
    remaining_t = None if quota.tpm is None else max(0, quota.tpm - f.tokens)
    reset = 0.0 if f.newest is None else max(0.0, f.newest + window_s - f.now)
    if admitted:
        return Verdict(True, quota, remaining_r, remaining_t, reset, needed=cost)
    if quota.tpm is not None and cost > quota.tpm:
        return Verdict(False, quota, remaining_r, remaining_t, reset, None, "tokens", cost)
    refused: Kind = "requests" if quota.rpm is not None and f.count >= quota.rpm else "tokens"
    # A window refusing requests holds exactly rpm entries: the oldest to expire frees one.
    at = f.oldest if refused == "requests" else f.tokens_free_at
    retry = max(0.001, (at if at is not None else f.now) + window_s - f.now)
    return Verdict(False, quota, remaining_r, remaining_t, reset, retry, refused, cost)


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{math.ceil(max(seconds, 0) * 1000)}ms"
    seconds = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


# -- where the windows live ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request's entry, to correct when it ends (`where` names its store)."""

    key: str
    entry: object
    reserved: int
    where: Windows


class Windows(Protocol):
    async def admit(
        self, key: str, quota: Quota, cost: int, window_s: float
    ) -> tuple[Verdict, Ticket | None]: ...
    async def correct(self, ticket: Ticket, tokens: int, window_s: float) -> None: ...
    async def peek(self, key: str, quota: Quota, window_s: float) -> Verdict: ...


class _Entry:
    __slots__ = ("live", "t", "tokens")

    def __init__(self, t: float, tokens: int) -> None:
        self.t, self.tokens, self.live = t, tokens, True


class _Window:
    __slots__ = ("entries", "tokens")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.tokens = 0

    def expire(self, now: float, window_s: float) -> None:
        entries = self.entries
        while entries and entries[0].t + window_s <= now:
            gone = entries.popleft()
            gone.live = False
            self.tokens -= gone.tokens

    def figures(self, now: float, free: int | None = None) -> Figures:
        """The figures; with `free`, also when that many tokens will have expired."""
        entries = self.entries
        at = None
        if free is not None and free > 0:
            freed = 0
            for e in entries:
                freed += e.tokens
                if freed >= free:
                    at = e.t
                    break
        oldest, newest = (entries[0].t, entries[-1].t) if entries else (None, None)
        return Figures(now, len(entries), self.tokens, oldest, newest, at)


class LocalWindows:
    """Windows in this process, on a monotonic clock (`clock` is replaceable in tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.windows: dict[str, _Window] = {}

    def admit_now(
        self, key: str, quota: Quota, cost: int, window_s: float
    ) -> tuple[Verdict, Ticket | None]:
        now = self.clock()
        w = self.windows.get(key) or self.windows.setdefault(key, _Window())
        w.expire(now, window_s)
        if admits(len(w.entries), w.tokens, quota, cost):
            entry = _Entry(now, cost)
            w.entries.append(entry)
            w.tokens += cost
            return verdict(True, w.figures(now), quota, cost, window_s), Ticket(
                key, entry, cost, self
            )
        free = None if quota.tpm is None else w.tokens + cost - quota.tpm
        return verdict(False, w.figures(now, free), quota, cost, window_s), None

    async def admit(
        self, key: str, quota: Quota, cost: int, window_s: float
    ) -> tuple[Verdict, Ticket | None]:
        return self.admit_now(key, quota, cost, window_s)

    async def correct(self, ticket: Ticket, tokens: int, window_s: float) -> None:
        entry = ticket.entry
        assert isinstance(entry, _Entry)
        window = self.windows.get(ticket.key)
        if entry.live and window is not None:  # an expired entry no longer counts anyway
            window.tokens += tokens - entry.tokens
            entry.tokens = tokens

    async def peek(self, key: str, quota: Quota, window_s: float) -> Verdict:
        now = self.clock()
        w = self.windows.get(key) or _Window()
        w.expire(now, window_s)
        return verdict(True, w.figures(now), quota, 0, window_s)


# Redis: KEYS[1] the log (a sorted set of entry ids scored by milliseconds), KEYS[2] each
# entry's tokens (a hash), KEYS[3] their sum. ARGV: window ms, rpm (-1: none), tpm (-1:
# none), cost, the new entry's id ("" to only look). Returns {admitted, count, tokens,
# oldest, newest, tokens_free_at, now} (ms; -1: none). The server's clock, not the
# replicas' (they may disagree).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local cutoff = now - window
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
if #old > 0 then
  local freed = 0
  for _, id in ipairs(old) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[2], id)) or 0)
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('DECRBY', KEYS[3], freed)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
end
local count = redis.call('ZCARD', KEYS[1])
local used = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0'))
local ok = (rpm < 0 or count < rpm) and (tpm < 0 or used + cost <= tpm)
local free_at = -1
if ARGV[5] ~= '' and ok then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('HSET', KEYS[2], ARGV[5], cost)
  redis.call('INCRBY', KEYS[3], cost)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window) end
  count, used = count + 1, used + cost
elseif tpm >= 0 and not ok then
  local need, freed = used + cost - tpm, 0
  local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    freed = freed + (tonumber(redis.call('HGET', KEYS[2], ids[i])) or 0)
    if freed >= need then free_at = tonumber(ids[i + 1]); break end
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
return {ok and 1 or 0, count, used, first[2] or -1, last[2] or -1, free_at, now}
"""

# KEYS as above; ARGV: the entry's id, its real tokens. An expired entry is left alone.
_CORRECT = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
return 1
"""


class RedisWindows:
    """Windows in Redis, shared by every replica that names the same server."""

    def __init__(self, url: str, timeout_s: float, prefix: str = "distillgate:rl") -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.prefix = prefix
        self._admit = self.client.register_script(_ADMIT)
        self._correct = self.client.register_script(_CORRECT)

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}:{{{key}}}"  # one hash slot per key: a cluster runs the script
        return [f"{base}:log", f"{base}:entries", f"{base}:tokens"]

    async def _figures(
        self, key: str, quota: Quota, cost: int, window_s: float, member: str
    ) -> tuple[bool, Figures]:
        args = [int(window_s * 1000), _or(quota.rpm), _or(quota.tpm), cost, member]
        ok, count, used, first, last, free_at, now = (
            int(x) for x in await self._admit(keys=self._keys(key), args=args)
        )
        s = 1000.0
        return bool(ok), Figures(
            now / s, count, used, None if first < 0 else first / s,
            None if last < 0 else last / s, None if free_at < 0 else free_at / s,
        )  # fmt: skip

    async def admit(
        self, key: str, quota: Quota, cost: int, window_s: float
    ) -> tuple[Verdict, Ticket | None]:
        member = uuid.uuid4().hex[:16]
        ok, figures = await self._figures(key, quota, cost, window_s, member)
        ticket = Ticket(key, member, cost, self) if ok else None
        return verdict(ok, figures, quota, cost, window_s), ticket

    async def correct(self, ticket: Ticket, tokens: int, window_s: float) -> None:
        args = [str(ticket.entry), tokens]
        await self._correct(keys=self._keys(ticket.key), args=args)

    async def peek(self, key: str, quota: Quota, window_s: float) -> Verdict:
        _, figures = await self._figures(key, quota, 0, window_s, "")
        return verdict(True, figures, quota, 0, window_s)

    async def close(self) -> None:
        await self.client.aclose()


def _or(limit: int | None) -> int:
    return -1 if limit is None else limit


# -- the limiter the gateway uses ------------------------------------------------------------


@dataclass
class Limiter:
    """Admission for keyed requests. `shared` (Redis) when configured, else `local`;
    `on_redis_error` decides what a Redis failure means for the request."""

    metrics: Metrics | None
    window_s: float = 60.0
    shared: RedisWindows | None = None
    on_redis_error: Literal["local", "open", "closed"] = "local"
    local: LocalWindows | None = None
    down_until: float = 0.0
    warned: float = -math.inf

    def __post_init__(self) -> None:
        self.local = self.local or LocalWindows()
        self.pending: set[asyncio.Task[None]] = set()

    async def admit(self, key: str, quota: Quota, cost: int) -> tuple[Verdict, Ticket | None]:
        """Admit or refuse (RateLimited, with the headers for the response, is the
        caller's to raise); 503 when Redis fails and `on_redis_error` is closed."""
        windows = await self._windows()
        if windows is None:  # Redis failed a moment ago and the fallback is "open"
            return Verdict(True, quota, None, None, 0.0), None
        try:
            return await windows.admit(key, quota, cost, self.window_s)
        except Exception as exc:  # any Redis or connection error: fall back as configured
            self._failed(exc)
            return await self.admit(key, quota, cost)

    async def peek(self, key: str, quota: Quota) -> Verdict | None:
        windows = await self._windows()
        if windows is None:
            return None
        try:
            return await windows.peek(key, quota, self.window_s)
        except Exception as exc:
            self._failed(exc)
            return None

    def settle(self, ticket: Ticket, estimate: int) -> Listener:
        """The Tracker listener that corrects the reservation to the real usage: the
        prompt and completion tokens of a request that produced output (the prompt
        estimate when it ended before its usage was known); nothing for one refused or
        cancelled before its first token. One that failed before it with a server error
        keeps its reservation: failover may retry it on another model, whose ending then
        corrects the same entry (corrections set the tokens, in order)."""
        previous: list[asyncio.Task[None] | None] = [None]

        def on_end(ending: Ending) -> None:
            if ending.ttft_s is None:
                if ending.status >= 500:
                    return
                used = 0
            else:
                used = (ending.prompt_tokens or estimate) + ending.completion_tokens
            task = asyncio.ensure_future(self._correct(ticket, used, previous[0]))
            previous[0] = task
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

        return on_end

    async def _correct(self, ticket: Ticket, tokens: int, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)
        try:
            await ticket.where.correct(ticket, tokens, self.window_s)
        except Exception as exc:
            self._failed(exc)

    async def _windows(self) -> Windows | None:
        if self.shared is None or time.monotonic() >= self.down_until:
            return self.shared or self.local
        if self.on_redis_error == "closed":
            raise ServiceUnavailable(
                "The rate limiter's shared store (Redis) cannot be reached; try again shortly.",
                retry_after=REDIS_RETRY_S,
            )
        return self.local if self.on_redis_error == "local" else None

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.down_until = now + REDIS_RETRY_S
        if self.metrics is not None:
            self.metrics.rate_limit_errors.labels(self.on_redis_error).inc()
        if now - self.warned >= WARN_EVERY_S:
            self.warned = now
            log.warning(
                "rate limits: Redis failed (%s); for now %s", exc,
                {"local": "each replica limits alone", "open": "requests are not limited",
                 "closed": "keyed requests get 503"}[self.on_redis_error],
            )  # fmt: skip

    async def close(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()


def reservation(prompt_text: str, max_tokens: int, n: int) -> tuple[int, int]:
    """(tokens reserved at admission, the prompt's estimate)."""
    prompt = max(1, math.ceil(len(prompt_text) / CHARS_PER_TOKEN))
    return prompt + n * max_tokens, prompt


def tokens_of(requests: Sequence[object]) -> tuple[str, int, int]:
    """The prompt text, max_tokens and n of a job's generation requests."""
    first = requests[0]
    messages = getattr(first, "messages", None)
    text = (
        "\n".join(str(m.get("content", "")) for m in messages)
        if messages
        else str(getattr(first, "prompt", "") or "")
    )
    return text, first.params.max_tokens, len(requests)  # type: ignore[attr-defined]
