"""Circuit breaking and failover: the breaker's transitions on a fake clock, the
decision's ranking of the other models, and, through the real app over scripted backends
and the openai SDK, a routed request retried once on the next-best model, a named one
not, nothing retried after the first token, and a model taken out of routing and let
back in by a probe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.routing.breaker import (
    CLOSED,
    Breakers,
    Circuit,
    Rules,
    admit,
    available,
    cool_down,
    outcome_of,
    record,
    state,
)
from gateway.routing.selector import Candidate, Slo, choose, ranking
from models.backends.base import Overloaded, Unavailable, UpstreamError
from tests.gateway.scripted import ScriptedBackend, sdk_for, wait_ready

RULES = Rules(failures_to_open=3, cool_down_s=5, max_cool_down_s=12, probe_timeout_s=30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fail(circuit: Circuit, now: float, times: int = 1) -> Circuit:
    for _ in range(times):
        circuit = record(circuit, "failure", now, RULES)
    return circuit


def test_opens_after_consecutive_failures_only() -> None:
    c = _fail(CLOSED, 0, 2)
    assert state(c, 0) == "closed" and available(c, 0, RULES)
    c = record(c, "success", 0, RULES)
    assert c == CLOSED  # a success resets the count
    c = _fail(c, 0, 2)
    c = record(c, "neutral", 0, RULES)  # a 4xx or a cancellation says nothing
    c = _fail(c, 1)
    assert state(c, 1) == "open" and not available(c, 1, RULES)
    assert c.until == 1 + RULES.cool_down_s and c.opens == 1


def test_half_open_lets_one_probe_through() -> None:
    c = _fail(CLOSED, 0, 3)
    assert state(c, 4.9) == "open" and not available(c, 4.9, RULES)
    assert state(c, 5) == "half_open" and available(c, 5, RULES)
    probing = admit(c, 5)
    assert not available(probing, 6, RULES)  # one probe at a time
    assert available(probing, 5 + RULES.probe_timeout_s, RULES)  # a lost probe expires
    assert available(record(probing, "neutral", 6, RULES), 6, RULES)  # a cancelled one frees
    assert record(probing, "success", 6, RULES) == CLOSED
    assert admit(CLOSED, 6) == CLOSED and admit(c, 1) == c  # nothing to probe


def test_failed_probes_back_off_exponentially_up_to_the_cap() -> None:
    assert [cool_down(RULES, n) for n in (1, 2, 3, 4)] == [5, 10, 12, 12]
    c = _fail(CLOSED, 0, 3)
    now = 0.0
    for expected in (10, 12, 12):
        now = c.until
        c = record(admit(c, now), "failure", now, RULES)
        assert c.until - now == expected and c.probe is None
    assert record(c, "success", c.until, RULES) == CLOSED  # and the back-off starts over


def test_failures_while_open_do_not_extend_the_cool_down() -> None:
    c = _fail(CLOSED, 0, 3)
    later = _fail(c, 2, 5)  # requests sent before it opened, failing now
    assert later.until == c.until and later.opens == 1


def test_outcomes() -> None:
    assert outcome_of(200, "success") == "success"
    assert outcome_of(503, "server_error") == outcome_of(502, "server_error") == "failure"
    assert outcome_of(429, "client_error") == outcome_of(400, "client_error") == "neutral"
    assert outcome_of(499, "cancelled") == "neutral"


def test_breakers_keep_one_circuit_per_model_and_count_openings() -> None:
    clock, metrics = Clock(), Metrics(dict)
    breakers = Breakers(RULES, clock, metrics)
    breakers.watch("small")

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "small"})

    assert sample("distillgate_circuit_opens_total") == sample("distillgate_circuit_state") == 0
    for _ in range(3):
        breakers.record("small", "failure")
    breakers.record("big", "failure")
    assert breakers.state("small") == "open" and breakers.state("big") == "closed"
    assert not breakers.available("small") and breakers.available("big")
    assert sample("distillgate_circuit_opens_total") == 1
    assert sample("distillgate_circuit_state") == 2
    clock.now += 5
    assert breakers.state("small") == "half_open" and breakers.available("small")
    assert sample("distillgate_circuit_state") == 1
    breakers.admit("small")
    assert not breakers.available("small")
    breakers.record("small", "failure")
    assert sample("distillgate_circuit_opens_total") == 2 and breakers.state("small") == "open"
    clock.now += 10
    breakers.admit("small")
    breakers.record("small", "success")
    assert breakers.state("small") == "closed" and "small" not in breakers.circuits
    assert sample("distillgate_circuit_state") == 0


TEACHER = Candidate("teacher", 1.0, 200, 2000, cost=1.0, cost_per_1k=0.10, teacher=True)
MID = Candidate("mid", 0.97, 120, 1200, cost=0.5, cost_per_1k=0.05)
SMALL = Candidate("small", 0.90, 60, 600, cost=0.2, cost_per_1k=0.02)
WEAK = Candidate("weak", 0.50, 50, 500, cost=0.1, cost_per_1k=0.01)


def test_the_ranking_gives_the_next_best() -> None:
    models = [TEACHER, MID, SMALL, WEAK]
    quality = Slo(min_quality=0.9)
    assert choose(models, quality).model == "small"
    # the feasible cheapest first, then the fallback's order: the teacher, then by quality
    assert ranking(models, quality) == ("small", "mid", "teacher", "weak")
    assert ranking(models, quality, "reject") == ("small", "mid", "teacher")
    fast = Slo(min_quality=0.95, p95_latency_ms=1500)
    assert ranking(models, fast, "teacher") == ("mid", "teacher", "small", "weak")
    assert ranking(models, fast, "best_effort") == ("mid", "small", "weak", "teacher")
    assert ranking(models, Slo(min_quality=1.1), "reject") == ()


# -- through the app -------------------------------------------------------------------

POLICY = {
    "classes": {"cheapest": {"min_quality": 0.0}},
    "default_class": "cheapest",
    "fallback": "teacher",
    "exploration": 0.0,
    "costs": {"teacher": 0.10, "student": 0.01},
}


@pytest.fixture
def backends() -> dict[str, ScriptedBackend]:
    return {"teacher": ScriptedBackend("teacher"), "student": ScriptedBackend("student")}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(
    backends: dict[str, ScriptedBackend], clock: Clock, tmp_path: Path
) -> Iterator[TestClient]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    models = [{"name": n, "backend": "openai", "url": "http://127.0.0.1:9", "role": n}
              for n in ("teacher", "student")]  # fmt: skip
    config = parse_config({
        "models": models, "traffic": {"enabled": False}, "routing": {"policy": str(policy)},
        "failover": {"failures_to_open": 2, "cool_down_s": 0.2, "max_cool_down_s": 0.4},
    })  # fmt: skip
    app = create_app(config, factory=lambda m: backends[m.name])
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        client.app.state.gateway.router.breakers.clock = clock  # type: ignore[attr-defined]
        yield client


def _ask(sdk: openai.OpenAI, model: str = "auto", stream: bool = False):
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=stream
    )
    return raw.headers, raw.parse()


def _metric(client: TestClient, line: str) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"no {line} in /metrics")


def test_a_routed_request_fails_over_to_the_next_best(client, backends) -> None:
    sdk = sdk_for(client)
    headers, body = _ask(sdk)
    assert body.model == "student" and "x-distillgate-failover" not in headers
    backends["student"].fail_before = Unavailable("connection refused")
    headers, body = _ask(sdk)
    assert body.model == headers["x-distillgate-model"] == "teacher"
    assert headers["x-distillgate-failover"] == "student"
    assert headers["x-distillgate-route-reason"] == "failover"
    assert body.choices[0].message.content == "Hello, world!"
    key = 'distillgate_failovers_total{from="student",reason="unavailable",to="teacher"}'
    assert _metric(client, key) == 1
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 0
    # a stream fails over the same way: nothing had been sent yet
    backends["student"].fail_before = UpstreamError(502, "bad gateway", "server_error")
    chunks = list(sdk.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], stream=True))  # fmt: skip
    assert {c.model for c in chunks} == {"teacher"}
    key = 'distillgate_failovers_total{from="student",reason="upstream_error",to="teacher"}'
    assert _metric(client, key) == 1
    # two failures in a row: the student's circuit is open, auto goes straight to the teacher
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 2
    assert _metric(client, 'distillgate_circuit_opens_total{model="student"}') == 1
    seen = len(backends["student"].seen)
    headers, body = _ask(sdk)
    assert body.model == "teacher" and "x-distillgate-failover" not in headers
    assert len(backends["student"].seen) == seen


def test_the_student_comes_back_through_a_probe(client, backends, clock: Clock) -> None:
    sdk = sdk_for(client)
    backends["student"].fail_before = Unavailable("connection refused")
    for _ in range(2):
        assert _ask(sdk)[1].model == "teacher"
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 2
    clock.now += 0.2  # the cool-down: one probe goes; it fails, the next cool-down is 0.4 s
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 1
    headers, body = _ask(sdk)
    assert body.model == "teacher" and headers["x-distillgate-failover"] == "student"
    assert _metric(client, 'distillgate_circuit_opens_total{model="student"}') == 2
    backends["student"].fail_before = None
    clock.now += 0.39
    assert _ask(sdk)[1].model == "teacher"  # still cooling down
    clock.now += 0.01
    headers, body = _ask(sdk)
    assert body.model == "student" and "x-distillgate-failover" not in headers
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 0


def test_a_named_model_is_not_retried_but_feeds_its_breaker(client, backends) -> None:
    sdk = sdk_for(client)
    backends["student"].fail_before = Unavailable("connection refused")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            _ask(sdk, "student")
        assert info.value.status_code == 503
        assert "x-distillgate-failover" not in info.value.response.headers
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 2
    assert _ask(sdk)[1].model == "teacher"  # auto avoids it now


def test_nothing_is_retried_after_the_first_token(client, backends) -> None:
    sdk = sdk_for(client)
    backends["student"].fail_after = 2
    with pytest.raises(openai.InternalServerError):
        _ask(sdk)
    stream = sdk.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert len(backends["teacher"].seen) == 0
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 2  # 5xx: failures


def test_client_errors_and_full_queues_are_not_failures(client, backends) -> None:
    sdk = sdk_for(client)
    backends["student"].fail_before = Overloaded("queue full")
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            _ask(sdk)
    assert len(backends["teacher"].seen) == 0
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 0


def test_failover_can_be_turned_off(backends, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    models = [{"name": n, "backend": "openai", "url": "http://127.0.0.1:9", "role": n}
              for n in ("teacher", "student")]  # fmt: skip
    config = parse_config({
        "models": models, "traffic": {"enabled": False}, "routing": {"policy": str(policy)},
        "failover": {"retry": False},
    })  # fmt: skip
    backends["student"].fail_before = Unavailable("connection refused")
    app = create_app(config, factory=lambda m: backends[m.name])
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        with pytest.raises(openai.InternalServerError):
            _ask(sdk_for(client))


def test_bad_failover_settings_are_named() -> None:
    from gateway.config import ConfigError

    models = [{"name": "m", "backend": "openai", "url": "http://127.0.0.1:9"}]
    for failover, named in (({"failures_to_open": 0}, "failover.failures_to_open"),
                            ({"cool_down_s": 10, "max_cool_down_s": 1}, "max_cool_down_s"),
                            ({"retries": 2}, "failover.retries")):  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            parse_config({"models": models, "failover": failover})


def test_when_every_circuit_is_open_routing_still_tries(client, backends) -> None:
    sdk = sdk_for(client)
    for backend in backends.values():
        backend.fail_before = Unavailable("connection refused")
    for _ in range(3):  # the student fails, then the teacher it fails over to
        with pytest.raises(openai.InternalServerError) as info:
            _ask(sdk)
        assert info.value.status_code == 503 and "connection refused" in info.value.message
    assert _metric(client, 'distillgate_circuit_state{model="teacher"}') == 2
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 2
    backends["student"].fail_before = None
    assert _ask(sdk)[1].model == "student"  # tried anyway (Envoy's "panic" routing)
    assert _metric(client, 'distillgate_circuit_state{model="student"}') == 0
