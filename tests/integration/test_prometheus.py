"""The dashboard and the rules against a real Prometheus: the gateway (three tiny models and
an adapted student in shadow) and the adapt process run on loopback, the real `prometheus`
binary scrapes both every second with deploy/prometheus's rules loaded, the openai SDK
sends traffic through named models, `auto` classes, streams, bad requests and an
unservable class; then every panel's query of deploy/grafana/distillgate.json and every
recording rule must return data, and every rule group must be healthy. The same results
draw the dashboard's PNG preview (to DISTILLGATE_DASHBOARD_PNG when it is set)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from bench.dashboard.preview import (
    Series,
    Target,
    collect,
    draw,
    layout,
    legend,
    substitute,
    targets,
    value_text,
    variables,
)
from gateway.adapt.log import TrafficLog
from gateway.adapt.rollout import Rollout
from gateway.adapt.state import AdaptState
from models.store import Adaptation, Manifest, ModelStore
from models.tasks import get_task
from tests.prom import PromError, Prometheus, has_data, prometheus_server
from tests.servers import DISTILLGATE, Server, free_port, gateway

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "distillgate.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PNG_ENV = "DISTILLGATE_DASHBOARD_PNG"

TASK = "finance-headlines"
STUDENT = "tiny-adapted"
# role, compression ratio, in-domain accuracy, cost per 1k tokens; the teacher's 0.80
MODELS = {
    "tiny-teacher": ("teacher", None, 0.80, 0.10),
    "tiny-big": ("student", 0.6, 0.775, 0.05),
    "tiny-small": ("student", 0.3, 0.70, 0.02),
}
ROUNDS, ROUND_S = 20, 1.0  # traffic: a round of requests a second
ANSWER_S = 45  # after the traffic, for the last scrapes and rule evaluations


def _acc(value: float) -> dict:
    return {"n": 300, "accuracy": {"value": value, "low": value - 0.01, "high": value + 0.01}}


def _manifest(name: str, role: str, ratio: float | None, accuracy: float) -> Manifest:
    return Manifest(
        name=name, role=role, parent=None if role == "teacher" else "tiny-teacher", task=TASK,
        compression_ratio=ratio,
        evaluation={"in_domain": {TASK: _acc(accuracy)}, "general_knowledge": _acc(0.3)},
    )  # fmt: skip


def _store(root: Path, weights: Path) -> None:
    """The three configured models, and a student the adaptation loop would have made
    (served from the store by `students.from_store`, its rollout started in shadow)."""
    store = ModelStore(root)
    copy = lambda out: shutil.copytree(weights, out, dirs_exist_ok=True)  # noqa: E731
    for name, (role, ratio, accuracy, _) in MODELS.items():
        store.register(_manifest(name, role, ratio, accuracy), copy)
    adapted = _manifest(STUDENT, "student", 0.6, 0.775).model_copy(update={
        "adaptation": Adaptation(fingerprint="fp-prometheus", job=1, teacher="tiny-teacher",
                                 base="tiny-teacher", target=0.5),
    })  # fmt: skip
    store.register(adapted, copy)


def _start_rollout(db: Path) -> None:
    log = TrafficLog.open(f"sqlite:///{db}")
    try:
        AdaptState(log.engine).start_rollout(
            Rollout(STUDENT, TASK, "shadow", 0.0, 0.5, time.time(), 0, "registered")
        )
    finally:
        log.close()


def _config(tmp: Path, db: Path, adapt_port: int) -> dict:
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "classes": {
            "strict": {"min_quality": 0.99, "log_content": True},
            "balanced": {"min_quality": 0.9, "p95_latency_ms": 10_000, "log_content": True},
            "loose": {"min_quality": 0.5},
            # the teacher's absolute accuracy is 0.80: nothing serves it (503s)
            "impossible": {"min_quality": 0.99, "quality_basis": "absolute"},
        },
        "default_class": "balanced", "fallback": "reject", "exploration": 0.0,
        "costs": {**{n: cost for n, (*_, cost) in MODELS.items()}, STUDENT: 0.05},
    }))  # fmt: skip
    return {
        "models": [{"name": n, "backend": "local", "role": r, "max_batch_size": 4}
                   for n, (r, *_) in MODELS.items()],
        "routing": {"policy": str(policy)},
        "limits": {"max_tokens": 64, "default_max_tokens": 8},
        "traffic": {"dsn": f"sqlite:///{db}", "flush_interval_s": 0.1,
                    "audit": {"share": 1.0, "max_teacher_busy": 1.0}},
        "students": {"from_store": True},
        "threads": 1,
        # no new-traffic job: the test's student exists already, and distilling one here
        # would take minutes. It has the teacher's weights, so its shadow answers agree
        # and move it through canary to live within the traffic's 20 s (transitions).
        "adapt": {"interval_s": 1.0, "nice": 0, "metrics_port": adapt_port,
                  "detect": {"window": 500, "min_count": 500, "min_share": 1.0},
                  "rollout": {"min_pairs": 10, "step_pairs": 10, "shadow_share": 1.0,
                              "audit_share": 1.0}},
    }  # fmt: skip


@dataclass
class Stack:
    """The running Prometheus (gateway and adapt process behind it) after the traffic."""

    prometheus: Prometheus
    start: float  # when the traffic began
    statuses: list[int]

    def range_query(self) -> Callable[[str], list[dict]]:
        end = time.time()
        return lambda expr: self.prometheus.query_range(expr, self.start - 5, end, 1)


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus-test")
    db, adapt_port = tmp / "traffic.db", free_port()
    _store(tmp / "store", tiny_model_dir)
    _start_rollout(db)
    config = _config(tmp, db, adapt_port)
    (tmp / "adapt.yaml").write_text(yaml.safe_dump(config))
    with (
        _adapt(tmp, adapt_port) as adapt,  # starts while the gateway loads its models
        gateway(config, tmp, store=tmp / "store", timeout_s=180) as server,
    ):
        adapt.wait_ready(60)
        scrape = {"distillgate": server.url.removeprefix("http://"),
                  "distillgate-adapt": adapt.url.removeprefix("http://")}  # fmt: skip
        with prometheus_server(tmp, scrape, [RULES, ALERTS]) as prometheus:
            prometheus.wait_up(list(scrape))
            start = time.time()
            statuses = _traffic(server.url)
            yield Stack(prometheus, start, statuses)


@contextlib.contextmanager
def _adapt(tmp: Path, port: int) -> Iterator[Server]:
    """`distillgate adapt run` on the gateway's config and store, its metrics on `port`
    (its metrics server answers every path, /ready included)."""
    argv = [*DISTILLGATE, "adapt", "run", "--config", str(tmp / "adapt.yaml"), "--store",
            str(tmp / "store"), "--no-progress", "--metrics-port", str(port)]  # fmt: skip
    log = tmp / "adapt.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield server
    finally:
        server.stop()


# -- the traffic --------------------------------------------------------------------------

FINANCE = [e.prompt for e in get_task(TASK).examples("test", 8)]
GENERAL = ["What is the capital of France?", "Write a haiku about rain.",
           "How do I boil an egg?", "Name three primes."]  # fmt: skip


def _call(url: str, kind: str, i: int) -> int:
    """One request of kind `kind`; its HTTP status."""
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    finance, general = FINANCE[i % len(FINANCE)], GENERAL[i % len(GENERAL)]
    model, prompt, extra = {
        "auto": ("auto", finance, {}), "strict": ("auto:strict", finance, {}),
        "loose": ("auto:loose", finance, {}), "general": ("auto:balanced", general, {}),
        "impossible": ("auto:impossible", finance, {}), "unknown": ("auto:nope", finance, {}),
        "too_long": ("tiny-big", finance, {"max_tokens": 10_000}),
        "stream": (("tiny-small", "tiny-teacher", "auto")[i % 3], finance, {"stream": True}),
        "named": ("tiny-big", general, {}),
    }[kind]  # fmt: skip
    args: dict[str, Any] = {"max_tokens": 6, "temperature": 0, **extra}
    try:
        with sdk:
            if kind == "named" and i % 2:
                sdk.completions.create(model=model, prompt=prompt, **args)
                return 200
            answer = sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], **args
            )
            if args.get("stream"):  # read to the end: a stream closed early is `cancelled`
                assert any([chunk.choices for chunk in answer])
            return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def _round(i: int) -> list[str]:
    kinds = ["auto", "auto", "strict", "loose", "general", "stream", "named"]
    if i % 4 == 0:
        kinds += ["impossible", "unknown", "too_long"]
    return kinds


def _traffic(url: str) -> list[int]:
    """ROUNDS rounds a second apart, each sent concurrently (so batches form)."""
    statuses: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        for i in range(ROUNDS):
            began = time.monotonic()
            kinds = _round(i)
            statuses += pool.map(_call, [url] * len(kinds), kinds, [i] * len(kinds))
            time.sleep(max(0.0, ROUND_S - (time.monotonic() - began)))
    return statuses


# -- the checks ---------------------------------------------------------------------------


def _poll(check: Callable[[], list[str]], timeout_s: float = ANSWER_S) -> list[str]:
    """Run `check` (-> what is still missing) until nothing is, or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = check()
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.mark.slow
def test_the_traffic_reached_every_outcome(stack: Stack) -> None:
    codes = set(stack.statuses)
    assert {200, 400, 503} <= codes, sorted(codes)
    assert stack.statuses.count(200) >= ROUNDS * 6


@pytest.mark.slow
def test_every_dashboard_query_returns_data(stack: Stack, tmp_path: Path) -> None:
    dashboard = _dashboard()
    queries = targets(dashboard)
    assert len(queries) >= 10, "the dashboard has hardly any queries"
    results: dict[str, list[Series]] = {}

    def missing() -> list[str]:
        results.clear()
        results.update(collect(dashboard, stack.range_query()))
        return [
            f"panel {q.panel!r} target {q.ref_id}: {substitute(q.expr, variables(dashboard))}"
            for q in queries
            if not any(s.has_data() for s in results[q.panel] if s.ref_id == q.ref_id)
        ]

    empty = _poll(missing)
    assert not empty, "queries that return no data:\n" + "\n".join(empty)
    draw(dashboard, results, tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get(PNG_ENV):
        draw(dashboard, results, Path(os.environ[PNG_ENV]))


def _recording_rules() -> list[tuple[str, dict[str, str]]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r["record"], r.get("labels", {})) for g in groups for r in g["rules"]
            if "record" in r]  # fmt: skip


@pytest.mark.slow
def test_every_recording_rule_returns_data(stack: Stack) -> None:
    rules = _recording_rules()
    assert rules, f"no recording rules in {RULES}"

    def missing() -> list[str]:
        out = []
        for record, labels in rules:
            selector = record + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
            if not has_data(stack.prometheus.query(selector)):
                out.append(selector)
        return out

    empty = _poll(missing)
    assert not empty, "recording rules with no data:\n" + "\n".join(empty)


@pytest.mark.slow
def test_every_rule_group_loads_and_is_healthy(stack: Stack) -> None:
    files = {str(RULES), str(ALERTS)}
    expected = {g["name"] for f in files for g in yaml.safe_load(Path(f).read_text())["groups"]}

    def unhealthy() -> list[str]:
        groups = stack.prometheus.rule_groups()
        out = sorted(expected - {g["name"] for g in groups})
        out += [f"{g['name']}/{r['name']}: {r['health']} {r.get('lastError', '')}"
                for g in groups for r in g["rules"] if r["health"] != "ok"]  # fmt: skip
        return out

    bad = _poll(unhealthy, timeout_s=15)
    assert not bad, "rules not loaded or not healthy:\n" + "\n".join(bad)


# -- the preview's own parts, without servers ---------------------------------------------


def test_variables_are_filled_as_all_would_fill_them() -> None:
    dashboard = {"templating": {"list": [
        {"name": "model", "type": "query"},
        {"name": "slo_class", "type": "custom", "allValue": ".+"},
        {"name": "datasource", "type": "datasource"},
    ]}}  # fmt: skip
    values = variables(dashboard)
    expr = 'rate(x{model=~"$model",c=~"${slo_class}",d=~"[[model]]"}[$__rate_interval])'
    assert substitute(expr, values) == 'rate(x{model=~".*",c=~".+",d=~".*"}[1m])'
    assert substitute("sum(increase(y[$__range]))", values) == "sum(increase(y[5m]))"
    with pytest.raises(ValueError, match=r"unknown variable \$nope"):
        substitute('x{a="$nope"}', values)


def test_collapsed_rows_are_laid_out_expanded() -> None:
    def panel(title: str, y: int, h: int = 8, **extra) -> dict:
        return {"title": title, "type": "timeseries", "gridPos": {"x": 0, "y": y, "w": 24,
                "h": h}, **extra}  # fmt: skip

    dashboard = {"panels": [
        panel("a", 0),
        {"title": "row", "type": "row", "collapsed": True, "gridPos": {"y": 8, "h": 1, "w": 24},
         "panels": [panel("b", 20, targets=[{"refId": "A", "expr": "up"}]), panel("c", 28, h=4)]},
        panel("d", 9),
    ]}  # fmt: skip
    placed = {p.panel["title"]: p.y for p in layout(dashboard)}
    assert placed == {"a": 0, "row": 8, "b": 9, "c": 17, "d": 21}
    assert targets(dashboard) == [Target("b", "A", "up", "")]


def test_a_failing_query_names_its_panel() -> None:
    target = {"refId": "B", "expr": "x[$__range]"}
    dashboard = {"panels": [{"title": "Latency", "targets": [target]}]}

    def query(expr: str) -> list[dict]:
        raise PromError("bad_data: parse error")

    with pytest.raises(PromError) as info:
        collect(dashboard, query)
    assert info.value.__notes__ == ["panel 'Latency', target B: x[5m]"]


def test_an_instant_target_keeps_what_is_there_at_the_end() -> None:
    target = {"refId": "A", "expr": "stage == 1", "instant": True}
    dashboard = {"panels": [{"title": "Stage", "type": "stat", "targets": [target]}]}
    matrix = [{"metric": {"stage": "shadow"}, "values": [[1, "1"], [2, "1"]]},
              {"metric": {"stage": "live"}, "values": [[3, "1"], [4, "1"]]}]  # fmt: skip
    (series,) = collect(dashboard, lambda expr: matrix)["Stage"]
    assert series.labels == {"stage": "live"} and series.points == ((4.0, 1.0),)


def test_draw_writes_a_png(tmp_path: Path) -> None:
    def panel(title: str, kind: str, x: int, unit: str = "") -> dict:
        return {"title": title, "type": kind, "gridPos": {"x": x, "y": 1, "w": 6, "h": 6},
                "fieldConfig": {"defaults": {"unit": unit}},
                "targets": [{"refId": "A", "expr": "x", "legendFormat": "{{model}}"}]}  # fmt: skip

    dashboard = {"title": "t", "panels": [
        {"title": "row", "type": "row", "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}},
        panel("lines", "timeseries", 0, "s"), panel("stat", "stat", 6, "percentunit"),
        panel("bars", "bargauge", 12, "reqps"), panel("empty", "timeseries", 18),
    ]}  # fmt: skip
    now = time.time()
    series = [Series("A", {"model": m}, tuple((now + t, t * k) for t in range(10)))
              for k, m in enumerate(("a", "b"), 1)]  # fmt: skip
    results = {"lines": series, "stat": series, "bars": series, "empty": []}
    draw(dashboard, results, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert value_text(0.953, "percentunit") == "95.3%" and value_text(0.02, "s") == "20 ms"
    assert legend("{{model}} p{{quantile}}", {"model": "m", "quantile": "0.95"}) == "m p0.95"
