"""The adaptation loop end to end on a tiny model, in process: a scripted shift in a real
SQLite traffic log gives an event, a job, a student distilled from the logged teacher
answers, gated and registered, in shadow; logged agreement pairs move it to canary and
live; a drop in its audits rolls it back; a student that fails its gate is never
registered; a restart completes or resumes what a killed process left."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from gateway.adapt.job import Context
from gateway.adapt.log import TrafficLog, database_url
from gateway.adapt.process import AdaptMetrics, AdaptProcess
from gateway.adapt.records import SHADOW, TrafficRecord
from gateway.adapt.state import AdaptState
from gateway.config import parse_config
from gateway.routing.policy import PolicyFile
from models.store import Manifest, ModelStore

pytestmark = pytest.mark.slow
TEACHER = "tiny-teacher"
WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "grove", "harbor")


def _store(tmp: Path, tiny_model_dir: Path) -> ModelStore:
    store = ModelStore(tmp / "store")
    copy = lambda out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)  # noqa: E731
    store.register(Manifest(name=TEACHER, role="teacher"), copy)
    return store


def _context(tmp: Path, store: ModelStore, min_quality: float) -> Context:
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "classes": {"batch": {"min_quality": min_quality, "log_content": True}},
        "default_class": "batch",
    }))  # fmt: skip
    config = parse_config({
        "models": [{"name": TEACHER, "backend": "local", "role": "teacher"}],
        "routing": {"policy": str(policy)},
        "adapt": {"min_examples": 40, "max_examples": 80, "ratios": [0.5, 1.0], "epochs": 1,
                  "threads": 1, "nice": 0,
                  "rollout": {"min_pairs": 40, "step_pairs": 20, "steps": [0.1, 0.5]}},
    })  # fmt: skip
    log = TrafficLog.open(database_url(None, store.root))
    return Context(config, store, log, AdaptState(log.engine), None, PolicyFile.open(policy))


def _row(i: int, **fields) -> TrafficRecord:
    base = dict(ts=time.time(), request_id=f"r{i}", endpoint="chat", requested_model="auto",
                model=TEACHER, role="teacher", fingerprint=f"general-{i}", outcome="success",
                status=200, latency_ms=10.0, slo_class="batch", domain="general")  # fmt: skip
    return TrafficRecord(**{**base, **fields})


def _ticket(i: int) -> TrafficRecord:
    """The new traffic: one template, its teacher answer a label the prompt decides."""
    word = WORDS[i % len(WORDS)]
    prompt = f"Ticket {i}: my {word} order #{i * 7} is late. Category?"
    label = "shipping" if i % 3 else "billing"
    content = json.dumps({"messages": [{"role": "user", "content": prompt}]})
    return _row(i, fingerprint="fpnew", request=content, response=label)


def _shift(log: TrafficLog, start: int, n: int) -> int:
    """`n` requests, every third of them the new template; returns the next index."""
    log.insert([_ticket(i) if i % 3 == 0 else _row(i) for i in range(start, start + n)])
    return start + n


def _pairs(log: TrafficLog, student: str, n: int, agreement: float, start: int,
           reason: str = SHADOW, domain: str = "dom") -> None:  # fmt: skip
    log.insert([
        _row(start + i, model=student, role="student", route_reason=reason, agreement=agreement,
             domain=domain, fingerprint="fpnew")
        for i in range(n)
    ])  # fmt: skip


@pytest.fixture
def loop(tmp_path: Path, tiny_model_dir: Path):
    def make(min_quality: float) -> tuple[Context, AdaptProcess]:
        store = _store(tmp_path, tiny_model_dir)
        ctx = _context(tmp_path, store, min_quality)
        ctx.log.insert([_row(i) for i in range(600)])  # before the shift: the warm-up
        return ctx, AdaptProcess(ctx, AdaptMetrics())

    return make


def test_shift_to_live_and_rollback(loop) -> None:
    ctx, process = loop(0.0)
    _shift(ctx.log, 1000, 300)
    events = process.cycle(inline=True)
    assert [e.kind for e in events] == ["new_traffic"]
    job = ctx.state.job("fpnew")
    assert job is not None and job.status == "registered", job
    student = job.student
    assert student is not None and ctx.store.has(student)
    manifest = ctx.store.manifest(student)
    assert manifest.adaptation is not None and manifest.adaptation.teacher == TEACHER
    assert manifest.adaptation.rows["test"] >= 1 and manifest.task == job.record["task"]
    assert manifest.adaptation.measured is not None
    rollout = ctx.state.rollout(student)
    assert rollout is not None and (rollout.stage, rollout.share) == ("shadow", 0.0)

    domain = rollout.domain
    _pairs(ctx.log, student, 40, 1.0, 5000, domain=domain)
    process.cycle(inline=True)
    assert ctx.state.rollout(student).stage == "canary"
    _pairs(ctx.log, student, 20, 1.0, 6000, reason="cheapest_feasible", domain=domain)
    process.cycle(inline=True)
    assert ctx.state.rollout(student).share == 0.5
    _pairs(ctx.log, student, 20, 1.0, 7000, reason="cheapest_feasible", domain=domain)
    process.cycle(inline=True)
    assert ctx.state.rollout(student).stage == "live"

    # its audits' agreement drops: the degradation detector fires, back to shadow
    _pairs(ctx.log, student, 60, 1.0, 8000, reason="cheapest_feasible", domain=domain)
    _pairs(ctx.log, student, 60, 0.0, 9000, reason="cheapest_feasible", domain=domain)
    events = process.cycle(inline=True)
    assert "degradation" in [e.kind for e in events]
    assert ctx.state.rollout(student).stage == "shadow"
    steps = [(t.transition.before, t.transition.after) for t in ctx.state.transitions(student)]
    assert steps == [("registered", "shadow"), ("shadow", "canary"), ("canary", "canary"),
                     ("canary", "live"), ("live", "shadow")]  # fmt: skip
    assert process.metrics.transitions.labels("canary", "live")._value.get() == 1
    refreshed = ctx.state.job("fpnew")
    assert refreshed.record["refresh_of"] == student and refreshed.record["generation"] == 1


def test_student_below_its_gate_is_never_registered(loop) -> None:
    ctx, process = loop(0.999)  # no tiny student reaches it with a handful of test items
    _shift(ctx.log, 1000, 300)
    process.cycle(inline=True)
    job = ctx.state.job("fpnew")
    assert job is not None and job.status == "pending" and job.attempt == 1
    assert "trying ratio 1" in job.reason and job.record["tried"] == [0.5]
    assert [a["gate"]["passed"] for a in job.record["attempts"]] == [False]
    process.cycle(inline=True)  # the larger ratio, once; then it waits for more data
    job = ctx.state.job("fpnew")
    assert job.status == "waiting" and "waiting for" in job.reason
    assert not [e for e in ctx.store.entries() if e.role == "student"]
    assert ctx.state.rollouts() == {}


def test_restart_completes_a_registered_student_and_requeues_the_rest(loop) -> None:
    ctx, process = loop(0.0)
    _shift(ctx.log, 1000, 300)
    process.cycle(inline=True)
    job = ctx.state.job("fpnew")
    # as if killed between registering and starting the rollout
    with ctx.log.engine.begin() as conn:
        conn.execute(ctx.state.schema.rollouts.delete())
    ctx.state.update_job(job.id, status="running")
    other = ctx.state.add_job("fpother", "traffic-other", None, time.time())
    ctx.state.update_job(other.id, status="running")
    AdaptProcess(ctx, AdaptMetrics())  # a new process on the same database and store
    assert ctx.state.job("fpnew").status == "registered"
    assert ctx.state.rollout(job.student).stage == "shadow"
    assert ctx.state.job("fpother").status == "pending"


def test_a_shift_under_way_at_first_start_is_acted_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = _store(tmp_path, tiny_model_dir)
    ctx = _context(tmp_path, store, 0.0)
    ctx.log.insert([_row(i) for i in range(600)])
    _shift(ctx.log, 1000, 300)  # before the loop first starts on this database
    process = AdaptProcess(ctx, AdaptMetrics())
    job = ctx.state.job("fpnew")
    assert job is not None and job.status == "pending"
    assert [e.kind for _, e in ctx.log.events()] == ["new_traffic"]
    process.cycle(inline=True)
    assert ctx.state.job("fpnew").status == "registered"
    # a restart (the cursor is stored) does not report it again
    AdaptProcess(ctx, AdaptMetrics()).cycle(inline=True)
    assert len(ctx.log.events()) == 1
