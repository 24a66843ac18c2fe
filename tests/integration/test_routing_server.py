"""`model: "auto"` through the real gateway process and the openai SDK, with three tiny
random-weight models registered in a store with evaluations: the routed model changes
when the SLO changes (class in the model name, header, API key), bad overrides are 400s
naming the header, the policy reloads while requests are in flight, a bad edit keeps the
old policy, and the decisions show in the metrics."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from models.store import Manifest, ModelStore
from models.tasks import get_task
from tests.servers import Server, gateway

pytestmark = pytest.mark.slow

TASK = "finance-headlines"


def _acc(value: float) -> dict:
    return {"n": 300, "accuracy": {"value": value, "low": value - 0.01, "high": value + 0.01}}


# in-domain accuracy: teacher 0.80; "big" keeps ~0.96 of it, "small" ~0.86
MODELS = {
    "tiny-teacher": ("teacher", None, 0.80, 0.10),
    "tiny-big": ("student", 0.6, 0.775, 0.05),
    "tiny-small": ("student", 0.3, 0.70, 0.02),
}


def _policy(default: str = "balanced", **extra) -> dict:
    return {
        "classes": {
            "strict": {"min_quality": 0.99},
            "balanced": {"min_quality": 0.9},
            "loose": {"min_quality": 0.5},
        },
        "default_class": default,
        "api_keys": {"team-cheap": {"class": "loose"}},
        "fallback": "teacher",
        "exploration": 0.0,
        "costs": {name: cost for name, (_, _, _, cost) in MODELS.items()},
        **extra,
    }


@pytest.fixture(scope="module")
def routed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("routing")
    store = ModelStore(tmp / "store")
    for name, (role, ratio, accuracy, _) in MODELS.items():
        manifest = Manifest(
            name=name, role=role, parent=None if role == "teacher" else "tiny-teacher",
            task=TASK, compression_ratio=ratio,
            evaluation={"in_domain": {TASK: _acc(accuracy)}, "general_knowledge": _acc(0.3)},
        )  # fmt: skip
        store.register(manifest, lambda out: shutil.copytree(tiny_model_dir, out,
                                                             dirs_exist_ok=True))  # fmt: skip
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(_policy()))
    models = [{"name": n, "backend": "local", "role": r, "max_batch_size": 4}
              for n, (r, *_) in MODELS.items()]  # fmt: skip
    config = {
        "models": models,
        "routing": {"policy": str(policy)},
        "limits": {"max_tokens": 64, "default_max_tokens": 8},
    }
    with gateway(config, tmp, store=tmp / "store", timeout_s=180) as server:
        yield server, policy


PROMPT = get_task(TASK).examples("test", 1)[0].prompt


def _ask(sdk: openai.OpenAI, model: str = "auto", **kw):
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
        temperature=0, **kw,
    )  # fmt: skip
    return raw.headers, raw.parse()


def _sdk(server: Server, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_the_routed_model_follows_the_slo(routed) -> None:
    server, _ = routed
    with _sdk(server) as sdk:
        for model, expected in (("auto", "tiny-big"), ("auto:strict", "tiny-teacher"),
                                ("auto:loose", "tiny-small")):  # fmt: skip
            headers, body = _ask(sdk, model)
            assert headers["x-distillgate-model"] == body.model == expected, model
            assert headers["x-distillgate-domain"] == TASK
            assert headers["x-distillgate-route-reason"] == "cheapest_feasible"
        headers, body = _ask(sdk, extra_headers={"x-distillgate-slo": "strict"})
        assert body.model == "tiny-teacher" and headers["x-distillgate-class"] == "strict"
        headers, body = _ask(sdk, extra_headers={"x-distillgate-min-quality": "0.6"})
        assert body.model == "tiny-small"
        assert float(headers["x-distillgate-predicted-quality"]) > 0.6
        headers, body = _ask(sdk, "tiny-big")  # a concrete name bypasses routing
        assert body.model == "tiny-big" and "x-distillgate-route-reason" not in headers
    with _sdk(server, key="team-cheap") as sdk:
        assert _ask(sdk)[1].model == "tiny-small"  # the key's class
    ids = [m.id for m in _sdk(server).models.list().data]
    assert {"auto", "auto:strict", "auto:balanced", "auto:loose"} <= set(ids)


@pytest.mark.parametrize(
    ("model", "headers", "param"),
    [
        ("auto:nope", {}, "model"),
        ("auto", {"x-distillgate-slo": "nope"}, "x-distillgate-slo"),
        ("auto", {"x-distillgate-min-quality": "high"}, "x-distillgate-min-quality"),
        ("auto", {"x-distillgate-min-quality": "1.5"}, "x-distillgate-min-quality"),
        ("auto", {"x-distillgate-max-latency-ms": "-3"}, "x-distillgate-max-latency-ms"),
    ],
)
def test_bad_overrides_are_400_naming_them(routed, model: str, headers: dict, param: str) -> None:
    server, _ = routed
    with _sdk(server) as sdk, pytest.raises(openai.BadRequestError) as info:
        _ask(sdk, model, extra_headers=headers)
    assert info.value.body["param"] == param


def test_policy_reloads_under_load_and_a_bad_edit_keeps_the_old(routed) -> None:
    server, policy = routed

    def call(i: int) -> str:
        with _sdk(server) as sdk:
            raw = sdk.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=48,
                temperature=1.0, seed=i,
            )  # fmt: skip
            return raw.parse().model

    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(call, i) for i in range(6)]
        time.sleep(0.2)
        policy.write_text(yaml.safe_dump(_policy(default="strict")))
        answered = [f.result(timeout=120) for f in running]
    assert len(answered) == 6  # none dropped by the reload
    _wait_for(server, "tiny-teacher")
    policy.write_text("classes: [this is not a policy")
    os.utime(policy, ns=(1, time.time_ns() + 10**9))
    time.sleep(2.5)
    with _sdk(server) as sdk:
        assert _ask(sdk)[1].model == "tiny-teacher"  # still the strict default
    assert "policy not reloaded" in server.output()
    policy.write_text(yaml.safe_dump(_policy()))
    _wait_for(server, "tiny-big")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert (
        'distillgate_route_decisions_total{model="tiny-small",reason="cheapest_feasible"'
        ',slo_class="loose"}' in metrics
    )
    assert 'distillgate_domain_detections_total{domain="finance-headlines"}' in metrics
    assert "distillgate_route_cost_saved_total" in metrics
    assert 'distillgate_slo_requests_total{outcome="met",slo_class="balanced"}' in metrics


def _wait_for(server: Server, model: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with _sdk(server) as sdk:
        while time.monotonic() < deadline:
            if _ask(sdk)[1].model == model:
                return
            time.sleep(0.3)
    raise AssertionError(f"auto never went to {model} after the policy changed")
