"""The adaptation loop's two decisions about a student before and after it is made, as pure
functions: the plan (which compression ratio, from the law's prediction for the number of
examples at hand, within the time budget) and the gate (is its measured agreement with the
teacher, at the lower end of its 95% interval, at or above the target).

The law predicts in-domain accuracy on the task it was fitted on; the plan reads it as
the share of the teacher's quality a student keeps (its prediction over the teacher's
accuracy there) and carries that over to the new traffic. It is a prior, not a proof: the
gate measures every student before it is registered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.adapt.rollout import wilson

if TYPE_CHECKING:
    from gateway.routing.policy import Policy
    from law.schema import Law

Verdict = Literal["train", "wait"]


@dataclass(frozen=True)
class Budget:
    """What the planner may choose from and spend."""

    ratios: tuple[float, ...]
    default_ratio: float
    max_minutes: float
    seconds_per_example: float  # a full-size student, one epoch
    epochs: float
    max_examples: int


@dataclass(frozen=True)
class Plan:
    """`verdict` train: make a student at `ratio` on `examples`; wait: too few examples
    for any ratio the law trusts, while more would help. `predicted` is the law's relative
    quality (value, low, high) at that ratio, None without a law."""

    verdict: Verdict
    ratio: float
    examples: int
    minutes: float
    predicted: tuple[float, float, float] | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"verdict": self.verdict, "ratio": self.ratio,
                                  "examples": self.examples, "minutes": round(self.minutes, 1),
                                  "reason": self.reason}  # fmt: skip
        if self.predicted is not None:
            out["predicted"] = dict(zip(("value", "low", "high"), self.predicted, strict=True))
        return out


def target_of(policy: Policy, classes: Iterable[str | None]) -> float:
    """The strictest min_quality among the known classes that sent this traffic (the
    policy's default class when none is known)."""
    known = [policy.classes[c].min_quality for c in classes if c in policy.classes]
    return max(known) if known else policy.classes[policy.default_class].min_quality


def minutes_for(ratio: float, examples: int, budget: Budget) -> float:
    """Training time, estimated as proportional to the student's size and the tokens seen."""
    return budget.seconds_per_example * examples * budget.epochs * ratio / 60


def relative(law: Law, ratio: float, examples: int, fmt: str, method: str,
             schedule: str) -> tuple[float, float, float] | None:  # fmt: skip
    """The law's in-domain prediction over the teacher's accuracy, or None if it has none."""
    from law.fit import FitError
    from law.predict import predict

    try:
        out = predict(law, ratio=ratio, examples=float(examples), format=fmt, method=method,
                      schedule=schedule).get("in_domain")  # fmt: skip
    except FitError:
        return None
    if out is None:
        return None
    teacher = law.teacher_quality.in_domain or 1.0
    return tuple(min(1.0, out[k] / teacher) for k in ("value", "low", "high"))  # type: ignore[return-value]


def plan(
    law: Law | None, target: float, examples: int, budget: Budget, *, fmt: str = "logits",
    method: str = "full", schedule: str = "one-shot", exclude: Sequence[float] = (),
) -> Plan:  # fmt: skip
    """The smallest ratio (most compressed) whose predicted lower bound meets `target` at
    `examples` within the time budget. When none does: wait, if the law says one would
    with more examples (up to max_examples); else the best-predicted ratio within budget,
    for the gate to judge."""
    ratios = sorted(r for r in budget.ratios if r not in exclude)
    affordable = [r for r in ratios if minutes_for(r, examples, budget) <= budget.max_minutes]
    if not affordable:
        smallest = ratios[0] if ratios else budget.default_ratio
        return Plan("wait", smallest, examples, minutes_for(smallest, examples, budget), None,
                    f"no ratio trains within {budget.max_minutes:g} minutes")  # fmt: skip
    if law is None:
        ratio = min(affordable, key=lambda r: abs(r - budget.default_ratio))
        return Plan("train", ratio, examples, minutes_for(ratio, examples, budget), None,
                    "no law configured: the default ratio")  # fmt: skip
    predicted = {r: relative(law, r, examples, fmt, method, schedule) for r in affordable}
    for r in affordable:
        p = predicted[r]
        if p is not None and p[1] >= target:
            return Plan(
                "train",
                r,
                examples,
                minutes_for(r, examples, budget),
                p,
                f"smallest ratio predicted to keep >= {target:g} (low {p[1]:.3f})",
            )
    if examples < budget.max_examples:
        for r in affordable:
            more = relative(law, r, budget.max_examples, fmt, method, schedule)
            if more is not None and more[1] >= target:
                return Plan("wait", r, examples, minutes_for(r, examples, budget), predicted[r],
                            f"ratio {r:g} is predicted to meet {target:g} with up to "
                            f"{budget.max_examples} examples, not with {examples}")  # fmt: skip
    known = {r: p for r, p in predicted.items() if p is not None}
    best = max(known, key=lambda r: known[r][1]) if known else affordable[-1]
    return Plan("train", best, examples, minutes_for(best, examples, budget), known.get(best),
                f"no ratio is predicted to meet {target:g}: the best-predicted one, for the "
                "gate to judge")  # fmt: skip


@dataclass(frozen=True)
class GateResult:
    passed: bool
    n: int
    value: float
    low: float
    high: float
    target: float

    def as_dict(self) -> Mapping[str, float | int | bool]:
        rounded = {k: round(getattr(self, k), 4) for k in ("value", "low", "high")}
        return {"passed": self.passed, "n": self.n, **rounded, "target": self.target}


def gate(agreements: Sequence[float], target: float, confidence: float = 0.95) -> GateResult:
    """Pass when the lower end of agreement's interval is at or above `target`."""
    n = len(agreements)
    total = float(sum(agreements))
    low, high = wilson(total, n, confidence)
    value = total / n if n else 0.0
    return GateResult(n > 0 and low >= target, n, value, low, high, target)
