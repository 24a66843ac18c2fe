"""Shadow answers through the real app and a real SQLite log: a teacher-answered request
the router names for a shadow answer is replayed on the student in the background and
logged as a row of its own with its agreement (content only where the class keeps it),
skipped while the student is busy, logged as failed when the student fails; a student in
canary or live is audited at the rollout's audit share; and the detectors count shadow
rows nowhere."""

from __future__ import annotations

import random
import time
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.adapt.agreement import agreement
from gateway.adapt.detectors import DetectorConfig, Detectors, observation
from gateway.adapt.log import TrafficLog
from gateway.adapt.records import SHADOW, StoredRecord, TrafficRecord
from gateway.adapt.rollout import Rollout
from gateway.adapt.state import AdaptState
from gateway.app import create_app
from gateway.config import parse_config
from models.backends.base import BackendError
from tests.gateway.adapt.test_recording import records_in
from tests.gateway.scripted import ScriptedBackend, sdk_for, wait_ready

TEACHER = ("Acme beat estimates on strong cloud sales", " and raised its full year guidance")
STUDENT = ("Acme beat estimates on cloud sales", " and cut its guidance")
ASK = [{"role": "user", "content": "Summarise: Acme reports third quarter results"}]


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'traffic.db'}"


def _rollout(stage: str, share: float = 0.0, student: str = "small") -> Rollout:
    # no task is served, so every request is routed to the general domain
    return Rollout(student, "general", stage, share, 0.9, 0.0, 0)  # type: ignore[arg-type]


def _app(backends: dict[str, ScriptedBackend], url: str, rollouts: list[Rollout],
         audit_share: float = 0.0) -> TestClient:  # fmt: skip
    """The real app over `backends` ("big" the teacher), its log at `url` holding
    `rollouts`; with shadow_share 1, every teacher answer on a shadowed domain is named."""
    log = TrafficLog.open(url)
    try:
        state = AdaptState(log.engine)
        for rollout in rollouts:
            state.start_rollout(rollout)
    finally:
        log.close()
    config = parse_config({
        "models": [{"name": n, "backend": "openai", "url": "http://127.0.0.1:9",
                    "role": "teacher" if n == "big" else "student"} for n in backends],
        "traffic": {"dsn": url, "flush_interval_s": 0.05, "audit": {"share": 0.0}},
        "adapt": {"rollout": {"shadow_share": 1.0, "audit_share": audit_share}},
    })  # fmt: skip
    app = create_app(config, factory=lambda m: backends[m.name])
    return TestClient(app, raise_server_exceptions=False)


def _ready(http: TestClient, rollouts: list[Rollout]) -> None:
    """Ready, with the rollouts in the router (the gateway also reloads them from the
    log's database; setting them here does not wait for that)."""
    wait_ready(http)
    http.app.state.gateway.router.rollouts = {r.student: r for r in rollouts}  # type: ignore[attr-defined]


def _settle(*backends: ScriptedBackend, count: int) -> None:
    for _ in range(300):  # background answers run after the response
        if sum(len(b.seen) for b in backends) >= count and not any(b.running for b in backends):
            return
        time.sleep(0.01)


def test_a_shadow_answer_is_logged_with_its_agreement(tmp_path: Path) -> None:
    url, rollouts = _url(tmp_path), [_rollout("shadow")]
    big, small = ScriptedBackend("big", pieces=TEACHER), ScriptedBackend("small", pieces=STUDENT)
    with _app({"big": big, "small": small}, url, rollouts) as http:
        _ready(http, rollouts)
        reply = sdk_for(http).chat.completions.with_raw_response.create(model="auto",
                                                                         messages=ASK)  # fmt: skip
        assert reply.headers["x-distillgate-model"] == "big"  # a shadow student never answers
        assert reply.parse().choices[0].message.content == "".join(TEACHER)
        _settle(small, count=1)
        metrics = http.get("/metrics").text
    teacher, shadow = records_in(url, 2)
    assert teacher.model == "big" and teacher.route_reason != SHADOW
    assert teacher.agreement is None and teacher.response == "".join(TEACHER)
    assert small.seen[0].request_id == shadow.request_id == f"{teacher.request_id}-shadow"
    assert (shadow.model, shadow.role, shadow.route_reason) == ("small", "student", SHADOW)
    same = ("fingerprint", "slo_class", "domain", "endpoint", "requested_model", "request")
    assert all(getattr(shadow, f) == getattr(teacher, f) for f in same)
    assert shadow.outcome == "success" and shadow.status == 200 and shadow.latency_ms > 0
    assert shadow.completion_tokens == len(STUDENT) and shadow.cost is None
    assert shadow.response == "".join(STUDENT) and shadow.reference == "".join(TEACHER)
    score = agreement("".join(STUDENT), "".join(TEACHER))
    assert 0 < score < 1 and shadow.agreement == score
    assert 'distillgate_shadow_answers_total{model="small",outcome="done"} 1.0' in metrics
    assert 'distillgate_shadow_agreement_count{model="small"} 1.0' in metrics


def test_a_class_without_content_keeps_the_score_only(tmp_path: Path) -> None:
    url, rollouts = _url(tmp_path), [_rollout("canary", 0.5)]
    big, small = ScriptedBackend("big", pieces=TEACHER), ScriptedBackend("small", pieces=TEACHER)
    with _app({"big": big, "small": small}, url, rollouts) as http:
        _ready(http, rollouts)
        sdk_for(http).chat.completions.create(
            model="auto", messages=ASK, extra_headers={"x-distillgate-slo": "exact"}
        )
        _settle(small, count=1)
    teacher, shadow = records_in(url, 2)
    assert teacher.slo_class == shadow.slo_class == "exact" and shadow.route_reason == SHADOW
    assert shadow.request is shadow.response is shadow.reference is None
    assert shadow.agreement == 1.0


def test_a_busy_student_is_skipped_and_a_failing_one_logged(tmp_path: Path) -> None:
    url, rollouts = _url(tmp_path), [_rollout("shadow")]
    big, small = ScriptedBackend("big", pieces=TEACHER), ScriptedBackend("small", pieces=STUDENT)
    with _app({"big": big, "small": small}, url, rollouts) as http:
        _ready(http, rollouts)
        sdk = sdk_for(http)
        small.running = 256  # all its connections busy: no room for a background answer
        sdk.chat.completions.create(model="auto", messages=ASK)
        skipped = 'distillgate_shadow_answers_total{model="small",outcome="skipped_busy"} 1.0'
        for _ in range(300):  # the record is made just after the response
            if skipped in http.get("/metrics").text:
                break
            time.sleep(0.01)
        small.running = 0
        small.fail_before = BackendError("the student fell over")
        sdk.chat.completions.create(model="auto", messages=ASK)
        _settle(small, count=1)
        metrics = http.get("/metrics").text
    busy, teacher, failed = records_in(url, 3)
    assert busy.model == teacher.model == "big" and busy.outcome == teacher.outcome == "success"
    assert failed.request_id == f"{teacher.request_id}-shadow" and failed.route_reason == SHADOW
    assert failed.outcome == "server_error" and failed.status == 500
    assert failed.agreement is None and failed.response is None
    assert len(small.seen) == 1  # only the second request was replayed
    assert skipped in metrics
    assert 'distillgate_shadow_answers_total{model="small",outcome="failed"} 1.0' in metrics


def test_a_rolling_student_is_audited_at_the_rollout_share(tmp_path: Path) -> None:
    """traffic.audit.share is 0: only `small` (live) is audited, at audit_share 1."""
    url, rollouts = _url(tmp_path), [_rollout("live", 1.0)]
    big = ScriptedBackend("big", pieces=TEACHER)
    small, other = ScriptedBackend("small", pieces=STUDENT), ScriptedBackend("other")
    backends = {"big": big, "small": small, "other": other}
    with _app(backends, url, rollouts, audit_share=1.0) as http:
        _ready(http, rollouts)
        sdk = sdk_for(http)
        sdk.chat.completions.create(model="other", messages=ASK)
        sdk.chat.completions.create(model="small", messages=ASK)
        _settle(big, count=1)
    plain, audited = records_in(url, 2)
    assert plain.model == "other" and plain.agreement is None
    assert audited.model == "small" and audited.route_reason is None
    assert audited.agreement == agreement("".join(STUDENT), "".join(TEACHER))
    assert [r.request_id for r in big.seen] == [f"{audited.request_id}-audit"]


# --- the detectors ------------------------------------------------------------------------


def _stored(i: int, agreement: float | None, reason: str | None) -> StoredRecord:
    return StoredRecord(i, TrafficRecord(
        ts=float(i), request_id=f"r{i}", endpoint="chat", requested_model="auto",
        model="small", role="student", fingerprint="fp-finance", outcome="success",
        status=200, latency_ms=1.0, domain="finance", confidence=0.99, route_reason=reason,
        agreement=agreement,
    ))  # fmt: skip


def test_the_detectors_count_shadow_rows_nowhere() -> None:
    """The same falling agreement fires degradation as audits, and nothing as shadow rows,
    which reach none of the detectors (a request is counted once, by the teacher's row)."""
    rng = random.Random(9)
    scores = [float(rng.random() < (0.9 if i < 1000 else 0.4)) for i in range(1600)]

    def run(reason: str | None) -> tuple[Detectors, list[str]]:
        detectors = Detectors(DetectorConfig())
        events = [e.kind for i, a in enumerate(scores)
                  for e in detectors.update(observation(_stored(i, a, reason)))]  # fmt: skip
        return detectors, events

    _, audited = run(None)
    assert "degradation" in audited
    shadowed, events = run(SHADOW)
    assert events == []
    assert shadowed.new_traffic.seen == shadowed.mix_change.seen == shadowed.degradation.seen == 0
    assert observation(_stored(1, 1.0, SHADOW)).shadow
    assert not observation(_stored(1, 1.0, "cheapest_feasible")).shadow
