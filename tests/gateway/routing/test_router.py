"""The router without a server: which class a request gets (header, then `auto:<class>`,
then API key, then default), a rejection's 503 naming the constraint, and what an answered
request teaches it (latency estimates, SLO attainment, cost saved)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

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
        router.observe(route, "success", ttft_s=0.001, duration_s=0.002, tokens=3)
    after = router.estimates.latency("big", Load(), 1, 10).latency_ms
    assert after < before  # observed faster than its prior
    router.observe(route, "client_error", None, 0.1, 0)  # failures teach nothing
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
