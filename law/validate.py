"""How far a fitted law can be trusted: leave-one-out error, leave-one-compression-level-out
error (predicting a ratio never seen, the honest test), the seed-to-seed noise floor the
residuals should be set against, and model selection by held-out error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from law.fit import Fit, FitError, fit, information_criteria
from law.forms import Features


def held_out_predictions(form: str, x: Features, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each point's prediction from a fit without its group (NaN when the rest could not
    be fitted)."""
    predictions = np.full(len(y), np.nan)
    for group in np.unique(groups):
        out = groups == group
        try:
            result = fit(form, x.take(np.flatnonzero(~out)), y[~out])
        except FitError:
            continue
        predictions[out] = result.predict(x.take(np.flatnonzero(out)))
    return predictions


def _held_out(form: str, x: Features, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.abs(held_out_predictions(form, x, y, groups) - y)


def leave_one_out(form: str, x: Features, y: np.ndarray) -> np.ndarray:
    return _held_out(form, x, np.asarray(y, float), np.arange(len(y)))


def leave_one_ratio_out(form: str, x: Features, y: np.ndarray) -> np.ndarray:
    """Errors when every student of a compression ratio is left out at once. The extreme
    ratios are extrapolation, the inner ones interpolation; both are reported."""
    return _held_out(form, x, np.asarray(y, float), np.round(x.r, 3))


def noise_floor(keys: Sequence[tuple], y: np.ndarray) -> float:
    """Pooled sd between seeds of the same configuration (the error no law can beat)."""
    y = np.asarray(y, float)
    groups: dict[tuple, list[float]] = {}
    for key, value in zip(keys, y, strict=True):
        groups.setdefault(key, []).append(value)
    spread = [np.var(v, ddof=1) * (len(v) - 1) for v in groups.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return float(np.sqrt(sum(spread) / dof)) if dof else float("nan")


def _finite(statistic, errors: np.ndarray) -> float:
    """The statistic over the errors that could be computed; NaN when none could (e.g.
    every ratio left out leaves a single ratio, which cannot be fitted)."""
    kept = errors[np.isfinite(errors)]
    return float(statistic(kept)) if kept.size else float("nan")


def summary(form: str, x: Features, y: np.ndarray) -> dict[str, float]:
    """Median and mean held-out errors, in-sample error and information criteria."""
    result: Fit = fit(form, x, y)
    loo, loro = leave_one_out(form, x, y), leave_one_ratio_out(form, x, y)
    return {
        "loo_median_abs": _finite(np.median, loo),
        "loo_mean_abs": _finite(np.mean, loo),
        "loro_median_abs": _finite(np.median, loro),
        "loro_mean_abs": _finite(np.mean, loro),
        "in_sample_rmse": float(np.sqrt(result.rss / result.n)),
        **information_criteria(result),
    }


def select(scores: dict[str, dict[str, float]]) -> str:
    """The form with the lowest median leave-one-out error (ties: the lower BIC)."""
    return min(scores, key=lambda f: (scores[f]["loo_median_abs"], scores[f]["bic"]))
