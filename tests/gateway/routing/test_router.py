"""The router without a server: which class a request gets (header, then `auto:<class>`,
then API key, then default), a rejection's 503 naming the constraint, and what an answered
request teaches it (latency estimates, SLO attainment, cost saved), and a manifest that goes
bad under a running router (the last good state kept, one log line, counted, recovered)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from gateway.api.tracking import Ending
from gateway.config import parse_config
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.metrics import Metrics
from gateway.routing.domains import GENERAL, DomainDetector
from gateway.routing.policy import PolicyFile
from gateway.routing.quality import Quality, QualityTable
from gateway.routing.router import Router, _Models, api_key_of
from models.backends.base import Load, ModelCard
from models.store import ModelStore


class Idle:
    """A served model as routing sees it (nothing is generated)."""

    def __init__(self, name: str, parameters: int) -> None:
        self._card = ModelCard(name, "openai", parameters=parameters)

    def card(self) -> ModelCard:
        return self._card

    def load(self) -> Load:
        return Load()


POLICY = {
    "classes": {
        "default": {"min_quality": 0.9},
        "keyed": {"min_quality": 0.5},
        "strict": {"min_quality": 0.99, "p95_latency_ms": 150},
        "trusting": {"min_quality": 0.9, "quality_interval": 0},
    },
    "default_class": "default",
    "api_keys": {"k1": {"class": "keyed"}},
    "fallback": "reject",
}


@pytest.fixture
def router(tmp_path: Path) -> Router:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    names = {"teacher": 100, "big": 60, "small": 20}
    config = parse_config({"models": [
        {"name": n, "backend": "openai", "url": "http://x", "role": "teacher" if n == "teacher"
         else "student"} for n in names]})  # fmt: skip
    backends = {n: Idle(n, p * 1_000_000) for n, p in names.items()}
    r = Router(config, ModelStore(tmp_path / "store"), backends, Metrics(lambda: {}),
               PolicyFile.open(path))  # fmt: skip
    quality = {"teacher": 0.8, "big": 0.78, "small": 0.6}
    table = QualityTable(
        {(n, GENERAL): Quality(q, q, "measured") for n, q in quality.items()}, {GENERAL: "teacher"}
    )
    r.models = _Models({n: None for n in names}, {}, table, DomainDetector.fit([]), 1.0)
    for n, p in names.items():
        r.estimates.prior(n, ttft_ms=p, per_token_ms=p / 10)
    return r


def _route(router: Router, model: str = "auto", headers: dict | None = None, key=None):
    return router.route("hello", model, headers or {}, key, 10)


def test_class_precedence(router: Router) -> None:
    assert _route(router).slo_class == "default"
    assert _route(router, key="k1").slo_class == "keyed"
    loose = {"x-distillgate-max-latency-ms": "5000"}
    assert _route(router, "auto:strict", loose, key="k1").slo_class == "strict"
    header = _route(router, "auto:strict", {"x-distillgate-slo": "keyed"}, "k1")
    assert header.slo_class == "keyed" and header.model == "small"
    assert _route(router).model == "big"  # 0.78 / 0.8 = 0.975 >= 0.9, cheaper than teacher
    assert api_key_of("Bearer k1") == "k1" and api_key_of("Basic abc") is None
    with pytest.raises(InvalidRequest, match="Unknown SLO class 'nope'"):
        _route(router, "auto:nope")


def test_rejection_names_the_constraint(router: Router) -> None:
    with pytest.raises(ServiceUnavailable) as info:
        _route(router, "auto:strict")  # only the teacher meets 0.99; it is too slow for 150 ms
    assert "SLO class 'strict'" in str(info.value) and "p95_latency_ms 150" in str(info.value)
    loose = _route(router, "auto:strict", {"x-distillgate-max-latency-ms": "5000"})
    assert loose.model == "teacher"


def test_observations_feed_estimates_and_metrics(router: Router) -> None:
    route = _route(router)
    before = router.estimates.latency("big", Load(), 1, 10).latency_ms
    for _ in range(5):
        router.observe(route, Ending("success", 200, 0.001, 0.002, 0, 3, 3, None))
    after = router.estimates.latency("big", Load(), 1, 10).latency_ms
    assert after < before  # observed faster than its prior
    router.observe(route, Ending("client_error", 400, None, 0.1, 0, 0, 0, None))  # teaches nothing
    text = generate_latest(router.metrics.registry).decode()
    assert 'distillgate_slo_requests_total{outcome="met",slo_class="default"} 5.0' in text
    saved = route.teacher_cost - route.cost
    assert saved > 0
    value = re.search(r"^distillgate_route_cost_saved_total (\S+)$", text, re.M)
    assert value and float(value.group(1)) == pytest.approx(5 * saved)


def test_the_class_sets_how_conservative_quality_is(router: Router) -> None:
    """`big` predicted 0.78 with a 95% interval down to 0.70: 0.70 / 0.8 = 0.875 misses 0.9,
    while its point estimate 0.78 / 0.8 = 0.975 meets it."""
    models = router.models
    table = QualityTable({**models.table.absolute, ("big", GENERAL): Quality(0.78, 0.70, "law")},
                         models.table.reference)  # fmt: skip
    router.models = _Models(models.manifests, models.stamps, table, models.detector, 1.0)
    assert _route(router).model == "teacher"  # the default class: the 95% lower end
    assert _route(router, "auto:trusting").model == "big"


# -- manifests that go bad while the gateway runs -----------------------------------------


def _manifest(path: Path, general: object, tick: int, **fields) -> None:
    """Write a student's manifest as the registry does, with a new mtime (`tick`) that a
    coarse clock cannot merge with the previous write."""
    accuracy = {"value": general, "low": 0.6, "high": 0.8}
    evaluation = {"general_knowledge": {"n": 200, "accuracy": accuracy, "chance": 0.25}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": path.parent.name, "role": "student",
                                "evaluation": evaluation, **fields}))  # fmt: skip
    os.utime(path, ns=(1, tick * 10**18))


@pytest.fixture
def served(tmp_path: Path) -> Router:
    """A router over two local models of a store (none loaded: routing reads manifests)."""
    store = ModelStore(tmp_path / "store")
    config = parse_config({"models": [{"name": "teacher", "backend": "local", "role": "teacher"},
                                      {"name": "student", "backend": "local"}]})  # fmt: skip
    _manifest(store.path_for("student") / "distillgate.json", 0.7, tick=1)
    backends = {"teacher": Idle("teacher", 100), "student": Idle("student", 20)}
    return Router.build(config, store, backends, Metrics(lambda: {}))


def _general(router: Router, model: str) -> float:
    return router.models.table.point(model, GENERAL).value


def _errors(router: Router) -> float | None:
    return router.metrics.registry.get_sample_value(
        "distillgate_registry_errors_total", {"model": "student"}
    )


def test_a_malformed_manifest_keeps_the_last_good_state_until_fixed(
    served: Router, caplog: pytest.LogCaptureFixture
) -> None:
    path = served.store.path_for("student") / "distillgate.json"
    assert _general(served, "student") == pytest.approx(0.7)
    assert _errors(served) == 0.0
    _manifest(path, "n/a", tick=2)  # a string where a number belongs
    with caplog.at_level(logging.INFO, logger="distillgate"):
        for _ in range(3):  # the gateway refreshes every second
            served.refresh()
        # another model's manifest changes: every manifest is reread, the bad one still bad
        _manifest(served.store.path_for("teacher") / "distillgate.json", 0.75, tick=3,
                  role="teacher")  # fmt: skip
        served.refresh()
    assert _general(served, "teacher") == pytest.approx(0.75)  # reloaded
    assert _general(served, "student") == pytest.approx(0.7)  # the last good one
    assert served.route("hello", "auto", {}, None, 10).model in ("teacher", "student")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and _errors(served) == 1.0
    assert str(path) in errors[0] and "evaluation.general_knowledge.accuracy.value" in errors[0]
    assert "'n/a'" in errors[0]
    _manifest(path, 0.5, tick=4, evaluation=None)  # another bad version: `evaluation: null`
    served.refresh()
    assert _errors(served) == 2.0 and _general(served, "student") == pytest.approx(0.7)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distillgate"):
        _manifest(path, 0.8, tick=5)  # fixed
        served.refresh()
    assert _general(served, "student") == pytest.approx(0.8)
    assert any("valid again" in r.getMessage() for r in caplog.records)
    assert _errors(served) == 2.0


def test_a_student_whose_task_cannot_load_is_a_bad_manifest(
    served: Router, caplog: pytest.LogCaptureFixture
) -> None:
    """Routing fits its domain detector on the students' tasks: a task no one can load is
    that manifest's problem, not a reason to stop reloading every model."""
    path = served.store.path_for("student") / "distillgate.json"
    _manifest(path, 0.9, tick=2, task="no-such-task")
    with caplog.at_level(logging.ERROR, logger="distillgate"):
        served.refresh()
        served.refresh()
    [record] = caplog.records
    assert "unknown task 'no-such-task'" in record.getMessage() and str(path) in record.getMessage()
    assert _general(served, "student") == pytest.approx(0.7) and _errors(served) == 1.0
    _manifest(path, 0.9, tick=3)
    served.refresh()
    assert _general(served, "student") == pytest.approx(0.9)
