"""The rollout's decisions as pure functions, one constructed case per transition and
per rollback cause."""

from __future__ import annotations

import pytest

from gateway.adapt.rollout import Evidence, Rollout, decide, manual, wilson
from gateway.config import Rollout as RolloutConfig

CONFIG = RolloutConfig(steps=(0.1, 0.5), min_pairs=200, step_pairs=100, max_error_rate=0.05,
                       min_requests=50)  # fmt: skip


def at(stage: str, share: float = 0.0, target: float = 0.9) -> Rollout:
    return Rollout("s", "dom", stage, share, target, 0.0, 0)  # type: ignore[arg-type]


def test_wilson_matches_known_values() -> None:
    low, high = wilson(200, 200)
    assert low == pytest.approx(0.98115, abs=1e-4) and high == 1.0
    low, high = wilson(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_shadow_waits_for_enough_pairs() -> None:
    assert decide(at("shadow"), Evidence(pairs=199, agreeing=199), CONFIG) is None


def test_shadow_to_first_canary_step_when_lower_bound_meets_target() -> None:
    t = decide(at("shadow"), Evidence(pairs=200, agreeing=195), CONFIG)
    assert t is not None and (t.before, t.after, t.share) == ("shadow", "canary", 0.1)
    assert t.evidence["pairs"] == 200 and t.evidence["low"] >= 0.9


def test_shadow_stays_when_the_interval_straddles_the_target() -> None:
    assert decide(at("shadow"), Evidence(pairs=200, agreeing=180), CONFIG) is None


def test_shadow_student_clearly_below_target_is_retired() -> None:
    t = decide(at("shadow"), Evidence(pairs=200, agreeing=140), CONFIG)
    assert t is not None and t.after == "retired" and t.share == 0.0


def test_canary_steps_then_live() -> None:
    good = Evidence(pairs=100, agreeing=99)
    first = decide(at("canary", 0.1), good, CONFIG)
    assert first is not None and (first.after, first.share) == ("canary", 0.5)
    last = decide(at("canary", 0.5), good, CONFIG)
    assert last is not None and (last.after, last.share) == ("live", 1.0)
    assert decide(at("canary", 0.5), Evidence(pairs=99, agreeing=99), CONFIG) is None


@pytest.mark.parametrize("stage,share", [("canary", 0.1), ("live", 1.0)])
def test_agreement_drop_rolls_back_to_shadow(stage: str, share: float) -> None:
    t = decide(at(stage, share), Evidence(pairs=100, agreeing=70), CONFIG)
    assert t is not None and (t.after, t.share) == ("shadow", 0.0)
    assert "agreement upper bound" in t.reason


@pytest.mark.parametrize("stage,share", [("canary", 0.5), ("live", 1.0)])
def test_error_rate_rolls_back_to_shadow(stage: str, share: float) -> None:
    t = decide(at(stage, share), Evidence(pairs=100, agreeing=100, requests=100, errors=6), CONFIG)
    assert t is not None and t.after == "shadow" and "error rate 0.060" in t.reason
    # too few requests for the rate to count
    assert decide(at(stage, share), Evidence(requests=40, errors=10), CONFIG) is None


def test_live_with_good_evidence_stays() -> None:
    assert decide(at("live", 1.0), Evidence(pairs=200, agreeing=199, requests=500), CONFIG) is None


def test_retired_never_moves() -> None:
    assert decide(at("retired"), Evidence(pairs=500, agreeing=500), CONFIG) is None


def test_manual_moves() -> None:
    assert manual(at("shadow"), "promote", CONFIG).share == 0.1
    assert manual(at("canary", 0.5), "promote", CONFIG).after == "live"
    assert manual(at("live", 1.0), "rollback", CONFIG).after == "shadow"
    assert manual(at("canary", 0.1), "retire", CONFIG).after == "retired"
    with pytest.raises(ValueError, match="already live"):
        manual(at("live", 1.0), "promote", CONFIG)
    with pytest.raises(ValueError, match="unknown action"):
        manual(at("live", 1.0), "delete", CONFIG)
