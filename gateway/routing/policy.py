"""The routing policy file: named SLO classes, which class a request gets, what happens
when no model meets a class, the exploration share and the cost table.

    classes:
      interactive: {min_quality: 0.95, quality_basis: relative_to_teacher,
                    p95_ttft_ms: 300, p95_latency_ms: 2000}
      batch:       {min_quality: 0.90, max_cost_per_1k_tokens: 0.02}
    default_class: interactive
    api_keys: {team-a: {class: batch}}   # a key's NAME (`distillgate keys create`) -> class
    fallback: teacher                    # teacher | best_effort | reject
    exploration: 0.02
    teacher_cost_per_1k_tokens: 0.10     # models without a cost: scaled by parameters
    costs: {finance-r05: 0.03}

Validated strictly, all problems at once (like the gateway config). `PolicyFile` rereads
the file when it changes; a bad new file is logged and the old policy stays.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("distillgate")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SloClass(_Strict):
    """What a request of this class needs. Quality is accuracy in [0, 1]: the predicted
    accuracy divided by the teacher's (`relative_to_teacher`) or as is (`absolute`), taken
    at the lower end of its `quality_interval` (0.95: the 95% interval; 0: the point
    estimate, trusting a prediction as it stands)."""

    min_quality: float = Field(0.0, ge=0, le=1)
    quality_basis: Literal["relative_to_teacher", "absolute"] = "relative_to_teacher"
    quality_interval: float = Field(0.95, ge=0, lt=1)
    p95_ttft_ms: float | None = Field(None, gt=0)
    p95_latency_ms: float | None = Field(None, gt=0)
    max_cost_per_1k_tokens: float | None = Field(None, ge=0)
    # Keep the messages and the answers of this class's requests in the traffic log: the
    # adaptation loop distils students from the teacher's logged answers.
    log_content: bool = False


class ApiKey(_Strict):
    """The class of the key of this name (gateway/auth.py; a key made with `keys create
    --class` has its own, which wins). With auth.mode none there are no keys, and the
    name is matched against the bearer token as sent: a label, not a secret."""

    slo_class: str = Field(alias="class")


class Policy(_Strict):
    classes: dict[str, SloClass] = Field(min_length=1)
    default_class: str
    api_keys: dict[str, ApiKey] = Field(default_factory=dict)
    fallback: Literal["teacher", "best_effort", "reject"] = "teacher"
    exploration: float = Field(0.0, ge=0, le=0.5)
    seed: int | None = None
    teacher_cost_per_1k_tokens: float = Field(0.10, ge=0)
    costs: dict[str, float] = Field(default_factory=dict)
    min_domain_confidence: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> Policy:
        names = set(self.classes)
        if self.default_class not in names:
            raise ValueError(f"default_class {self.default_class!r} is not one of the classes")
        bad = {k: v.slo_class for k, v in self.api_keys.items() if v.slo_class not in names}
        if bad:
            listed = ", ".join(f"{k} -> {c!r}" for k, c in sorted(bad.items()))
            raise ValueError(f"api_keys name classes that do not exist: {listed}")
        secrets = sorted(k[:11] + "..." for k in self.api_keys if k.startswith("dg-"))
        if secrets:  # a key's secret pasted into a file: never keep secrets in the policy
            raise ValueError(
                f"api_keys must name keys, not hold them ({', '.join(secrets)}); give the "
                "key's name, or make it with `distillgate keys create --name NAME --class "
                "CLASS` and drop it from the policy"
            )
        negative = sorted(k for k, v in self.costs.items() if v < 0)
        if negative:
            raise ValueError(f"costs must be >= 0: {', '.join(negative)}")
        return self


DEFAULT_POLICY = Policy(classes={"default": SloClass()}, default_class="default")


def parse_policy(data: object, source: str = "<policy>") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping with `classes`")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"{source}: {problems}") from None


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return parse_policy(data, str(path))


@dataclass
class PolicyFile:
    """The policy at `path`, reread by `refresh()` when the file's mtime or size change.
    Requests hold the Policy object they started with, so a reload drops none."""

    path: Path
    policy: Policy
    stamp: tuple[int, int] = (0, 0)
    error: str | None = None  # why the newest version of the file was rejected

    @classmethod
    def open(cls, path: Path | str) -> PolicyFile:
        path = Path(path)
        stamp = _stamp(path)
        return cls(path, load_policy(path), stamp)

    def refresh(self) -> bool:
        """Reload if the file changed; True when a new policy took effect."""
        stamp = _stamp(self.path)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            self.error = str(exc)
            log.error("policy not reloaded, keeping the previous one: %s", exc)
            return False
        self.error = None
        log.info("policy reloaded from %s", self.path)
        return True


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)
