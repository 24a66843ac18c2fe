"""How well each served model would answer a request of each domain, predicted once per
(model, domain) whenever the models or the law change, and looked up per request.

A student's quality on its own task is in-domain accuracy; on any other domain it is its
general-knowledge accuracy. Two sources, when present, are combined by inverse variance
(each 95% interval read as +-1.96 sd): the law's prediction from the student's manifest
features (compression ratio, examples, format, method, schedule; only for the task and
teacher the law was fitted on) and the student's own measured evaluation. The router uses
the lower end of the combined interval (95% unless the class asks for another width), so
an uncertain student is trusted less.

Relative quality divides by the reference teacher's accuracy on the same domain (the
served teacher that measured best there); the reference itself is 1 by definition.

A student the adaptation loop made (its manifest's `adaptation`) learned from its
teacher's logged answers, so its in-domain accuracy is its agreement with that teacher,
and the teacher is right by definition there: on such a domain, when the teacher has no
measurement of its own, its quality is taken as measured 1.0, and the student's relative
quality is its agreement's lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist
from typing import TYPE_CHECKING

from gateway.routing.domains import GENERAL
from models.store import Interval, Manifest

if TYPE_CHECKING:  # the law (scipy) is imported only when a law is configured
    from law.schema import Law

Z95 = 1.959964


@cache  # a handful of classes, asked on every routed request
def z_for(interval: float) -> float:
    """The normal quantile whose +-z spans `interval` (0 -> 0: the point estimate)."""
    return NormalDist().inv_cdf(0.5 + interval / 2) if interval > 0 else 0.0


@dataclass(frozen=True)
class Quality:
    value: float  # predicted accuracy
    low: float  # lower end of its 95% interval
    source: str  # measured | law | law+measured | unknown
    sd: float | None = None  # None: read from the 95% interval

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    def lower(self, z: float = Z95) -> float:
        """The lower end of the +-z interval: what routing relies on."""
        sd = self.sd if self.sd is not None else (self.value - self.low) / Z95
        return max(0.0, self.value - z * sd) if self.known else 0.0


UNKNOWN = Quality(0.0, 0.0, "unknown")
# A teacher on the domain of a student made from its own answers: the labels are its own.
OWN_LABELS = Quality(1.0, 1.0, "measured")


def _estimate(interval: Interval | None) -> tuple[float, float] | None:
    """(mean, variance) from a 95% interval."""
    if interval is None:
        return None
    sd = (interval.high - interval.low) / (2 * Z95)
    return interval.value, max(sd, 0.005) ** 2


def measured(manifest: Manifest, domain: str) -> Interval | None:
    """The model's measured accuracy interval on `domain` (general knowledge when it was
    not evaluated on that domain)."""
    ev = manifest.evaluation
    if domain != GENERAL and domain in ev.in_domain:
        return ev.in_domain[domain].accuracy
    if manifest.role == "student" and domain == manifest.task:
        return None  # its own task, not evaluated: the law may still know
    return ev.general_knowledge.accuracy if ev.general_knowledge else None


def from_law(law: Law | None, manifest: Manifest, domain: str) -> Interval | None:
    """The law's prediction interval for a student on `domain`, when the law covers it."""
    if law is None or manifest.role != "student" or manifest.compression_ratio is None:
        return None
    if manifest.task != law.task or manifest.parent not in (None, law.teacher):
        return None
    from law.fit import FitError
    from law.predict import predict

    schedule = manifest.pruning.get("schedule", "one-shot")
    try:
        out = predict(
            law, ratio=manifest.compression_ratio, examples=float(manifest.examples or 1),
            format=manifest.supervision or "logits", method=manifest.method or "full",
            schedule=schedule,
        )  # fmt: skip
    except FitError:
        return None
    p = out.get("in_domain" if domain == manifest.task else "general")
    return Interval(value=p["value"], low=p["low"], high=p["high"]) if p else None


def predict_quality(manifest: Manifest, domain: str, law: Law | None) -> Quality:
    sources = {
        "law": _estimate(from_law(law, manifest, domain)),
        "measured": _estimate(measured(manifest, domain)),
    }
    present = {k: v for k, v in sources.items() if v is not None}
    if not present:
        return UNKNOWN
    weights = {k: 1 / var for k, (_, var) in present.items()}
    total = sum(weights.values())
    mean = sum(weights[k] * m for k, (m, _) in present.items()) / total
    sd = math.sqrt(1 / total)
    return Quality(mean, max(0.0, mean - Z95 * sd), "+".join(sorted(present)), sd)


@dataclass(frozen=True)
class QualityTable:
    """Predicted quality of every model on every domain, and the reference teachers."""

    absolute: dict[tuple[str, str], Quality]
    reference: dict[str, str | None]  # domain -> the reference teacher's name

    def get(self, model: str, domain: str, relative: bool, z: float = Z95) -> float:
        """The conservative quality routing compares with a class's min_quality: the lower
        end of the +-z interval, over the reference teacher's point estimate if relative."""
        q = self.absolute.get((model, domain), UNKNOWN)
        if not relative:
            return q.lower(z)
        ref = self.reference.get(domain)
        if ref is None:
            return 0.0
        if model == ref:
            return 1.0
        teacher = self.absolute[(ref, domain)]
        return q.lower(z) / teacher.value if teacher.known and teacher.value > 0 else 0.0

    def point(self, model: str, domain: str) -> Quality:
        return self.absolute.get((model, domain), UNKNOWN)


def build_table(
    manifests: Mapping[str, Manifest | None],
    roles: Mapping[str, str],
    domains: list[str],
    law: Law | None,
) -> QualityTable:
    """`manifests`: each served model's registry manifest (None for remote models)."""
    absolute = {}
    for name, manifest in manifests.items():
        for domain in domains:
            absolute[(name, domain)] = (
                predict_quality(manifest, domain, law) if manifest is not None else UNKNOWN
            )
    for teacher, domain in _adapted_from(manifests):
        manifest = manifests.get(teacher)
        if (
            roles.get(teacher) == "teacher"
            and domain in domains
            and (manifest is None or domain not in manifest.evaluation.in_domain)
        ):
            absolute[(teacher, domain)] = OWN_LABELS
    reference = {}
    for domain in domains:
        teachers = [n for n in manifests if roles.get(n) == "teacher"]
        ranked = sorted(teachers, key=lambda n: absolute[(n, domain)].value, reverse=True)
        reference[domain] = ranked[0] if ranked else None
    return QualityTable(absolute, reference)


def _adapted_from(manifests: Mapping[str, Manifest | None]) -> set[tuple[str, str]]:
    """(teacher, domain) for each student the adaptation loop made from a teacher's
    answers: its domain is its task."""
    return {
        (mf.adaptation.teacher, mf.task)
        for mf in manifests.values()
        if mf is not None and mf.role == "student" and mf.adaptation is not None and mf.task
    }
