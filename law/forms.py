"""Candidate functional forms of the law: student quality (accuracy) as a function of the
compression ratio r and the number of distillation examples D, and the reference
distillation-loss law of Busbridge et al. for the students' held-out cross-entropy.

Every form maps features X (r, D, N and 0/1 offset columns for supervision format, method
and schedule, baseline = logits / full / one-shot) and parameters theta to a prediction.
Offsets are additive in the quantity each form is linear in.

1. `power` (saturating power law; after Kaplan et al. 2020 and Hoffmann et al. 2022's
   separable terms, with compression measured as the parameters removed per parameter kept):
       q = q_T - a (1/r - 1)^alpha - b D^-beta + sum_k delta_k x_k
   q_T is the quality of an uncompressed student with unlimited data; r = 1 costs nothing.
2. `logistic` (a GLM in log r and log D, bounded by chance c and a ceiling u; after the
   sigmoidal accuracy curves of Ruan et al. 2024, "Observational Scaling Laws"):
       q = c + (u - c) * sigmoid(w0 + w_r log r + w_D log D + sum_k delta_k x_k)
3. `busbridge` (Busbridge et al. 2025, "Distillation Scaling Laws", arXiv 2502.08606, Eq. 8):
       L_S = L_T + L_T^-c0 (1 + (L_T / (L~_S d1))^(1/f1))^(-c1 f1) (A / N^a + B / D^b)^g
   with N the student's non-embedding parameters, D its distillation tokens and L_T the
   teacher's loss. L~_S is the supervised loss of the same student; we trained none
   without a teacher, so L~_S is modelled by the Chinchilla form E + A / N^a + B / D^b
   sharing A, a, B, b (an assumption of ours, not the paper's). Fitted on log L.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

OFFSETS = ("format=answers", "format=cot", "method=lora", "schedule=iterative")
BASELINE = {"format": "logits", "method": "full", "schedule": "one-shot"}


@dataclass(frozen=True)
class Features:
    """The inputs of one or more students, as arrays of equal length."""

    r: np.ndarray
    D: np.ndarray
    N: np.ndarray | None = None
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, len(OFFSETS))))
    chance: float = 0.0
    teacher_loss: float | None = None

    def __len__(self) -> int:
        return len(self.r)

    def take(self, rows: np.ndarray) -> Features:
        return Features(
            self.r[rows],
            self.D[rows],
            None if self.N is None else self.N[rows],
            self.offsets[rows],
            self.chance,
            self.teacher_loss,
        )


def offset_row(format: str, method: str, schedule: str) -> np.ndarray:
    kind = "iterative" if schedule.startswith("iterative") else schedule
    on = {f"format={format}", f"method={method}", f"schedule={kind}"}
    return np.array([1.0 if name in on else 0.0 for name in OFFSETS])


@dataclass(frozen=True)
class Form:
    name: str
    target: str  # "quality" or "loss"
    params: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    starts: tuple[tuple[float, ...], ...]  # multi-start points for the core parameters
    core: Callable[[np.ndarray, Features], np.ndarray]
    offset_bound: float = 1.0
    log_space: bool = False  # fit residuals of log y (the loss law)

    def names(self, offsets: tuple[str, ...]) -> tuple[str, ...]:
        return self.params + tuple(f"delta[{o}]" for o in offsets)

    def bounds(self, n_offsets: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array(self.lower + (-self.offset_bound,) * n_offsets)
        hi = np.array(self.upper + (self.offset_bound,) * n_offsets)
        return lo, hi

    def predict(self, theta: np.ndarray, x: Features, used: np.ndarray) -> np.ndarray:
        """`used` selects the offset columns this fit estimates (the others are absent)."""
        k = len(self.params)
        shift = x.offsets[:, used] @ theta[k:] if used.any() else np.zeros(len(x))
        return self.core(theta[:k], x, shift)


def _power(theta: np.ndarray, x: Features, shift: np.ndarray) -> np.ndarray:
    q_t, a, alpha, b, beta = theta
    return q_t - a * (1 / x.r - 1) ** alpha - b * x.D**-beta + shift


def _logistic(theta: np.ndarray, x: Features, shift: np.ndarray) -> np.ndarray:
    u, w0, w_r, w_d = theta
    z = w0 + w_r * np.log(x.r) + w_d * np.log(x.D) + shift
    return x.chance + (u - x.chance) / (1 + np.exp(-z))


def _busbridge(theta: np.ndarray, x: Features, shift: np.ndarray) -> np.ndarray:
    c0, c1, f1, d1, log_a, a, log_b, b, g, e = theta
    if x.N is None or x.teacher_loss is None:
        raise ValueError("the busbridge form needs N (parameters) and the teacher's loss")
    capacity = np.exp(log_a) / x.N**a + np.exp(log_b) / x.D**b
    supervised = e + capacity
    lt = x.teacher_loss
    mix = (1 + (lt / (supervised * d1)) ** (1 / f1)) ** (-c1 * f1)
    return (lt + lt**-c0 * mix * capacity**g) * np.exp(shift)


FORMS: dict[str, Form] = {
    "power": Form(
        "power",
        "quality",
        ("q_T", "a", "alpha", "b", "beta"),
        (0.0, 0.0, 0.05, 0.0, 0.01),
        (1.0, 5.0, 5.0, 50.0, 2.0),
        ((0.9, 0.1, 1.0, 1.0, 0.5), (0.8, 0.5, 2.0, 5.0, 0.3), (1.0, 0.05, 0.5, 0.1, 1.0)),
        _power,
    ),
    "logistic": Form(
        "logistic",
        "quality",
        ("u", "w0", "w_r", "w_D"),
        (0.0, -30.0, 0.0, 0.0),
        (1.0, 30.0, 20.0, 5.0),
        ((0.95, 0.0, 2.0, 0.5), (0.9, -3.0, 5.0, 1.0), (1.0, 2.0, 1.0, 0.2)),
        _logistic,
        offset_bound=10.0,
    ),
    "busbridge": Form(
        "busbridge",
        "loss",
        ("c0", "c1", "f1", "d1", "logA", "a", "logB", "b", "g", "E"),
        (-2.0, 0.0, 0.05, 0.05, -10.0, 0.0, -10.0, 0.0, 0.1, 0.0),
        (5.0, 5.0, 10.0, 20.0, 30.0, 2.0, 30.0, 2.0, 3.0, 10.0),
        (
            (0.5, 1.0, 1.0, 1.0, 5.0, 0.3, 3.0, 0.3, 1.0, 0.5),
            (0.0, 0.5, 0.5, 2.0, 10.0, 0.5, 5.0, 0.5, 0.5, 1.0),
        ),
        _busbridge,
        offset_bound=2.0,
        log_space=True,
    ),
}
