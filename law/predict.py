"""The law as a file and its use: fit every form to sweep results, select one per target
by held-out error, save it all as a versioned `law.json`, and predict any candidate
student's in-domain and general quality (and held-out loss) with a 95% interval. The
file's shape is law/schema.py's `Law`.

A prediction's interval combines the parameters' bootstrap spread with the residual noise
of the fit (the seed-to-seed noise a single student shows), so it covers one student, not
the mean of many.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from law.data import Results
from law.fit import Fit, FitError, bootstrap_draws, fit, intervals
from law.forms import FORMS, OFFSETS, Features, offset_row
from law.schema import LAW_VERSION, FormFit, Law, LawFileError, Target, as_law, parse_law
from law.validate import noise_floor, select, summary

QUALITY_FORMS = ("power", "logistic")


def _fit_target(
    results: Results, target: str, forms: tuple[str, ...], resamples: int, seed: int
) -> Target:
    x, y = results.features(target), results.target(target)
    out: dict[str, Any] = {"forms": {}, "skipped": {}}
    for name in forms:
        try:
            result: Fit = fit(name, x, y)
            draws = bootstrap_draws(result, x, y, resamples=resamples, seed=seed)
            errors = summary(name, x, y)
        except FitError as exc:
            out["skipped"][name] = str(exc)
            continue
        residuals = result.predict(x) - y
        out["forms"][name] = {
            "parameters": result.parameters,
            "intervals": intervals(result.names, draws),
            "used_offsets": [o for o, u in zip(OFFSETS, result.used, strict=True) if u],
            "samples": draws.round(6).tolist(),
            "residual_sd": float(np.std(residuals, ddof=min(len(y) - 1, len(result.theta)))),
            "errors": errors,
        }
    if not out["forms"]:
        raise FitError(f"no form could be fitted to {target}: {out['skipped']}")
    out["selected"] = select({n: f["errors"] for n, f in out["forms"].items()})
    out["chance"] = x.chance
    out["teacher_loss"] = x.teacher_loss
    out["noise_floor"] = noise_floor(results.keys(), y)
    return Target.model_validate(out)


def fit_law(results: Results, *, resamples: int = 200, seed: int = 0) -> Law:
    """Every form fitted to every target, the selection, and where the data came from."""
    targets = {
        "in_domain": _fit_target(results, "in_domain", QUALITY_FORMS, resamples, seed),
        "general": _fit_target(results, "general", QUALITY_FORMS, resamples, seed),
    }
    if all(row.get("heldout_ce") and row.get("teacher_ce") for row in results.rows):
        try:
            targets["loss"] = _fit_target(results, "loss", ("busbridge",), resamples, seed)
        except FitError as exc:
            targets["loss"] = Target(skipped={"busbridge": str(exc)})
    first = results.rows[0]
    law = {
        "version": LAW_VERSION,
        "created": int(time.time()),
        "task": first.get("task"),
        "teacher": first.get("teacher"),
        "teacher_quality": {
            "in_domain": first.get("teacher_in_domain"),
            "general": first.get("teacher_general"),
        },
        "data": {"path": results.path, "sha256": results.sha256, "rows": len(results.rows)},
        "targets": targets,
    }
    return Law.model_validate(law)


def save_law(law: Law, path: str | Path) -> None:
    Path(path).write_text(as_law(law).to_json())


def load_law(path: str | Path) -> Law:
    """The law in the file at `path`. A file that is missing, not JSON, of another
    version or of the wrong shape raises LawFileError (a FitError) naming the path and
    the field."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise LawFileError(f"cannot read law file {path}: {exc}") from None
    return parse_law(text, path)


def _point(
    ratio: float,
    examples: float,
    fmt: str,
    method: str,
    schedule: str,
    params: float | None,
    chance: float,
    teacher_loss: float | None,
) -> Features:
    offsets = offset_row(fmt, method, schedule)[None, :]
    n = np.array([params]) if params is not None else None
    return Features(np.array([ratio]), np.array([examples], float), n, offsets, chance,
                    teacher_loss)  # fmt: skip


def predict(
    law: Law | Mapping[str, Any],
    *,
    ratio: float,
    examples: float,
    format: str = "logits",
    method: str = "full",
    schedule: str = "one-shot",
    parameters: float | None = None,
    form: str | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Predicted value and 95% interval per target for one candidate student."""
    if not 0 < ratio <= 1 or examples <= 0:
        raise FitError(f"need ratio in (0, 1] and examples > 0, got {ratio} and {examples}")
    law = as_law(law)
    out = {}
    rng = np.random.default_rng(seed)
    for target, fitted in law.targets.items():
        name = form or fitted.selected
        if name not in fitted.forms or (target == "loss" and parameters is None):
            continue
        entry: FormFit = fitted.forms[name]
        used = np.array([o in entry.used_offsets for o in OFFSETS])
        row = offset_row(format, method, schedule)
        unseen = [o for o, on, u in zip(OFFSETS, row, used, strict=True) if on and not u]
        x = _point(ratio, examples, format, method, schedule, parameters,
                   fitted.chance if fitted.chance is not None else 0.0,
                   fitted.teacher_loss)  # fmt: skip
        theta = np.array(list(entry.parameters.values()))
        samples = np.array(entry.samples)
        value = float(FORMS[name].predict(theta, x, used)[0])
        spread = np.array([FORMS[name].predict(s, x, used)[0] for s in samples])
        spread = spread + rng.normal(0, entry.residual_sd, len(spread))
        low, high = np.percentile(spread, [2.5, 97.5])
        bounded = target != "loss"
        out[target] = {
            "value": float(np.clip(value, 0, 1)) if bounded else value,
            "low": float(np.clip(low, 0, 1)) if bounded else float(low),
            "high": float(np.clip(high, 0, 1)) if bounded else float(high),
            "form": name,
            "extrapolated_offsets": unseen,
        }
    return out
