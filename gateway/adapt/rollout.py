"""The rollout of a registered student, as pure functions over plain data: the stages a
student passes through on its way to its domain's traffic, the evidence that moves it
(agreement pairs with the teacher and errors since it entered its stage), and the one
decision `decide(rollout, evidence, config)`.

    shadow --(>= min_pairs, lower bound >= target)--> canary steps[0] --> ... --> live
      ^                                                     |                        |
      +------- agreement upper bound < target, or error rate > max_error_rate -------+
    shadow --(>= min_pairs, upper bound < target)--> retired

Agreement is a share of pairs (an answer by the student and the teacher's to the same
request, scored by gateway/adapt/agreement.py); its interval is Wilson's score interval
for a binomial proportion (Wilson 1927), which stays inside [0, 1] and is honest at the
edges where the normal interval is not (all 200 pairs agreeing still gives a lower end
below 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from gateway.config import Rollout as RolloutConfig

Stage = Literal["shadow", "canary", "live", "retired"]
STAGES: tuple[Stage, ...] = ("shadow", "canary", "live", "retired")


@dataclass(frozen=True)
class Rollout:
    """Where one student stands. `domain` is the routing domain it serves (its task, as
    its manifest names it); `share` the part of that domain's eligible requests it may
    answer (0 in shadow and retired, a canary step, 1 live); `target` the agreement it
    must keep; `since_id` the traffic log's last row id when it entered this stage (only
    later rows count as evidence for the next decision)."""

    student: str
    domain: str
    stage: Stage
    share: float
    target: float
    since_ts: float
    since_id: int
    reason: str = ""


@dataclass(frozen=True)
class Evidence:
    """What the traffic log holds about a student since it entered its stage: agreement
    pairs (their count and the sum of their agreement scores) and the requests it answered
    itself (count and failures)."""

    pairs: int = 0
    agreeing: float = 0.0
    requests: int = 0
    errors: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.pairs if self.pairs else None


@dataclass(frozen=True)
class Transition:
    """A decided move: the new stage and share, why, and the figures behind it."""

    student: str
    before: str  # a Stage, or "registered" for the first
    after: Stage
    share: float
    reason: str
    evidence: dict[str, float]


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for successes/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = min(max(successes / n, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _figures(evidence: Evidence, confidence: float) -> dict[str, float]:
    low, high = wilson(evidence.agreeing, evidence.pairs, confidence)
    figures = {"pairs": evidence.pairs, "low": round(low, 4), "high": round(high, 4)}
    if evidence.agreement is not None:
        figures["agreement"] = round(evidence.agreement, 4)
    if evidence.requests:
        figures |= {"requests": evidence.requests, "errors": evidence.errors}
    return figures


def decide(rollout: Rollout, evidence: Evidence, config: RolloutConfig) -> Transition | None:
    """The move `evidence` justifies for `rollout`, or None (stay)."""
    if rollout.stage == "retired":
        return None
    figures = _figures(evidence, config.confidence)
    low, high = figures["low"], figures["high"]
    target = rollout.target

    def move(after: Stage, share: float, reason: str) -> Transition:
        return Transition(rollout.student, rollout.stage, after, share, reason, figures)

    if rollout.stage in ("canary", "live"):
        if (
            evidence.requests >= config.min_requests
            and evidence.errors / evidence.requests > config.max_error_rate
        ):
            rate = evidence.errors / evidence.requests
            return move("shadow", 0.0, f"error rate {rate:.3f} above {config.max_error_rate:g}")
        if evidence.pairs >= config.step_pairs and high < target:
            return move("shadow", 0.0, f"agreement upper bound {high:.3f} below target {target:g}")
    if rollout.stage == "shadow":
        if evidence.pairs < config.min_pairs:
            return None
        if low >= target:
            first = config.steps[0] if config.steps else 1.0
            after: Stage = "canary" if config.steps else "live"
            return move(after, first, f"shadow agreement lower bound {low:.3f} >= {target:g}")
        if high < target:
            return move("retired", 0.0, f"shadow agreement upper bound {high:.3f} < {target:g}")
        return None
    if rollout.stage == "canary" and evidence.pairs >= config.step_pairs and low >= target:
        later = [s for s in config.steps if s > rollout.share]
        if later:
            return move("canary", later[0], f"canary agreement lower bound {low:.3f} >= {target:g}")
        return move("live", 1.0, f"canary agreement lower bound {low:.3f} >= {target:g}")
    return None


def manual(rollout: Rollout, action: str, config: RolloutConfig) -> Transition:
    """An operator's move: `promote` (one step up), `rollback` (to shadow), `retire`."""
    figures: dict[str, float] = {}
    if action == "retire":
        return Transition(
            rollout.student, rollout.stage, "retired", 0.0, "retired by hand", figures
        )
    if action == "rollback":
        return Transition(rollout.student, rollout.stage, "shadow", 0.0, "rolled back by hand",
                          figures)  # fmt: skip
    if action != "promote":
        raise ValueError(f"unknown action {action!r}: promote, rollback or retire")
    if rollout.stage == "live":
        raise ValueError(f"{rollout.student} is already live")
    later = [s for s in config.steps if s > rollout.share] if rollout.stage != "retired" else []
    if rollout.stage in ("shadow", "retired"):
        later = list(config.steps)
    if later:
        return Transition(rollout.student, rollout.stage, "canary", later[0], "promoted by hand",
                          figures)  # fmt: skip
    return Transition(rollout.student, rollout.stage, "live", 1.0, "promoted by hand", figures)


def applied(rollout: Rollout, transition: Transition, now: float, last_id: int) -> Rollout:
    """The rollout after `transition`, its evidence starting from `last_id`."""
    return Rollout(rollout.student, rollout.domain, transition.after, transition.share,
                   rollout.target, now, last_id, transition.reason)  # fmt: skip
