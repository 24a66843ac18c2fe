"""Routing under rollouts, with constructed inputs: a student in shadow or retired is never
chosen, one in canary only on its own domain and only for its share of those requests,
one live like any model; a teacher-answered request on a shadowed domain names a student
for a shadow answer at `shadow_share`; and the teacher's quality on a domain whose student
learned from its own answers is 1 by definition."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from gateway.adapt.rollout import Rollout
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.routing.domains import GENERAL, DomainDetector
from gateway.routing.policy import PolicyFile
from gateway.routing.quality import OWN_LABELS, Quality, QualityTable, build_table
from gateway.routing.router import Router, _Models
from models.store import Adaptation, Evaluation, Interval, Manifest, ModelStore
from tests.gateway.routing.test_router import Idle

FINANCE = "finance"
# texts the fitted detector tells apart with confidence
FINANCE_TEXT = "stock shares earnings dividend market quarterly profit"
GENERAL_TEXT = "hello weather garden poem recipe holiday"


def _detector() -> DomainDetector:
    examples = [(FINANCE_TEXT, FINANCE), (GENERAL_TEXT, GENERAL)] * 8
    detector = DomainDetector.fit(examples)
    assert detector.detect(FINANCE_TEXT).domain == FINANCE
    assert detector.detect(GENERAL_TEXT).domain == GENERAL
    return detector


@pytest.fixture
def router(tmp_path: Path) -> Router:
    """teacher (0.8 everywhere), `small` (0.79 everywhere: cheap and good enough for the
    0.9 relative floor, so chosen whenever it is a candidate), `big` (0.6: never)."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"classes": {"default": {"min_quality": 0.9}},
                                    "default_class": "default", "seed": 0}))  # fmt: skip
    names = {"teacher": 100, "big": 60, "small": 20}
    config = parse_config({"models": [
        {"name": n, "backend": "openai", "url": "http://x",
         "role": "teacher" if n == "teacher" else "student"} for n in names
    ], "adapt": {"rollout": {"shadow_share": 0.5}}})  # fmt: skip
    backends = {n: Idle(n, p * 1_000_000) for n, p in names.items()}
    r = Router(config, ModelStore(tmp_path / "store"), backends, Metrics(lambda: {}),
               PolicyFile.open(path))  # fmt: skip
    r.rng.seed(0)
    quality = {"teacher": 0.8, "big": 0.6, "small": 0.79}
    table = QualityTable(
        {(n, d): Quality(q, q, "measured") for n, q in quality.items() for d in (FINANCE, GENERAL)},
        {FINANCE: "teacher", GENERAL: "teacher"},
    )
    r.models = _Models({n: None for n in names}, {}, table, _detector(), 1.0)
    for n, p in names.items():
        r.estimates.prior(n, ttft_ms=p, per_token_ms=p / 10)
    return r


def rollout(student: str, stage: str, share: float = 0.0, domain: str = FINANCE) -> Rollout:
    return Rollout(student, domain, stage, share, 0.9, 0.0, 0)  # type: ignore[arg-type]


def _routes(router: Router, text: str, n: int) -> Counter[tuple[str, str | None]]:
    """(model, shadow) counts over n requests."""
    out: Counter[tuple[str, str | None]] = Counter()
    for _ in range(n):
        route = router.route(text, "auto", {}, None, 10)
        out[(route.model, route.shadow)] += 1
    return out


def test_without_rollouts_nothing_changes(router: Router) -> None:
    assert _routes(router, FINANCE_TEXT, 20) == {("small", None): 20}
    assert _routes(router, GENERAL_TEXT, 20) == {("small", None): 20}


@pytest.mark.parametrize("stage", ["shadow", "retired"])
def test_a_student_in_shadow_or_retired_is_never_a_candidate(router: Router, stage: str) -> None:
    router.rollouts = {"small": rollout("small", stage)}
    finance = _routes(router, FINANCE_TEXT, 400)
    assert {model for model, _ in finance} == {"teacher"}
    shadows = finance[("teacher", "small")]
    if stage == "shadow":  # the teacher answers, and the student shadows half of them
        assert 0.4 * 400 <= shadows <= 0.6 * 400
        assert set(finance) == {("teacher", "small"), ("teacher", None)}
    else:
        assert shadows == 0
    general = _routes(router, GENERAL_TEXT, 50)  # its domain is finance: no shadow here
    assert general == {("teacher", None): 50}


def test_a_canary_gets_its_share_of_its_own_domain_only(router: Router) -> None:
    router.rollouts = {"small": rollout("small", "canary", 0.1)}
    n = 3000
    finance = _routes(router, FINANCE_TEXT, n)
    assert 0.08 * n <= finance[("small", None)] <= 0.12 * n
    assert set(finance) == {("small", None), ("teacher", "small"), ("teacher", None)}
    # the teacher's answers on its domain keep being shadowed at shadow_share
    taught = finance[("teacher", "small")] + finance[("teacher", None)]
    assert 0.45 * taught <= finance[("teacher", "small")] <= 0.55 * taught
    assert _routes(router, GENERAL_TEXT, 100) == {("teacher", None): 100}
    router.rollouts = {"small": rollout("small", "canary", 0.5)}
    half = _routes(router, FINANCE_TEXT, n)[("small", None)]
    assert 0.46 * n <= half <= 0.54 * n


def test_a_live_student_is_a_normal_candidate(router: Router) -> None:
    router.rollouts = {"small": rollout("small", "live", 1.0)}
    assert _routes(router, FINANCE_TEXT, 20) == {("small", None): 20}
    assert _routes(router, GENERAL_TEXT, 20) == {("small", None): 20}


def test_a_rollout_of_another_model_leaves_the_others_alone(router: Router) -> None:
    router.rollouts = {"big": rollout("big", "shadow")}
    routes = _routes(router, FINANCE_TEXT, 50)  # small still chosen; no teacher, no shadow
    assert routes == {("small", None): 50}


def test_a_shadow_student_must_be_served(router: Router) -> None:
    router.rollouts = {"ghost": rollout("ghost", "shadow")}  # no backend: not loaded here
    assert _routes(router, FINANCE_TEXT, 20) == {("small", None): 20}
    router.rollouts = {"ghost": rollout("ghost", "shadow"), "small": rollout("small", "shadow")}
    routes = _routes(router, FINANCE_TEXT, 200)
    assert set(routes) == {("teacher", "small"), ("teacher", None)}  # never the ghost


def test_no_shadow_share_no_shadow(router: Router) -> None:
    router.config = router.config.model_copy(update={"adapt": parse_config({
        "models": [{"name": "x", "backend": "openai", "url": "http://x"}],
        "adapt": {"rollout": {"shadow_share": 0.0}}}).adapt})  # fmt: skip
    router.rollouts = {"small": rollout("small", "shadow")}
    assert _routes(router, FINANCE_TEXT, 50) == {("teacher", None): 50}


def test_gates_are_derived_once_per_rollouts_dict(router: Router) -> None:
    rollouts = {"small": rollout("small", "shadow")}
    router.rollouts = rollouts
    first = router._gates()
    assert router._gates() is first and first.closed == {"small"}
    assert first.shadows == {FINANCE: ("small",)}
    router.rollouts = {"small": rollout("small", "live", 1.0)}  # replaced wholesale
    assert router._gates() is not first and not router._gates().closed
    assert router.route(FINANCE_TEXT, "auto", {}, None, 10).model == "small"


# --- the reference on adapted domains -----------------------------------------------------


def _interval(value: float, half: float) -> Interval:
    return Interval(value=value, low=value - half, high=value + half)


def _teacher(name: str, in_domain: dict[str, float] | None = None) -> Manifest:
    score = {"n": 100, "accuracy": _interval(0.7, 0.05)}
    return Manifest(name=name, role="teacher", evaluation=Evaluation.model_validate({
        "general_knowledge": score,
        "in_domain": {d: {"n": 100, "accuracy": _interval(v, 0.05)}
                      for d, v in (in_domain or {}).items()},
    }))  # fmt: skip


def _adapted(name: str, task: str, teacher: str, agreement: float) -> Manifest:
    return Manifest(
        name=name, task=task, evaluation=Evaluation.model_validate(
            {"in_domain": {task: {"n": 300, "accuracy": _interval(agreement, 0.03)}}}),
        adaptation=Adaptation(fingerprint=task, job=1, teacher=teacher, base="smollm2",
                              target=0.9),
    )  # fmt: skip


def test_the_teacher_is_the_truth_on_its_adapted_students_domain() -> None:
    task = "fp-0123456789abcdef"
    manifests = {"teacher": _teacher("teacher"), "s": _adapted("s", task, "teacher", 0.95)}
    roles = {"teacher": "teacher", "s": "student"}
    table = build_table(manifests, roles, [task, GENERAL], None)
    assert table.point("teacher", task) == OWN_LABELS
    assert table.reference[task] == "teacher"
    student = table.point("s", task)
    assert table.get("s", task, relative=True) == pytest.approx(student.lower())
    assert 0.9 < student.lower() < 0.95  # the lower bound of its agreement
    # elsewhere nothing changes: general is the teacher's measured general knowledge
    assert table.point("teacher", GENERAL).value == pytest.approx(0.7)


def test_a_remote_teacher_is_the_truth_too_and_a_measured_one_keeps_its_figure() -> None:
    task = "fp-feed"
    roles = {"remote": "teacher", "s": "student"}
    table = build_table({"remote": None, "s": _adapted("s", task, "remote", 0.95)}, roles,
                        [task, GENERAL], None)  # fmt: skip
    assert table.point("remote", task) == OWN_LABELS
    assert table.get("remote", GENERAL, relative=False) == 0.0  # still unknown there
    measured = {"teacher": _teacher("teacher", {task: 0.8}),
                "s": _adapted("s", task, "teacher", 0.95)}  # fmt: skip
    table = build_table(measured, {"teacher": "teacher"}, [task, GENERAL], None)
    assert table.point("teacher", task).value == pytest.approx(0.8)


def test_only_a_served_teacher_named_by_an_adapted_student_is_set() -> None:
    task = "fp-beef"
    manifests = {
        "teacher": _teacher("teacher"),
        "plain": Manifest(name="plain", task=task, evaluation=Evaluation.model_validate(
            {"in_domain": {task: {"n": 10, "accuracy": _interval(0.9, 0.05)}}})),
        "s": _adapted("s", task, "elsewhere", 0.95),  # its teacher is not served here
    }  # fmt: skip
    roles = {"teacher": "teacher", "plain": "student", "s": "student"}
    table = build_table(manifests, roles, [task, GENERAL], None)
    assert table.point("teacher", task) != OWN_LABELS
    assert table.point("teacher", task).value == pytest.approx(0.7)  # its general score
