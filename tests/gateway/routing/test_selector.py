"""The decision on constructed predictions: each SLO dimension binds in turn, ties, every
fallback, and exploration (seeded, within its share, never below the quality bound)."""

from __future__ import annotations

import random

import pytest

from gateway.routing.selector import Candidate, Slo, choose

TEACHER = Candidate("teacher", 1.0, 200, 2000, cost=1.0, cost_per_1k=0.10, teacher=True)
MID = Candidate("mid", 0.97, 120, 1200, cost=0.5, cost_per_1k=0.05)
SMALL = Candidate("small", 0.90, 60, 600, cost=0.2, cost_per_1k=0.02)
MODELS = [TEACHER, MID, SMALL]


@pytest.mark.parametrize(
    ("slo", "expected"),
    [
        (Slo(), "small"),  # nothing binds: the cheapest
        (Slo(min_quality=0.95), "mid"),  # quality binds
        (Slo(min_quality=0.99), "teacher"),
        (Slo(p95_ttft_ms=100), "small"),  # TTFT binds: only small is fast enough
        (Slo(min_quality=0.95, p95_latency_ms=1500), "mid"),  # latency admits mid, not teacher
        (Slo(min_quality=0.95, max_cost_per_1k_tokens=0.06), "mid"),  # cost bound
    ],
)
def test_each_dimension_binds(slo: Slo, expected: str) -> None:
    decision = choose(MODELS, slo)
    assert decision.model == expected and decision.reason == "cheapest_feasible"


def test_cost_bound_excludes_the_cheapest_quality_model() -> None:
    pricey_fast = Candidate("pricey", 0.99, 50, 500, cost=0.3, cost_per_1k=0.5)
    decision = choose([TEACHER, pricey_fast], Slo(min_quality=0.98, max_cost_per_1k_tokens=0.2))
    assert decision.model == "teacher"


def test_ties_go_to_the_faster() -> None:
    slow = Candidate("slow", 0.9, 100, 900, cost=0.2, cost_per_1k=0.02)
    fast = Candidate("fast", 0.9, 100, 400, cost=0.2, cost_per_1k=0.02)
    assert choose([slow, fast], Slo()).model == "fast"
    assert choose([fast, slow], Slo()).model == "fast"


def test_fallbacks() -> None:
    impossible = Slo(min_quality=0.95, p95_latency_ms=100)  # fast models are not good enough
    teacher = choose(MODELS, impossible, fallback="teacher")
    assert (teacher.model, teacher.reason) == ("teacher", "fallback_teacher")
    best = choose(MODELS, impossible, fallback="best_effort")
    assert (best.model, best.reason) == ("teacher", "fallback_best_effort")  # none fits: best q
    best = choose(MODELS, Slo(min_quality=0.99, p95_latency_ms=1500), fallback="best_effort")
    assert best.model == "mid"  # the best quality among those within the latency bound
    no_teacher = choose([MID, SMALL], Slo(min_quality=0.99), fallback="teacher")
    assert (no_teacher.model, no_teacher.reason) == ("mid", "fallback_best_effort")
    rejected = choose(MODELS, Slo(min_quality=0.95, p95_ttft_ms=100), fallback="reject")
    assert rejected.model is None and rejected.reason == "rejected"
    assert "p95_ttft_ms 100" in rejected.message
    unreachable = choose([MID, SMALL], Slo(min_quality=0.99), fallback="reject")
    assert "min_quality 0.99 (best predicted 0.970, mid)" in unreachable.message


def test_exploration_is_seeded_within_its_share_and_keeps_quality() -> None:
    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        slo = Slo(min_quality=0.95)
        draws = [(rng.random(), rng.random()) for _ in range(4000)]
        return [choose(MODELS, slo, exploration=0.1, draws=d).reason for d in draws]

    first = run(7)
    assert first == run(7)
    share = first.count("explore") / len(first)
    assert 0.08 < share < 0.12
    rng = random.Random(1)
    draws = [(rng.random(), rng.random()) for _ in range(200)]
    explored = {choose(MODELS, Slo(min_quality=0.95), exploration=1.0, draws=d).model
                for d in draws}  # fmt: skip
    assert explored == {"teacher", "mid"}  # both meet quality; small never does
