"""Students served from the model store without a restart (`students.from_store`): the
adaptation loop's registered students are found, loaded, warmed up and added to the running
gateway; retired ones, and the least recently used beyond `students.max_loaded`, are taken
out of service and stopped once their in-flight requests are done. Each pass also hands the
loop's rollouts (gateway/adapt/state.py) to the router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config import LocalModel
from gateway.routing.router import is_auto
from models.backends.base import (
    Backend,
    GenerationChunk,
    GenerationRequest,
    Load,
    ModelCard,
    SamplingParams,
)
from models.store import MANIFEST, StoreError

if TYPE_CHECKING:
    from gateway.adapt.log import TrafficLog
    from gateway.adapt.rollout import Rollout
    from gateway.adapt.state import AdaptState
    from gateway.state import Gateway

log = logging.getLogger("distillgate")

EVERY_S = 2.0  # between discovery passes
# After a student leaves the config, a request that resolved it just before may not have
# reached its generate() yet (a few awaits away); unloading waits this long first.
SETTLE_S = 0.5
WARMUP = GenerationRequest("warmup", SamplingParams(max_tokens=1, temperature=0.0), prompt="Hi")


@dataclass(frozen=True)
class Plan:
    """One pass's moves: students to load (in this order), to unload because their rollout
    is retired, to unload to make room (least recently used first, only as many as the
    loads that succeed need) and to leave parked for want of a free slot."""

    load: tuple[str, ...] = ()
    retire: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    park: tuple[str, ...] = ()


def plan(
    found: Mapping[str, float], served: Mapping[str, float], *, failed: Mapping[str, float],
    parked: Set[str], wanted: Set[str], retired: Set[str], max_loaded: int,
) -> Plan:  # fmt: skip
    """`found`: the loop's students in the store -> their manifest's stamp; `served`: the
    hot-added ones -> when last used; `failed`: name -> the stamp that failed to load (not
    retried until the manifest changes); `parked`: unloaded for room, reloaded only when
    asked for by name (`wanted`) or when a slot is free, so two students never evict each
    other pass after pass."""
    retire = tuple(sorted(n for n in served if n in retired))
    kept = {n: t for n, t in served.items() if n not in retired}
    new = [n for n in found
           if n not in served and n not in retired and failed.get(n) != found[n]]  # fmt: skip
    # Asked-for first, then the newest: the loop has just made it for traffic that waits.
    new.sort(key=lambda n: (n not in wanted, -found[n], n))
    eager = [n for n in new if n not in parked or n in wanted]
    idle = [n for n in new if n in parked and n not in wanted]
    load = eager[:max_loaded]
    room = max_loaded - len(kept) - len(load)
    load += idle[: max(room, 0)]
    excess = len(kept) + len(load) - max_loaded
    evict = sorted(kept, key=lambda n: (kept[n], n))[: max(excess, 0)]
    return Plan(tuple(load), retire, tuple(evict), tuple(eager[max_loaded:]))


@dataclass(eq=False)
class Tracked:
    """A hot-added student's backend as the gateway holds it: the same protocol, counting
    the generations in flight (unloading waits for them: the backend's own `load()` misses
    a request between being routed and queued, and one in its prefill) and the time of the
    last one (for least-recently-used unloading). Named, routed and shadow requests all
    pass through `generate`."""

    inner: Backend
    name: str = field(init=False)
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.active += 1
        self.last_used = time.monotonic()
        try:
            async with contextlib.aclosing(self.inner.generate(request)) as stream:
                async for chunk in stream:
                    yield chunk
        finally:
            self.active -= 1

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def health(self) -> bool:
        return await self.inner.health()

    def card(self) -> ModelCard:
        return self.inner.card()

    def load(self) -> Load:
        return self.inner.load()


@dataclass
class HotStudents:
    """The gateway's hot-added students and the loop's rollouts, kept current by `tick()`
    (called from the gateway's refresh loop; each pass runs as its own task, one at a
    time, and a failing pass is logged and retried at the next tick)."""

    gw: Gateway
    every_s: float = EVERY_S
    served: dict[str, Tracked] = field(default_factory=dict)
    draining: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    failed: dict[str, float] = field(default_factory=dict)  # name -> stamp that failed
    parked: set[str] = field(default_factory=set)
    wanted: set[str] = field(default_factory=set)
    rollouts: dict[str, Rollout] = field(default_factory=dict)
    traffic_log: TrafficLog | None = None
    state: AdaptState | None = None
    state_error: str | None = None
    task: asyncio.Task[None] | None = None
    last: float = -float("inf")
    static: frozenset[str] = field(init=False)
    stored: tuple[str, ...] = field(init=False)  # static models served from the store

    def __post_init__(self) -> None:
        models = self.gw.config.models
        self.static = frozenset(m.name for m in models)
        self.stored = tuple(m.name for m in models if isinstance(m, LocalModel) and not m.path)

    def tick(self) -> None:
        """Start a pass when one is due (sooner when a parked student was asked for)."""
        if self.task is not None and not self.task.done():
            return
        now = time.monotonic()
        if now - self.last < self.every_s and not self.wanted:
            return
        self.last = now
        self.task = asyncio.create_task(self._guarded_pass())

    def wake(self, name: str) -> bool:
        """A request named `name`: if it is a parked student, load it at the next pass."""
        if name not in self.parked:
            return False
        self.wanted.add(name)
        return True

    async def close(self) -> None:
        """Stop the pass and the drains (the gateway stops the backends still served)."""
        tasks = [t for t in (self.task, *self.draining.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.traffic_log is not None:
            await asyncio.to_thread(self.traffic_log.close)
            self.traffic_log = self.state = None

    async def _guarded_pass(self) -> None:
        try:
            await self._pass()
        except Exception:
            log.exception("students: discovery pass failed; retrying at the next one")

    async def _pass(self) -> None:
        await self._read_rollouts()
        if not self.gw.config.students.from_store:
            return
        found = await asyncio.to_thread(self._scan)
        self.parked &= found.keys()  # removed from the store: forget it
        self.wanted &= found.keys()
        found = {n: s for n, s in found.items() if n not in self.draining}
        retired = {n for n, r in self.rollouts.items() if r.stage == "retired"}
        served = {n: t.last_used for n, t in self.served.items()}
        moves = plan(found, served, failed=self.failed, parked=self.parked, wanted=self.wanted,
                     retired=retired, max_loaded=self.gw.config.students.max_loaded)  # fmt: skip
        self.parked |= set(moves.park)
        before = set(self.served)
        for name in moves.retire:
            self._unload(name, "its rollout is retired")
        evict, limit = list(moves.evict), self.gw.config.students.max_loaded
        for name in moves.load:
            self.parked.discard(name)
            self.wanted.discard(name)
            if not await self._load(name, found[name]):
                continue
            while len(self.served) > limit and evict:
                victim = evict.pop(0)
                self.parked.add(victim)
                self._unload(victim, f"least recently used beyond max_loaded={limit}")
        if set(self.served) != before:
            # Once per pass: refitting domain detection takes seconds (thousands of
            # examples); until then a new student's quality is unknown to routing.
            await self.gw.refresh_router()

    # -- the loop's rollouts -------------------------------------------------------------

    async def _read_rollouts(self) -> None:
        """The rollouts from the traffic log's database (opened once, lazily); when it
        cannot be read, the last ones read stay, the reason is logged once."""
        traffic = self.gw.config.traffic
        if not traffic.enabled:
            return
        try:
            if self.state is None:
                self.traffic_log, self.state = await asyncio.to_thread(self._open_state)
            rollouts = await asyncio.to_thread(self.state.rollouts)
        except Exception as exc:
            if self.state_error is None:
                log.warning("students: cannot read the rollouts (retrying each pass): %s", exc)
            self.state_error = str(exc)
            return
        if self.state_error is not None:
            log.info("students: the rollouts can be read again")
            self.state_error = None
        self.rollouts = rollouts
        router = self.gw.router
        if router is not None and router.rollouts != rollouts:
            router.rollouts = rollouts  # replaced whole: the router keys its cache on identity

    def _open_state(self) -> tuple[TrafficLog, AdaptState]:
        from gateway.adapt.log import TrafficLog, database_url
        from gateway.adapt.state import AdaptState

        traffic_log = TrafficLog.open(database_url(self.gw.config.traffic.dsn, self.gw.store.root))
        return traffic_log, AdaptState(traffic_log.engine)

    # -- the store -------------------------------------------------------------------

    def _scan(self) -> dict[str, float]:
        """The loop's students in the store (student manifests with an adaptation record)
        -> their manifest's mtime. Blocking. A manifest that cannot be read is logged once
        per version and skipped; the gateway's own models and router names are not taken."""
        store = self.gw.store
        if not store.root.is_dir():
            return {}
        found: dict[str, float] = {}
        for path in sorted(store.root.iterdir()):
            name = path.name
            if name.startswith(".") or name in self.static or is_auto(name):
                continue
            try:
                if not store.has(name):
                    continue
                stamp = (path / MANIFEST).stat().st_mtime
            except (StoreError, OSError):
                continue  # not a whole model, or no manifest: not one of the loop's students
            try:
                manifest = store.manifest(name)
            except (StoreError, OSError) as exc:
                self._failed(name, stamp, f"unreadable manifest: {exc}")
                continue
            if manifest.role == "student" and manifest.adaptation is not None:
                found[name] = stamp
        return found

    def _failed(self, name: str, stamp: float, reason: str) -> None:
        if self.failed.get(name) != stamp:
            log.error("students: skipping %s until its manifest changes: %s", name, reason)
        self.failed[name] = stamp

    # -- loading and unloading ---------------------------------------------------------

    async def _load(self, name: str, stamp: float) -> bool:
        """Build, start and warm up `name` before the gateway sees it, then add it; a
        failure is logged once and the student skipped until its manifest changes."""
        gw = self.gw
        backend: Backend | None = None
        try:
            model = LocalModel(name=name, backend="local", role="student",
                               max_batch_size=gw.config.students.max_batch_size)  # fmt: skip
            backend = await asyncio.to_thread(gw.make_backend, model)
            if not any(isinstance(m, LocalModel) for m in gw.config.models):
                from models.backends.local import set_threads

                set_threads(gw.config.threads)  # as _start_all does for configured models
            await backend.start()
            await _warm_up(backend, gw.config.limits.request_timeout_s)
        except Exception as exc:
            self._failed(name, stamp, f"could not load it: {exc!r}")
            if backend is not None:
                await _stop_quietly(backend)
            return False
        except asyncio.CancelledError:
            if backend is not None:
                await _stop_quietly(backend)
            raise
        tracked = self.served[name] = Tracked(backend)
        # A new frozen config, then the same backends dict the router, the recorder and
        # the metrics hold: a request sees the model in both or in neither.
        gw.config = gw.config.model_copy(update={"models": [*gw.config.models, model]})
        gw.backends[name] = tracked
        if gw.router is not None:
            gw.router.config = gw.config
        self._lease()
        log.info("students: serving %s (hot-added from the store)", name)
        return True

    def _unload(self, name: str, why: str) -> None:
        """Out of the config, the backends and routing first (new requests stop going
        there); stopped in the background once its requests have finished."""
        gw = self.gw
        tracked = self.served.pop(name)
        gw.config = gw.config.model_copy(
            update={"models": [m for m in gw.config.models if m.name != name]}
        )
        gw.backends.pop(name, None)
        if gw.router is not None:
            gw.router.config = gw.config
        log.info("students: unloading %s: %s", name, why)
        self.draining[name] = asyncio.create_task(self._drain(name, tracked))

    async def _drain(self, name: str, tracked: Tracked) -> None:
        limit = self.gw.config.limits.request_timeout_s
        try:
            await asyncio.sleep(SETTLE_S)
            deadline = time.monotonic() + limit
            while tracked.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if tracked.active:
                log.warning("students: %s still has %d request(s) after %g s "
                            "(limits.request_timeout_s); stopping it", name, tracked.active,
                            limit)  # fmt: skip
        finally:
            await _stop_quietly(tracked.inner)
            self.draining.pop(name, None)
            self._lease()
        log.info("students: unloaded %s", name)

    def _lease(self) -> None:
        """So that `distillgate students remove` refuses what this gateway serves."""
        names = [*self.stored, *self.served, *self.draining]
        if names:
            self.gw.store.lease(names)
        else:
            self.gw.store.release()


async def _warm_up(backend: Backend, timeout_s: float) -> None:
    """One short generation, so the first routed request pays no first-call costs."""
    async with asyncio.timeout(timeout_s):
        async with contextlib.aclosing(backend.generate(WARMUP)) as stream:
            async for _ in stream:
                pass


async def _stop_quietly(backend: Backend) -> None:
    try:
        await backend.stop()
    except Exception:
        log.exception("students: stopping %s failed", backend.name)
