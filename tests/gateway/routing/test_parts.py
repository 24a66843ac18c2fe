"""The router's parts on their own: the policy file (validation and reload), domain
detection (held-out accuracy on the tasks' test splits), quality prediction from the law
and measurements, and latency and cost estimates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.routing.domains import GENERAL, fit_for
from gateway.routing.estimates import Estimates, cost_per_1k
from gateway.routing.policy import PolicyError, PolicyFile, load_policy
from gateway.routing.quality import build_table, predict_quality, z_for
from models.backends.base import Load
from models.store import Manifest

POLICY = """
classes:
  interactive: {min_quality: 0.95, p95_ttft_ms: 300}
  batch: {min_quality: 0.9, max_cost_per_1k_tokens: 0.02}
default_class: interactive
api_keys: {team-a: {class: batch}}
"""


def test_shipped_policy_loads() -> None:
    policy = load_policy(Path("deploy/policy.yaml"))
    assert policy.default_class in policy.classes and policy.fallback == "teacher"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("classes: {}\ndefault_class: a", "classes: Dictionary should have at least 1 item"),
        ("classes: {a: {}}\ndefault_class: b", "default_class 'b' is not one of the classes"),
        ("classes: {a: {min_quality: 2}}\ndefault_class: a", "classes.a.min_quality"),
        ("classes: {a: {}}\ndefault_class: a\napi_keys: {k: {class: z}}", "k -> 'z'"),
        ("classes: {a: {}}\ndefault_class: a\nfallback: maybe", "fallback"),
        ("classes: {a: {p95_ttft_ms: -1}}\ndefault_class: a", "p95_ttft_ms"),
        ("classes: {a: {}}\ndefault_class: a\ncolour: red", "colour: Extra inputs"),
        ("- a list", "top level must be a mapping"),
    ],
)
def test_bad_policies_are_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=r"policy\.yaml") as info:
        load_policy(path)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_policy_file_reloads_and_keeps_the_old_policy_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    watched = PolicyFile.open(path)
    assert not watched.refresh()  # unchanged
    path.write_text(POLICY.replace("0.95", "0.97"))
    os.utime(path, ns=(1, 10**18))  # a new mtime even on a coarse clock
    assert watched.refresh() and watched.policy.classes["interactive"].min_quality == 0.97
    old = watched.policy
    path.write_text("classes: [broken")
    os.utime(path, ns=(1, 2 * 10**18))
    assert not watched.refresh()
    assert watched.policy is old and "not valid YAML" in (watched.error or "")


@pytest.mark.slow
def test_domain_detection_on_held_out_prompts() -> None:
    detector, accuracy = fit_for(["finance-headlines"])
    assert detector.domains == ("finance-headlines", GENERAL)
    assert accuracy >= 0.95  # finance test prompts vs general knowledge and support tickets
    assert detector.detect("").domain in detector.domains  # no crash on empty text
    both, accuracy = fit_for(["finance-headlines", "support-tickets"])
    assert len(both.domains) == 3 and accuracy >= 0.95


def _student(**evaluation) -> Manifest:
    return Manifest(
        name="s", role="student", parent="T", task="finance-headlines", compression_ratio=0.5,
        examples=1000, supervision="logits", method="full", evaluation=evaluation,
    )  # fmt: skip


@pytest.mark.slow
def test_quality_combines_law_and_measurement(synthetic_law: Path) -> None:
    from law.predict import load_law

    law = load_law(synthetic_law)
    measured = {"value": 0.70, "low": 0.65, "high": 0.75}
    only_law = predict_quality(_student(), "finance-headlines", law)
    assert only_law.source == "law" and only_law.low < only_law.value
    only_measured = predict_quality(_student(in_domain={"finance-headlines": {"n": 300,
                                    "accuracy": measured}}), "finance-headlines", None)  # fmt: skip
    assert only_measured.source == "measured" and abs(only_measured.value - 0.70) < 1e-9
    assert abs(only_measured.low - 0.65) < 1e-3  # the measured interval's lower end
    both = predict_quality(_student(in_domain={"finance-headlines": {"n": 300,
                           "accuracy": measured}}), "finance-headlines", law)  # fmt: skip
    assert both.source == "law+measured"
    assert min(only_law.value, 0.7) <= both.value <= max(only_law.value, 0.7)
    assert both.low > min(only_law.low, only_measured.low)  # two sources: a tighter interval
    general = predict_quality(_student(general_knowledge={"n": 200, "accuracy": {"value": 0.3,
                              "low": 0.25, "high": 0.35}}), GENERAL, None)  # fmt: skip
    assert general.value == 0.3
    other_teacher = _student().model_copy(update={"parent": "someone-else"})
    assert predict_quality(other_teacher, "finance-headlines", law).source == "unknown"


def test_relative_quality_uses_the_best_teacher() -> None:
    acc = lambda v: {"n": 300, "accuracy": {"value": v, "low": v - 0.05, "high": v + 0.05}}  # noqa: E731
    teacher = Manifest(name="T", role="teacher", evaluation={"in_domain": {"finance-headlines":
                       acc(0.8)}, "general_knowledge": acc(0.6)})  # fmt: skip
    student = _student(in_domain={"finance-headlines": acc(0.76)}, general_knowledge=acc(0.3))
    table = build_table({"T": teacher, "s": student, "remote": None},
                        {"T": "teacher", "s": "student", "remote": "student"},
                        ["finance-headlines", GENERAL], None)  # fmt: skip
    assert table.reference == {"finance-headlines": "T", GENERAL: "T"}
    assert table.get("T", "finance-headlines", relative=True) == 1.0
    assert table.get("s", "finance-headlines", relative=True) == pytest.approx(0.71 / 0.8, 1e-3)
    assert table.get("s", GENERAL, relative=True) == pytest.approx(0.25 / 0.6, 1e-3)
    assert table.get("s", "finance-headlines", relative=False) == pytest.approx(0.71, 1e-3)
    assert table.get("remote", GENERAL, relative=True) == 0.0  # unknown: never trusted
    point, z80 = z_for(0), z_for(0.8)  # the point estimate; the 80% interval's lower end
    assert table.get("s", "finance-headlines", True, point) == pytest.approx(0.76 / 0.8, 1e-3)
    assert 0.71 / 0.8 < table.get("s", "finance-headlines", True, z80) < 0.76 / 0.8
    assert table.get("remote", GENERAL, True, point) == 0.0


def test_latency_estimates_start_from_priors_and_learn() -> None:
    est = Estimates(window=50)
    assert est.latency("cold", Load(), 1, 10).latency_ms == float("inf")  # unknown
    est.prior("m", ttft_ms=100, per_token_ms=10)
    assert est.latency("m", Load(), 1, 11).latency_ms == pytest.approx(200)
    assert est.expected_tokens("finance", 256) == 256  # nothing observed yet
    for _ in range(20):
        est.observe("m", "finance", ttft_s=0.05, duration_s=0.05 + 4 * 0.02, completion_tokens=5)
    assert est.expected_tokens("finance", 256) == 5 and est.expected_tokens("finance", 3) == 3
    idle = est.latency("m", Load(), 4, 5)
    assert idle.ttft_ms == pytest.approx(50) and idle.latency_ms == pytest.approx(130)
    busy = est.latency("m", Load(waiting=6, running=4), 4, 5)
    assert busy.ttft_ms == pytest.approx(50 + 2 * 130)  # two batches ahead of it


def test_cost_from_table_or_parameters() -> None:
    assert cost_per_1k("s", {"s": 0.01}, 0.1, 50, 100) == 0.01
    assert cost_per_1k("t", {}, 0.1, 50, 100) == pytest.approx(0.05)
    assert cost_per_1k("u", {}, 0.1, None, 100) == 0.1
