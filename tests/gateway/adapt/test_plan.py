"""The planner and the gate as pure functions, on the repository's fitted law."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.adapt.plan import Budget, gate, plan, relative, target_of
from gateway.routing.policy import parse_policy

BUDGET = Budget(ratios=(0.25, 0.5, 0.75), default_ratio=0.5, max_minutes=30,
                seconds_per_example=0.6, epochs=2, max_examples=5000)  # fmt: skip


@pytest.fixture(scope="module")
def law():
    """The law fitted to the repository's sweep (docs/RESULTS.md): loaded, not fitted, so
    the fast lane pays nothing for it."""
    from law.predict import load_law

    return load_law(Path(__file__).parents[3] / "docs" / "results" / "law.json")


def test_target_is_the_strictest_class_that_sent_the_traffic() -> None:
    classes = {"a": {"min_quality": 0.9}, "b": {"min_quality": 0.95}, "c": {"min_quality": 0.5}}
    policy = parse_policy({"classes": classes, "default_class": "c"})
    assert target_of(policy, ["a", "b"]) == 0.95
    assert target_of(policy, ["a", "unknown", None]) == 0.9
    assert target_of(policy, []) == 0.5


def test_plan_picks_the_smallest_ratio_meeting_the_target(law) -> None:
    predictions = {r: relative(law, r, 1000, "logits", "full", "one-shot") for r in BUDGET.ratios}
    lows = {r: p[1] for r, p in predictions.items() if p is not None}
    assert lows, "the synthetic law predicts in-domain quality"
    # a target just under the 0.5 prediction's lower end: 0.5 qualifies, 0.25 must not
    target = lows[0.5] - 1e-6
    chosen = plan(law, target, 1000, BUDGET)
    expected = min(r for r, low in lows.items() if low >= target)
    assert chosen.verdict == "train" and chosen.ratio == expected
    assert chosen.predicted is not None and chosen.predicted[1] >= target


def test_plan_respects_the_time_budget(law) -> None:
    tight = Budget(**{**BUDGET.__dict__, "max_minutes": 0.6 * 1000 * 2 * 0.5 / 60})
    chosen = plan(law, 0.0, 1000, tight)
    assert chosen.ratio <= 0.5 and chosen.minutes <= tight.max_minutes
    none = Budget(**{**BUDGET.__dict__, "max_minutes": 0.01})
    assert plan(law, 0.0, 1000, none).verdict == "wait"


def test_plan_without_law_uses_the_default_ratio() -> None:
    chosen = plan(None, 0.9, 500, BUDGET)
    assert (chosen.verdict, chosen.ratio, chosen.predicted) == ("train", 0.5, None)


def test_unreachable_target_trains_the_best_predicted_ratio_for_the_gate(law) -> None:
    chosen = plan(law, 1.01, BUDGET.max_examples, BUDGET)
    assert chosen.verdict == "train" and "gate" in chosen.reason


def test_exclude_skips_tried_ratios(law) -> None:
    assert plan(None, 0.9, 500, BUDGET, exclude=(0.25, 0.5)).ratio == 0.75


def test_gate_uses_the_lower_bound() -> None:
    assert gate([1.0] * 100, 0.95).passed  # Wilson low 0.963
    assert not gate([1.0] * 50, 0.95).passed  # low 0.929: too few items to prove 0.95
    result = gate([1.0] * 90 + [0.0] * 10, 0.9)
    assert not result.passed and result.value == pytest.approx(0.9) and result.low < 0.9
    assert not gate([], 0.0).passed
