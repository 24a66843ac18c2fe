"""The typed shape of `law.json` (version 1): every target's fitted forms with their
parameters, bootstrap intervals and draws, held-out errors and the selected form.

`law.predict.fit_law` builds it, `save_law` writes it, `load_law` reads it; a file that does
not fit is reported with its path and the dotted field that is wrong. Floats may be NaN
(a leave-one-ratio-out error that could not be computed), written as JSON's `NaN`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from law.fit import FitError

LAW_VERSION = 1


class LawFileError(FitError):
    """A law file that cannot be read or does not have law.json's shape (a FitError, so
    that callers catching the law's errors catch it too)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Errors(_Strict):
    """Held-out and in-sample errors of one fitted form (law/validate.py's summary)."""

    loo_median_abs: float
    loo_mean_abs: float
    loro_median_abs: float
    loro_mean_abs: float
    in_sample_rmse: float
    aic: float
    bic: float


class FormFit(_Strict):
    """One form fitted to one target. `parameters` keep the form's order (predictions
    read them as a vector); `samples` are the bootstrap draws in the same order."""

    parameters: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    used_offsets: list[str]
    samples: list[list[float]]
    residual_sd: float
    errors: Errors


class Target(_Strict):
    """Every form tried on one target (in_domain, general, loss). A target no form could
    be fitted to has only `skipped`."""

    forms: dict[str, FormFit] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    selected: str | None = None
    chance: float | None = None
    teacher_loss: float | None = None
    noise_floor: float | None = None


class TeacherQuality(_Strict):
    in_domain: float | None = None
    general: float | None = None


class DataSource(_Strict):
    """The sweep results the law was fitted to."""

    path: str | None = None
    sha256: str | None = None
    rows: int = Field(ge=0)


class Law(_Strict):
    """A fitted law as `law.json` holds it."""

    version: Literal[1] = LAW_VERSION
    created: int
    task: str | None = None
    teacher: str | None = None
    teacher_quality: TeacherQuality = Field(default_factory=TeacherQuality)
    data: DataSource
    targets: dict[str, Target]

    def to_json(self) -> str:
        # Through json.dumps, not pydantic's serializer, so NaN stays NaN (pydantic would
        # write null, which a float field then refuses).
        return json.dumps(self.model_dump(), indent=1)


def parse_law(text: str | bytes, path: str | Path) -> Law:
    """`text` as a law; LawFileError names `path` and each field that is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise LawFileError(f"{path}: not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != LAW_VERSION:
        found = raw.get("version") if isinstance(raw, dict) else type(raw).__name__
        raise LawFileError(f"{path}: not a law file of version {LAW_VERSION} (version {found})")
    try:
        return Law.model_validate_json(text)
    except ValidationError as exc:
        raise LawFileError(f"{path}: invalid law file: {describe(exc)}") from None


def as_law(law: Law | Mapping[str, Any]) -> Law:
    """`law` as the typed model; a plain mapping (law.json read by other means) is
    validated as the JSON document it is."""
    if isinstance(law, Law):
        return law
    try:
        return Law.model_validate_json(json.dumps(law))
    except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
        detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
        raise LawFileError(f"not a law: {detail}") from None


def describe(exc: ValidationError, limit: int = 5) -> str:
    """The first `limit` problems on one line: dotted field, message, value found."""
    parts = []
    for error in exc.errors(include_url=False)[:limit]:
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        found = "" if error["type"] == "missing" else f" (got {error['input']!r:.60})"
        parts.append(f"{field}: {error['msg']}{found}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
