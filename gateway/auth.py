"""API keys: their format and hash, the key table in the traffic log's database, the
check every request passes (`auth.mode: keys`), and the per-key rate limits' admission.

A key is "dg-" + 32 random bytes (url-safe base64, 43 characters); the database keeps its
name, SLO class, limits, dates, an 11-character prefix for display and lookup, a random
salt and HMAC-SHA256(salt, key). Not argon2 or scrypt: a slow hash protects guessable
passwords, and a 256-bit random key cannot be guessed, so it would only add milliseconds
to every request; a per-key salt instead of a server secret leaves no secret to hand to
every replica and CLI. The gateway reads the table every `auth.refresh_s` seconds (a
revoked key stops working within that) and checks requests against its copy in memory,
in microseconds and never touching the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from gateway.errors import (
    AuthenticationError,
    GatewayError,
    ServiceUnavailable,
    error_response,
)
from gateway.limits import Limiter, Quota, RedisWindows, Verdict, reservation, tokens_of

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from sqlalchemy.engine import Engine

    from gateway.api.tracking import Listener
    from gateway.config import GatewayConfig
    from gateway.metrics import Metrics
    from gateway.state import Gateway

log = logging.getLogger("distillgate")

PREFIX = "dg-"
SHOWN = len(PREFIX) + 8  # the part of a key kept in clear: shown by `keys list`, looked up
_LOCK = 0x6B65_7973  # "keys": the PostgreSQL advisory lock around creating the table
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN_PATHS = ("/health", "/ready", "/openapi.json", "/docs", "/redoc")
REASONS = ("missing", "invalid", "revoked", "expired", "unavailable")


class KeyStoreError(Exception):
    """A key command that cannot be done (a name taken, a key that does not exist)."""


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(salt: bytes, secret: str) -> bytes:
    return hmac.digest(salt, secret.encode(), "sha256")  # one C call, about a microsecond


def masked(secret: str) -> str:
    """A key as error messages show it: OpenAI's `sk-abc***xyz` style."""
    return f"{secret[:SHOWN]}***{secret[-4:]}" if len(secret) > SHOWN + 8 else "***"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One row of the key table (never the key itself)."""

    name: str
    prefix: str
    salt: bytes
    digest: bytes
    slo_class: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    created: float = 0.0
    expires: float | None = None
    revoked: float | None = None

    def public(self) -> dict[str, Any]:
        """What `keys list` shows."""
        return {
            "name": self.name, "prefix": self.prefix, "class": self.slo_class,
            "rpm": self.rpm, "tpm": self.tpm, "created": _iso(self.created),
            "expires": _iso(self.expires), "revoked": _iso(self.revoked),
        }  # fmt: skip


_FIELDS = tuple(f.name for f in dataclasses.fields(ApiKey))


@dataclass(frozen=True, slots=True)
class Caller:
    """Who an authenticated request comes from: the key's name, class and limits."""

    name: str
    slo_class: str | None
    quota: Quota


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # one of REASONS
    message: str

    def error(self) -> GatewayError:
        if self.reason == "unavailable":
            return ServiceUnavailable(self.message, retry_after=5)
        return AuthenticationError(self.message)


@dataclass(frozen=True)
class KeyTable:
    """The keys by display prefix (a prefix shared by two keys holds both)."""

    by_prefix: Mapping[str, tuple[ApiKey, ...]]

    @classmethod
    def of(cls, keys: Sequence[ApiKey]) -> KeyTable:
        out: dict[str, tuple[ApiKey, ...]] = {}
        for key in keys:
            out[key.prefix] = (*out.get(key.prefix, ()), key)
        return cls(out)


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def check(table: KeyTable, authorization: str | None, now: float) -> Caller | Refusal:
    """The caller an Authorization header proves, or why not. The digests are compared in
    constant time; what differs in time is only whether the non-secret prefix exists."""
    secret = bearer(authorization)
    if secret is None:
        return Refusal("missing", "You didn't provide an API key. Send it in an Authorization "
                       "header using Bearer auth (Authorization: Bearer dg-...).")  # fmt: skip
    found = None
    for key in table.by_prefix.get(secret[:SHOWN], ()):
        if hmac.compare_digest(digest(key.salt, secret), key.digest):
            found = key
    if found is None:
        return Refusal("invalid", f"Incorrect API key provided: {masked(secret)}.")
    if found.revoked is not None:
        return Refusal("revoked", f"The API key {masked(secret)} has been revoked.")
    if found.expires is not None and found.expires <= now:
        return Refusal("expired", f"The API key {masked(secret)} expired at "
                       f"{_iso(found.expires)}.")  # fmt: skip
    return Caller(found.name, found.slo_class, Quota(found.rpm, found.tpm))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def exposure(mode: str | None, host: str) -> tuple[str, str] | None:
    """("error" | "warning", message) when `serve` would answer anyone on a network:
    keys unset on a non-loopback address is refused, an explicit `none` is warned about."""
    if mode == "keys" or _loopback(host):
        return None
    if mode is None:
        return "error", (
            f"refusing to serve on {host} without API keys; set `auth: {{mode: keys}}` in the "
            "config (and create keys with `distillgate keys create`), or `auth: {mode: none}` "
            "to let anyone who reaches the port call it, or use --host 127.0.0.1"
        )
    return "warning", (
        f"serving on {host} with `auth.mode: none`: anyone who reaches this port may call "
        "every model; set `auth: {mode: keys}` to require API keys"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


# -- the key table -------------------------------------------------------------------------


def keys_table(md: sa.MetaData) -> sa.Table:
    """`api_keys`, created on first use with its own create_all (no traffic-log schema
    version): revoked rows stay, so a name is never given to a second key."""
    text = sa.Text
    return sa.Table(
        "api_keys", md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("name", text, nullable=False, unique=True),
        sa.Column("prefix", text, nullable=False),
        sa.Column("salt", sa.LargeBinary, nullable=False),
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("slo_class", text),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.BigInteger),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("expires", sa.Float),
        sa.Column("revoked", sa.Float),
        sqlite_autoincrement=True,
    )  # fmt: skip


class KeyStore:
    """The key table in one database. Blocking methods (a thread in async code)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.table = keys_table(sa.MetaData())

    @classmethod
    def open(cls, url: str) -> KeyStore:
        """The traffic log's database at `url` (opened and migrated as the log does, so
        its errors are TrafficLogError), with the key table created if missing."""
        from gateway.adapt.log import TrafficLog

        store = cls(TrafficLog.open(url).engine)
        try:
            with store.engine.connect() as conn:
                conn.execution_options(sqlite_immediate=True)  # one creator at a time
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK)))
                    store.table.metadata.create_all(conn, checkfirst=True)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def create(
        self, name: str, slo_class: str | None, rpm: int | None, tpm: int | None,
        expires: float | None, now: float,
    ) -> tuple[ApiKey, str]:  # fmt: skip
        """A new key and its secret (shown once; only its salted digest is stored)."""
        secret, salt = new_secret(), secrets.token_bytes(16)
        key = ApiKey(name, secret[:SHOWN], salt, digest(salt, secret), slo_class, rpm, tpm,
                     now, expires)  # fmt: skip
        row = {f: getattr(key, f) for f in _FIELDS}
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(self.table).values(**row))
        except sa.exc.IntegrityError:
            raise KeyStoreError(
                f"a key named {name!r} exists already (names are never reused, even after "
                "`keys revoke`); choose another name"
            ) from None
        return key, secret

    def all(self) -> list[ApiKey]:
        cols = [self.table.c[f] for f in _FIELDS]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*cols).order_by(self.table.c.id)).all()
        return [ApiKey(*row) for row in rows]

    def revoke(self, name: str, now: float) -> ApiKey:
        t = self.table
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(t).where(t.c.name == name, t.c.revoked.is_(None)).values(revoked=now)
            ).rowcount
        if not done:
            known = any(k.name == name for k in self.all())
            raise KeyStoreError(f"key {name!r} is revoked already" if known else
                                f"no key named {name!r}; see `distillgate keys list`")  # fmt: skip
        return next(k for k in self.all() if k.name == name)


# -- in the gateway ------------------------------------------------------------------------


@dataclass
class Guard:
    """The gateway's side: the key table kept fresh, the middleware that checks keys and
    adds the rate-limit headers, and the limiter (built in `start`)."""

    config: GatewayConfig
    table: KeyTable | None = None  # None until first loaded
    store: KeyStore | None = None
    limiter: Limiter | None = None
    metrics: Metrics | None = None
    task: asyncio.Task[None] | None = None
    failing_since: float | None = None

    @property
    def keys_on(self) -> bool:
        return self.config.auth.mode == "keys"

    def install(self, app: FastAPI) -> None:
        app.state.guard = self
        app.add_middleware(_Middleware, guard=self)

    async def start(self, gw: Gateway) -> None:
        """Build the limiter and, with keys on, load the key table (waiting for the first
        attempt: an unreachable database answers 503 until a later one succeeds)."""
        from gateway.adapt.log import database_url

        self.metrics, limits = gw.metrics, self.config.limits
        for reason in REASONS:  # zeros to alert on
            gw.metrics.auth_failures.labels(reason)
        shared = None
        if limits.redis_url:
            shared = RedisWindows(limits.redis_url, limits.redis_timeout_s)
        self.limiter = Limiter(gw.metrics, limits.rate_window_s, shared, limits.on_redis_error)
        if self.keys_on:
            url = database_url(self.config.traffic.dsn, gw.store.root)
            await self._reload(url)
            self.task = asyncio.create_task(self._refresh(url))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.limiter is not None:
            await self.limiter.close()
        if self.store is not None:
            self.store.close()

    async def _refresh(self, url: str) -> None:
        while True:
            await asyncio.sleep(self.config.auth.refresh_s)
            await self._reload(url)

    async def _reload(self, url: str) -> None:
        """Read the key table; on failure keep the last one (counted, logged once per
        outage) and reopen the database next time."""
        try:
            if self.store is None:
                self.store = await asyncio.to_thread(KeyStore.open, url)
            keys = await asyncio.to_thread(self.store.all)
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.key_refresh_errors.inc()
            if self.failing_since is None:
                self.failing_since = time.time()
                log.error("API keys: cannot read the key table (%s); %s", " ".join(
                    str(exc).split())[:300], "keeping the last one" if self.table else
                    "keyed requests get 503 until it can be read")  # fmt: skip
            if self.store is not None:
                await asyncio.to_thread(self.store.close)
                self.store = None
            return
        if self.failing_since is not None:
            log.info("API keys: the key table can be read again")
        self.failing_since = None
        self.table = KeyTable.of(keys)

    def protects(self, path: str) -> bool:
        if not self.keys_on or path.startswith(OPEN_PATHS):
            return False
        return path != "/metrics" or self.config.auth.metrics == "keys"

    def authenticate(self, authorization: str | None) -> Caller | Refusal:
        if self.table is None:
            return Refusal("unavailable", "The gateway cannot read its API keys yet; try "
                           "again shortly.")  # fmt: skip
        return check(self.table, authorization, time.time())

    async def admit(self, request: Request, requests: Sequence[Any]) -> Listener | None:
        """Reserve the request's tokens against its key's limits (429 when they are
        spent); the listener corrects the reservation when the request ends."""
        state = request.scope.get("state", {})
        caller: Caller | None = state.get("caller")
        if caller is None or not caller.quota or self.limiter is None:
            return None
        if "settle" in state:  # a failover retry of a request admitted already
            return state["settle"]
        text, max_tokens, n = tokens_of(requests)
        cost, estimate = reservation(text, max_tokens, n)
        verdict, ticket = await self.limiter.admit(caller.name, caller.quota, cost)
        state["ratelimit"] = verdict
        if ticket is None:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(caller.name, verdict.refused or "").inc()
            raise verdict.error(caller.name)
        state["settle"] = settle = self.limiter.settle(ticket, estimate)
        return settle


async def admit(request: Request, requests: Sequence[Any]) -> Listener | None:
    """`Guard.admit` of the app's guard (None when the app has none: nothing to limit)."""
    guard: Guard | None = getattr(request.app.state, "guard", None)
    return None if guard is None else await guard.admit(request, requests)


def caller_of(request: Request) -> Caller | None:
    """The key a request authenticated with (None with `auth.mode: none`)."""
    return request.scope.get("state", {}).get("caller")


Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Middleware:
    """Pure ASGI (no per-request task, unlike BaseHTTPMiddleware): refuse requests
    without a valid key, remember the caller in the request's state, and add the key's
    x-ratelimit-* headers to whatever response goes out."""

    def __init__(self, app: Callable[..., Awaitable[None]], guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        guard = self.guard
        if scope["type"] != "http" or not guard.protects(scope["path"]):
            return await self.app(scope, receive, send)
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
        outcome = guard.authenticate(authorization)
        if isinstance(outcome, Refusal):
            err = outcome.error()
            if guard.metrics is not None:
                guard.metrics.auth_failures.labels(outcome.reason).inc()
                guard.metrics.errors.labels("", err.type).inc()
            return await error_response(err)(scope, receive, send)
        state = scope.setdefault("state", {})
        state["caller"] = outcome
        if not outcome.quota:
            return await self.app(scope, receive, send)

        async def send_with_limits(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                verdict: Verdict | None = state.get("ratelimit")
                if verdict is None and guard.limiter is not None:
                    with contextlib.suppress(GatewayError):
                        verdict = await guard.limiter.peek(outcome.name, outcome.quota)
                if verdict is not None:
                    extra = [(k.encode(), v.encode()) for k, v in verdict.headers().items()]
                    message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)
