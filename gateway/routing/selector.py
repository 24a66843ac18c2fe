"""The routing decision, a pure function of the candidates' predictions and the SLO.

Feasible: predicted quality >= min_quality, predicted p95 TTFT and latency within the
class's bounds, price per 1,000 tokens within its cost bound. Among the feasible models the
cheapest request wins; ties go to the faster. With probability `exploration` (drawn by the
caller, so a seeded generator makes it reproducible) a uniformly chosen model that meets
the quality bound is sent instead, so that latency estimates of unchosen models stay
fresh without giving up quality. When no model is feasible, the policy's fallback: the
teacher (best effort when no teacher is served), the best-quality model among those
meeting the latency and cost bounds (any model if none does), or a rejection naming the
constraint no model meets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    quality: float  # conservative, in the class's basis
    ttft_ms: float
    latency_ms: float
    cost: float  # predicted cost of this request
    cost_per_1k: float
    teacher: bool = False  # the reference teacher for the request's domain


@dataclass(frozen=True, slots=True)
class Slo:
    min_quality: float = 0.0
    p95_ttft_ms: float | None = None
    p95_latency_ms: float | None = None
    max_cost_per_1k_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    model: str | None  # None: rejected
    reason: str  # cheapest_feasible | explore | fallback_teacher | fallback_best_effort | rejected
    quality: float
    message: str = ""  # for a rejection: the constraint no model meets


def choose(
    candidates: Sequence[Candidate],
    slo: Slo,
    *,
    fallback: str = "teacher",
    exploration: float = 0.0,
    draws: tuple[float, float] = (1.0, 0.0),
) -> Decision:
    """`draws`: two uniform [0, 1) numbers, for whether to explore and whom."""
    inf = math.inf
    ttft = inf if slo.p95_ttft_ms is None else slo.p95_ttft_ms
    latency = inf if slo.p95_latency_ms is None else slo.p95_latency_ms
    price = inf if slo.max_cost_per_1k_tokens is None else slo.max_cost_per_1k_tokens

    def fits(c: Candidate) -> bool:  # the latency and cost bounds
        return c.ttft_ms <= ttft and c.latency_ms <= latency and c.cost_per_1k <= price

    good = [c for c in candidates if c.quality >= slo.min_quality]
    if good and draws[0] < exploration:
        pick = good[min(int(draws[1] * len(good)), len(good) - 1)]
        return Decision(pick.name, "explore", pick.quality)
    feasible = [c for c in good if fits(c)]
    if feasible:
        best = min(feasible, key=lambda c: (c.cost, c.latency_ms))
        return Decision(best.name, "cheapest_feasible", best.quality)
    if fallback == "teacher":
        teacher = next((c for c in candidates if c.teacher), None)
        if teacher is not None:
            return Decision(teacher.name, "fallback_teacher", teacher.quality)
    if fallback in ("teacher", "best_effort") and candidates:
        pick = max([c for c in candidates if fits(c)] or candidates,
                   key=lambda c: (c.quality, -c.cost))  # fmt: skip
        return Decision(pick.name, "fallback_best_effort", pick.quality)
    return Decision(None, "rejected", 0.0, _unmet(candidates, slo, fits))


def _unmet(candidates: Sequence[Candidate], slo: Slo, fits) -> str:
    """Which constraint no model meets: quality first, then latency and cost together."""
    if not candidates:
        return "no model is ready to serve"
    best = max(candidates, key=lambda c: c.quality)
    if best.quality < slo.min_quality:
        return (f"no model meets min_quality {slo.min_quality:g} (best predicted "
                f"{best.quality:.3f}, {best.name})")  # fmt: skip
    bounds = ", ".join(f"{k} {v:g}" for k, v in (
        ("p95_ttft_ms", slo.p95_ttft_ms), ("p95_latency_ms", slo.p95_latency_ms),
        ("max_cost_per_1k_tokens", slo.max_cost_per_1k_tokens)) if v is not None)  # fmt: skip
    return f"no model meeting min_quality {slo.min_quality:g} also meets {bounds}"


def ranking(
    candidates: Sequence[Candidate], slo: Slo, fallback: str = "teacher"
) -> tuple[str, ...]:
    """Every model the policy would send this request to, best first: the feasible ones,
    cheapest first; then, unless the fallback is `reject`, the teacher (for `teacher`)
    and the others, those meeting the latency and cost bounds first, by quality. Where a
    request whose model failed goes next (computed then, not on every request)."""
    fits = _fits(slo)
    feasible = sorted((c for c in candidates if c.quality >= slo.min_quality and fits(c)),
                      key=lambda c: (c.cost, c.latency_ms))  # fmt: skip
    order = [c.name for c in feasible]
    if fallback in ("teacher", "best_effort"):
        first = fallback == "teacher"
        rest = sorted(candidates, key=lambda c: (
            not (first and c.teacher), not fits(c), -c.quality, c.cost))  # fmt: skip
        order += [c.name for c in rest]
    return tuple(dict.fromkeys(order))


def _fits(slo: Slo):
    inf = math.inf
    ttft = inf if slo.p95_ttft_ms is None else slo.p95_ttft_ms
    latency = inf if slo.p95_latency_ms is None else slo.p95_latency_ms
    price = inf if slo.max_cost_per_1k_tokens is None else slo.max_cost_per_1k_tokens
    return lambda c: c.ttft_ms <= ttft and c.latency_ms <= latency and c.cost_per_1k <= price
