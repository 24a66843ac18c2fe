"""Students hot-added from the model store (gateway/students.py): the decision as a pure
function, then the real app with tiny random-weight Llamas registered in a temporary store
while it serves: a student appears and answers by name, a hot-add under load loses no
request, a broken entry is skipped and logged once, the least recently used beyond
max_loaded is unloaded (and reloaded when asked for), a retired one is unloaded only after
its in-flight request has finished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.adapt.log import TrafficLog, database_url
from gateway.adapt.rollout import Rollout
from gateway.adapt.state import AdaptState
from gateway.app import create_app
from gateway.config import parse_config
from gateway.state import Gateway
from gateway.students import Plan, plan
from models.backends.base import GenerationRequest, SamplingParams
from models.store import Adaptation, Manifest, ModelStore

TASK = "support-tickets"
CHAT = [{"role": "user", "content": "My invoice is wrong, please help."}]


# -- the decision ---------------------------------------------------------------------


def _plan(found, served, max_loaded=2, failed=None, parked=(), wanted=(), retired=()) -> Plan:
    return plan(found, served, failed=failed or {}, parked=set(parked), wanted=set(wanted),
                retired=set(retired), max_loaded=max_loaded)  # fmt: skip


def test_plan_loads_the_newest_first_and_evicts_the_least_recently_used() -> None:
    moves = _plan({"a": 1.0, "b": 3.0, "c": 2.0}, {}, max_loaded=2)
    assert moves == Plan(load=("b", "c"), park=("a",))
    moves = _plan({"x": 1.0, "y": 1.0, "n": 5.0}, {"x": 20.0, "y": 10.0}, max_loaded=2)
    assert moves == Plan(load=("n",), evict=("y",))


def test_plan_skips_failed_retired_and_parked_until_asked() -> None:
    found = {"bad": 1.0, "old": 2.0, "gone": 3.0}
    moves = _plan(found, {"s": 1.0}, max_loaded=1, failed={"bad": 1.0}, parked={"old"},
                  retired={"gone"})  # fmt: skip
    assert moves == Plan()  # nothing to load, and no room for the parked one
    assert _plan({"bad": 2.0}, {}, failed={"bad": 1.0}).load == ("bad",)  # manifest changed
    moves = _plan({"old": 2.0}, {"s": 1.0}, max_loaded=1, parked={"old"}, wanted={"old"})
    assert moves == Plan(load=("old",), evict=("s",))
    assert _plan({"old": 2.0}, {}, max_loaded=1, parked={"old"}).load == ("old",)  # free slot
    moves = _plan({"s": 1.0}, {"s": 5.0}, retired={"s"})
    assert moves == Plan(retire=("s",))


# -- the real gateway -----------------------------------------------------------------


def _register(
    store: ModelStore, name: str, source: Path, broken: bool = False, task: str | None = None
) -> None:
    """A student as the loop registers it. Without a task unless asked: each task refits
    routing's domain detection, which takes seconds here."""

    def write(out: Path) -> None:
        shutil.copytree(source, out, dirs_exist_ok=True)
        if broken:
            (out / "config.json").write_text("{ this is not json")

    adaptation = Adaptation(fingerprint=f"fp-{name}", job=1, teacher="teacher",
                            base="teacher", target=0.9)  # fmt: skip
    store.register(Manifest(name=name, role="student", parent="teacher", task=task,
                            adaptation=adaptation), write)  # fmt: skip


def _config(store: ModelStore, teacher: Path, max_loaded: int = 4, traffic: bool = False):
    return parse_config({
        "models": [{"name": "teacher", "backend": "local", "role": "teacher",
                    "path": str(teacher), "max_batch_size": 4}],
        "students": {"from_store": True, "max_loaded": max_loaded, "max_batch_size": 2},
        "traffic": {"enabled": traffic},
        "limits": {"max_tokens": 200, "default_max_tokens": 2, "request_timeout_s": 30},
        "store": str(store.root),
    })  # fmt: skip


def _until(check: Callable[[], object], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _serving(store: ModelStore, teacher: Path, **config) -> Iterator[TestClient]:
    app = create_app(_config(store, teacher, **config), store)
    with TestClient(app, raise_server_exceptions=False) as client:
        _until(lambda: client.get("/ready").status_code == 200, 60, "ready")
        client.app.state.gateway.students.every_s = 0.0  # a pass at every refresh tick
        yield client


def _listed(client: TestClient) -> set[str]:
    return {m["id"] for m in client.get("/v1/models").json()["data"]}


def _ask(client: TestClient, model: str, max_tokens: int = 2):
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0}
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.mark.slow
def test_hot_add_under_load_loses_no_request(store: ModelStore, tiny_model_dir: Path) -> None:
    with _serving(store, tiny_model_dir) as client:
        gw: Gateway = client.app.state.gateway
        assert "adapted-a" not in _listed(client)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(_ask(client, "teacher").status_code)

        clients = [threading.Thread(target=load) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(0.5)
            before = len(statuses)
            _register(store, "adapted-a", tiny_model_dir, task=TASK)
            _until(lambda: "adapted-a" in _listed(client), what="the student listed")
            answer = _ask(client, "adapted-a")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in clients:
                t.join()
        assert answer.status_code == 200 and answer.json()["model"] == "adapted-a"
        assert len(statuses) > before > 0 and set(statuses) == {200}, statuses
        # routing knows it (its manifest, its task as a domain) and the store protects it
        router = gw.router
        assert router is not None
        _until(lambda: "adapted-a" in router.models.manifests, 30, "routing refitted")
        assert router.models.table.reference.get(TASK) == "teacher"
        assert any("adapted-a" in names for names in store.leases().values())
    assert not store.leases()  # released on stop


@pytest.mark.slow  # a gateway on a real model, waiting for discovery passes
def test_broken_entry_is_skipped_and_logged_once(
    store: ModelStore, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distillgate")
    with _serving(store, tiny_model_dir) as client:
        _register(store, "adapted-bad", tiny_model_dir, broken=True)
        _register(store, "adapted-good", tiny_model_dir)
        _until(lambda: "adapted-good" in _listed(client), what="the good student listed")
        time.sleep(2.5)  # two more passes: the broken one is not retried
        assert "adapted-bad" not in _listed(client)
        assert _ask(client, "adapted-bad").status_code == 404
        assert _ask(client, "adapted-good").status_code == 200
        assert _ask(client, "teacher").status_code == 200
        assert client.get("/health").status_code == 200
    errors = [r for r in caplog.records if "adapted-bad" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert "until its manifest changes" in errors[0].getMessage()


@pytest.mark.slow
def test_least_recently_used_is_unloaded_and_reloaded_when_asked(
    store: ModelStore, tiny_model_dir: Path
) -> None:
    with _serving(store, tiny_model_dir, max_loaded=2) as client:
        _register(store, "adapted-a", tiny_model_dir)
        _register(store, "adapted-b", tiny_model_dir)
        _until(lambda: {"adapted-a", "adapted-b"} <= _listed(client), what="a and b listed")
        assert _ask(client, "adapted-a").status_code == 200  # b is now the least recent
        _register(store, "adapted-c", tiny_model_dir)
        _until(lambda: "adapted-c" in _listed(client), what="c listed")
        _until(lambda: "adapted-b" not in _listed(client), 5, "b unloaded")
        assert "adapted-a" in _listed(client)
        time.sleep(1.5)
        assert "adapted-b" not in _listed(client)  # parked: no eviction ping-pong
        asked = _ask(client, "adapted-b")  # asked for by name: reloaded, a evicted
        assert asked.status_code == 503 and asked.headers["retry-after"] == "2"
        assert "being loaded" in asked.json()["error"]["message"]
        _until(lambda: _ask(client, "adapted-b").status_code == 200, what="b back")
        assert _listed(client) >= {"adapted-b", "adapted-c"}
        assert "adapted-a" not in _listed(client)


async def test_retired_student_is_unloaded_after_its_request_finishes(
    store: ModelStore, tiny_model_dir: Path
) -> None:
    gw = Gateway(_config(store, tiny_model_dir, traffic=True), store)
    await gw.start()
    try:
        assert gw.students is not None
        _register(store, "adapted-r", tiny_model_dir)
        await gw.students._pass()
        served = gw.students.served["adapted-r"]
        assert gw.backend("adapted-r") is served and await served.health()
        # a request in flight: its first token read, the rest not yet
        request = GenerationRequest("r1", SamplingParams(max_tokens=40, temperature=0),
                                    messages=tuple(CHAT))  # fmt: skip
        stream = gw.backend("adapted-r").generate(request)
        first = await anext(stream)
        log = TrafficLog.open(database_url(None, store.root))
        retired = Rollout("adapted-r", TASK, "retired", 0.0, 0.9, time.time(), 0, "test")
        await asyncio.to_thread(AdaptState(log.engine).start_rollout, retired)
        log.close()
        await gw.students._pass()
        assert gw.router is not None and gw.router.rollouts["adapted-r"].stage == "retired"
        assert gw.config.model("adapted-r") is None and "adapted-r" not in gw.backends
        await asyncio.sleep(1.0)  # past the settle time: still draining, still running
        assert await served.health() and "adapted-r" in gw.students.draining
        chunks = [first, *[c async for c in stream]]
        assert chunks[-1].finish_reason is not None and chunks[-1].completion_tokens > 1
        for _ in range(200):  # stopped, then out of `draining` (stop() may take a moment)
            if not await served.health() and not gw.students.draining:
                break
            await asyncio.sleep(0.05)
        assert not await served.health() and not gw.students.draining
        await gw.students._pass()  # retired: never loaded again
        assert "adapted-r" not in gw.backends
    finally:
        await gw.stop()
