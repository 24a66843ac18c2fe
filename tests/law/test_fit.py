"""The law's forms recover known parameters from synthetic data, their bootstrap intervals
cover the truth about as often as they claim, and unusable data is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from law.fit import FitError, bootstrap, fit, information_criteria
from law.forms import FORMS, OFFSETS, Features, offset_row

RATIOS = np.array([0.2, 0.3, 0.4, 0.5, 0.7, 0.9])
EXAMPLES = np.array([250.0, 1000.0, 4000.0])


def _grid(seeds: int = 2, with_offsets: bool = True) -> Features:
    rows = [(r, d) for r in RATIOS for d in EXAMPLES for _ in range(seeds)]
    r, d = map(np.array, zip(*rows, strict=True))
    offsets = np.zeros((len(r), len(OFFSETS)))
    if with_offsets:
        offsets[::3] = offset_row("cot", "full", "one-shot")
    n = 1e8 * r
    return Features(r, d, n, offsets, chance=1 / 13, teacher_loss=1.2)


TRUE = {
    "power": np.array([0.92, 0.08, 1.3, 2.0, 0.5, 0.03]),  # delta[format=cot] last
    "logistic": np.array([0.93, 0.5, 2.5, 0.4, 0.3]),
}


@pytest.mark.parametrize("name", ["power", "logistic"])
def test_quality_forms_recover_their_parameters(name: str) -> None:
    x = _grid()
    used = x.offsets.any(axis=0)
    rng = np.random.default_rng(1)
    y = FORMS[name].predict(TRUE[name], x, used) + rng.normal(0, 0.01, len(x))
    result = fit(name, x, y)
    assert result.names[-1] == "delta[format=cot]"
    np.testing.assert_allclose(result.theta, TRUE[name], rtol=0.25, atol=0.03)
    assert np.sqrt(result.rss / result.n) < 0.015


def test_busbridge_form_fits_its_own_curves() -> None:
    x = _grid(with_offsets=False)
    used = np.zeros(len(OFFSETS), dtype=bool)
    truth = np.array([0.4, 1.0, 1.0, 1.5, 6.0, 0.35, 4.0, 0.4, 1.0, 0.8])
    y = FORMS["busbridge"].predict(truth, x, used)
    y = y * np.exp(np.random.default_rng(2).normal(0, 0.005, len(y)))
    result = fit("busbridge", x, y)
    relative = np.abs(result.predict(x) / y - 1)
    assert np.median(relative) < 0.01  # Busbridge et al. report ~1% on their own data


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_about_95_percent() -> None:
    x = _grid(with_offsets=False)
    used = np.zeros(len(OFFSETS), dtype=bool)
    truth = TRUE["logistic"][:4]
    hits = []
    for draw in range(12):
        rng = np.random.default_rng(100 + draw)
        y = FORMS["logistic"].predict(truth, x, used) + rng.normal(0, 0.01, len(x))
        intervals = bootstrap(fit("logistic", x, y), x, y, resamples=60, seed=draw)
        hits += [lo <= t <= hi for t, (lo, hi) in zip(truth, intervals.values(), strict=True)]
    coverage = np.mean(hits)
    assert 0.75 <= coverage <= 1.0, coverage  # loose: 48 intervals, 60 resamples each


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, y: (x.take(np.arange(4)), y[:4]), "only 4 points"),
        (lambda x, y: (x, np.where(np.arange(len(y)) == 3, np.nan, y)), "target has NaN"),
        (
            lambda x, y: (Features(np.full(len(x), 0.5), x.D, x.N, x.offsets), y),
            "one compression ratio",
        ),
        (lambda x, y: (Features(x.r * 2, x.D, x.N, x.offsets), y), "r must be in (0, 1]"),
        (lambda x, y: (x, y[:-1]), "targets"),
    ],
)
def test_bad_data_is_refused_by_name(change, message: str) -> None:
    x = _grid(with_offsets=False)
    y = np.linspace(0.5, 0.9, len(x))
    bad_x, bad_y = change(x, y)
    with pytest.raises(FitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit("power", bad_x, bad_y)
    with pytest.raises(FitError, match="unknown form"):
        fit("cubic", x, y)


def test_information_criteria_prefer_the_true_form() -> None:
    x = _grid(with_offsets=False)
    used = np.zeros(len(OFFSETS), dtype=bool)
    y = FORMS["power"].predict(TRUE["power"][:5], x, used)
    y = y + np.random.default_rng(3).normal(0, 0.005, len(y))
    power, logistic = fit("power", x, y), fit("logistic", x, y)
    assert information_criteria(power)["aic"] < information_criteria(logistic)["aic"]
