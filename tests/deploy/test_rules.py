"""The Prometheus rules in deploy/prometheus/: promtool accepts them and passes their unit
tests, every alert has a unit test, the dashboard's recording rules exist, and every metric
the rules read is one the gateway or the adapt process exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from gateway.adapt.process import AdaptMetrics
from gateway.metrics import Metrics
from tests.tools import require

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS / "rules.yml", PROMETHEUS / "alerts.yml"]
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))

# What deploy/grafana/distillgate.json reads (the shared contract): renaming one
# empties a panel.
DASHBOARD_RULES = {
    "model_outcome:distillgate_requests:rate5m",
    "model:distillgate_server_errors:ratio_rate5m",
    "model:distillgate_time_to_first_token_seconds:quantile_5m",
    "model:distillgate_request_duration_seconds:quantile_5m",
    "model:distillgate_route_latency_ratio:quantile_5m",
    "slo_class:distillgate_slo_attainment:ratio_rate5m",
    "model_slo_class_reason:distillgate_route_decisions:rate5m",
    "distillgate:route_cost_saved:ratio_rate5m",
    "model:distillgate_queue_saturation:ratio",
    "model:distillgate_batch_size:mean_5m",
    "domain:distillgate_domain_detections:rate5m",
}
ALERTS = {
    "DistillgateDown", "DistillgateAdaptDown", "DistillgateNoModelReady",
    "DistillgateModelNotReady", "DistillgateSLOAttainmentLow", "DistillgateErrorRatioHigh",
    "DistillgateQueueSaturated", "DistillgateTrafficLogDropping",
    "DistillgateAdaptationRollback",
}  # fmt: skip
# Series Prometheus makes itself rather than scraping them.
SYNTHETIC = {"up"}
# The sample names each metric type exposes (prometheus_client's families drop _total).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# A metric name not preceded by a colon: `model:distillgate_x:rate5m` is a rule's name.
METRIC = re.compile(r"(?<![\w:])distillgate_\w+")
RULE_NAME = re.compile(r"(?<![\w:])[a-z_]+:[\w:]+")


def promtool() -> str:
    return require(shutil.which("promtool"), "promtool", "apt-get install prometheus",
                   "test the Prometheus rules")  # fmt: skip


def run_promtool(*args: str) -> None:
    done = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def exported_names() -> set[str]:
    """Every sample name the gateway's and the adapt process's registries can expose,
    read from their metric families (series with labels exist only once used)."""
    names = set()
    for registry in (Metrics(dict).registry, AdaptMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def test_promtool_checks_the_rule_files() -> None:
    run_promtool("check", "rules", *(str(p.relative_to(PROMETHEUS)) for p in RULE_FILES))


def test_the_local_scrape_config_loads_the_rules_and_scrapes_both_jobs() -> None:
    """deploy/prometheus/prometheus.yml: the set-up without containers (README)."""
    run_promtool("check", "config", "prometheus.yml")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [p.name for p in RULE_FILES]
    jobs = {job["job_name"]: job["static_configs"][0]["targets"]
            for job in config["scrape_configs"]}  # fmt: skip
    assert jobs == {"distillgate": ["127.0.0.1:8000"], "distillgate-adapt": ["127.0.0.1:9100"]}


def test_promtool_unit_tests_pass() -> None:
    assert {p.name for p in TEST_FILES} >= {"alerts_test.yml", "rules_test.yml"}
    run_promtool("test", "rules", *(str(p.relative_to(PROMETHEUS)) for p in TEST_FILES))


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() -> None:
    defined = {rule["alert"] for rule in rules(PROMETHEUS / "alerts.yml")}
    assert defined == ALERTS
    cases = [
        case
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert defined - fires == set(), "alerts no unit test sees firing"
    assert defined - quiet == set(), "alerts no unit test sees staying quiet"


def test_the_dashboards_recording_rules_exist() -> None:
    recorded = {rule["record"] for rule in rules(PROMETHEUS / "rules.yml")}
    assert DASHBOARD_RULES - recorded == set()


def test_alerts_carry_severity_for_and_a_runbook() -> None:
    for rule in rules(PROMETHEUS / "alerts.yml"):
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert "for" in rule, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]


def test_rules_read_only_exported_metrics_and_defined_rules() -> None:
    exported = exported_names()
    # The contract's newest gateway metrics: without them the checks below prove little.
    assert {"distillgate_model_ready", "distillgate_queue_capacity"} <= exported
    recorded = {rule["record"] for rule in rules(PROMETHEUS / "rules.yml")}
    for path in RULE_FILES:
        for rule in rules(path):
            name, expr = rule.get("alert") or rule["record"], rule["expr"]
            used = set(METRIC.findall(expr)) | set(re.findall(r"\bup\b", expr))
            reads = set(RULE_NAME.findall(expr))
            assert used | reads, f"{name} reads no metric"
            assert used - exported - SYNTHETIC == set(), f"{name} reads unknown metrics"
            assert reads - recorded == set(), f"{name} reads unknown recording rules"
