"""Fitting a form of the law to measured students: a robust (Huber) least-squares fit with
parameter bounds from several starting points (scipy's trust-region reflective solver),
and bootstrap intervals for every parameter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from law.forms import FORMS, OFFSETS, Features, Form

HUBER_SCALE = {"quality": 0.02, "loss": 0.05}  # about one noise sd: 2 points, 5% of a loss


class FitError(ValueError):
    """Data a law cannot be fitted to; the message names the problem."""


@dataclass(frozen=True)
class Fit:
    form: str
    names: tuple[str, ...]
    theta: np.ndarray
    used: np.ndarray  # which OFFSETS columns the fit estimates
    n: int
    rss: float  # sum of squared residuals in the fitted space

    def predict(self, x: Features) -> np.ndarray:
        return FORMS[self.form].predict(self.theta, x, self.used)

    @property
    def parameters(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.theta), strict=True))


def _form(name: str) -> Form:
    if name not in FORMS:
        raise FitError(f"unknown form {name!r}; forms: {', '.join(FORMS)}")
    return FORMS[name]


def check(form: Form, x: Features, y: np.ndarray, used: np.ndarray) -> None:
    """Refuse data that cannot identify the form, naming what is wrong."""
    y = np.asarray(y, dtype=float)
    k = len(form.params) + int(used.sum())
    if len(y) != len(x):
        raise FitError(f"{len(x)} feature rows but {len(y)} targets")
    for name, values in (("r", x.r), ("D", x.D), ("target", y)):
        if not np.all(np.isfinite(values)):
            raise FitError(f"{name} has NaN or infinite values")
    if len(y) <= k:
        raise FitError(f"form {form.name!r} has {k} parameters but only {len(y)} points")
    if np.any((x.r <= 0) | (x.r > 1)) or np.any(x.D <= 0):
        raise FitError("r must be in (0, 1] and D > 0 for every point")
    if len(np.unique(x.r)) < 2:
        raise FitError("all points share one compression ratio; the r-dependence is unidentified")
    if form.log_space and np.any(y <= 0):
        raise FitError("losses must be > 0")


def _residuals(form: Form, x: Features, y: np.ndarray, used: np.ndarray):
    target = np.log(y) if form.log_space else y

    def residuals(theta: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            pred = form.predict(theta, x, used)
            out = (np.log(np.maximum(pred, 1e-12)) if form.log_space else pred) - target
        return np.where(np.isfinite(out), out, 1e3)

    return residuals


def fit(
    form_name: str,
    x: Features,
    y: np.ndarray,
    *,
    used: np.ndarray | None = None,
    start: np.ndarray | None = None,
) -> Fit:
    """The best of a multi-start robust fit of `form_name` to (x, y). Offset columns that
    no point has are left out (`used`), so they cannot be fitted to nothing."""
    form = _form(form_name)
    y = np.asarray(y, dtype=float)
    used = x.offsets.any(axis=0) if used is None else used
    check(form, x, y, used)
    lo, hi = form.bounds(int(used.sum()))
    residuals = _residuals(form, x, y, used)
    starts = [np.array(s + (0.0,) * int(used.sum())) for s in form.starts]
    starts = ([start] if start is not None else []) + starts
    best = None
    for s in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = least_squares(
                residuals,
                np.clip(s, lo, hi),
                bounds=(lo, hi),
                loss="huber",
                f_scale=HUBER_SCALE[form.target],
                max_nfev=2000,
            )
        if best is None or result.cost < best.cost:
            best = result
    rss = float(np.sum(residuals(best.x) ** 2))
    names = tuple(p for p in form.params) + tuple(
        f"delta[{o}]" for o, u in zip(OFFSETS, used, strict=True) if u
    )
    return Fit(form.name, names, best.x, used, len(y), rss)


def bootstrap_draws(
    result: Fit, x: Features, y: np.ndarray, *, resamples: int = 200, seed: int = 0
) -> np.ndarray:
    """Parameters refitted to resampled points (rows drawn with replacement; resamples
    that cannot identify the form are skipped), one row per resample."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=float)
    draws = []
    for _ in range(resamples):
        rows = rng.integers(0, len(y), len(y))
        try:
            refit = fit(result.form, x.take(rows), y[rows], used=result.used, start=result.theta)
        except FitError:
            continue
        draws.append(refit.theta)
    if len(draws) < resamples // 2:
        raise FitError(f"only {len(draws)} of {resamples} bootstrap resamples could be fitted")
    return np.array(draws)


def intervals(
    names: tuple[str, ...], draws: np.ndarray, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile interval of every parameter over the bootstrap draws."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return {n: (float(a), float(b)) for n, a, b in zip(names, low, high, strict=True)}


def bootstrap(
    result: Fit,
    x: Features,
    y: np.ndarray,
    *,
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every parameter of `result`."""
    draws = bootstrap_draws(result, x, y, resamples=resamples, seed=seed)
    return intervals(result.names, draws, level)


def information_criteria(result: Fit) -> dict[str, float]:
    """AIC and BIC from the Gaussian likelihood of the residuals."""
    k, n = len(result.theta), result.n
    log_likelihood = -n / 2 * (np.log(2 * np.pi * max(result.rss, 1e-300) / n) + 1)
    return {"aic": 2 * k - 2 * log_likelihood, "bic": k * np.log(n) - 2 * log_likelihood}
