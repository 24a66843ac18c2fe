"""The Grafana dashboard: deploy/grafana/distillgate.json is what dashboard.py builds, every
panel query reads metrics the gateway or the adapt process export or recording rules of
deploy/prometheus/rules.yml, and the panels the operators need are there. (That every
query returns data is tested against a real Prometheus: tests/integration/test_prometheus.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.test_rules import METRIC, RULE_NAME, SYNTHETIC, exported_names, rules

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads((GRAFANA / "distillgate.json").read_text())


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_the_json_is_what_the_generator_builds(tmp_path: Path) -> None:
    check = [sys.executable, "deploy/grafana/dashboard.py", "--check"]
    done = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stale = tmp_path / "stale.json"
    stale.write_text("{}")
    done = subprocess.run([*check, "--out", str(stale)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "stale" in done.stderr


def test_every_query_reads_exported_metrics_or_recording_rules(board: dict) -> None:
    exported = exported_names() | SYNTHETIC
    recorded = {rule["record"] for rule in rules(REPO / "deploy/prometheus/rules.yml")}
    unknown = {}
    for panel in panels(board):
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"])) - exported
            names |= set(RULE_NAME.findall(target["expr"])) - recorded
            if names:
                unknown[panel["title"]] = sorted(names)
    assert unknown == {}


def test_panels_cover_what_operators_watch(board: dict) -> None:
    titles = [p["title"] for p in panels(board)]
    assert len(titles) == len(set(titles))
    for panel in panels(board):
        assert panel["description"] and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["legendFormat"] and t["refId"] for t in panel["targets"])
    exprs = " ".join(t["expr"] for p in panels(board) for t in p["targets"])
    for needed in (  # the list, by the metric or rule each panel is built on
        "distillgate_requests", "distillgate_errors_total", "time_to_first_token",
        "request_duration", "distillgate_queue_depth", "batch_size", "route_decisions",
        "slo_attainment", "route_latency_ratio", "route_cost", "route_cost_saved",
        "domain_detections", "traffic_log_dropped", "shift_events", "adapt_stage",
        "adapt_agreement", "shadow_agreement", "adapt_transitions",
    ):  # fmt: skip
        assert needed in exprs, needed
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "slo_class"}
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"
    assert board["uid"] == "distillgate"
