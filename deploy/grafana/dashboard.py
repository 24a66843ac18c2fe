"""The Grafana dashboard as code: `python deploy/grafana/dashboard.py` writes
deploy/grafana/distillgate.json, `--check` fails when the file differs from what this
builds. Every query uses metrics the gateway or the adapt process export, or a recording
rule of deploy/prometheus/rules.yml; tests/integration/test_prometheus.py runs each one
against a real Prometheus and fails on a query that returns nothing."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueTextMode,
    GraphThresholdsStyleMode,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
)

OUT = Path("deploy/grafana/distillgate.json")  # relative to the repo root, where it runs
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
M, C = 'model=~"$model"', 'slo_class=~"$slo_class"'  # the template variables' filters


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    instant: bool = False  # the value now, not a range (a stage a student has left is 0)


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 8
    stacked: bool = False
    threshold: float | None = None  # a dashed line users read the series against


def q(expr: str, legend: str, instant: bool = False) -> Query:
    return Query(expr, legend, instant)


# fmt: off
ROWS: dict[str, tuple[Panel, ...]] = {
    "Requests": (
        Panel("Requests by model and outcome", "Answered requests per second, by the model "
              "that answered and the outcome (success, client_error, server_error, cancelled).",
              (q(f"sum by (model, outcome) (model_outcome:distillgate_requests:rate5m{{{M}}})",
                 "{{model}} {{outcome}}"),), unit="reqps", stacked=True),
        Panel("Errors by model and type", "Error responses per second by OpenAI error type; "
              "an empty model is a request that never reached one (bad input, unknown model).",
              (q(f"sum by (model, type) (rate(distillgate_errors_total{{{M}}}[$__rate_interval]))",
                 "{{model}} {{type}}"),), unit="reqps"),
        Panel("Server error ratio", "Share of a model's requests that ended in a server error "
              "(alert DistillgateErrorRatioHigh above 5%).",
              (q(f"model:distillgate_server_errors:ratio_rate5m{{{M}}}", "{{model}}"),),
              unit="percentunit", threshold=0.05),
    ),
    "Latency": (
        Panel("Time to first token", "p50, p95 and p99 over 5 minutes, by model.",
              (q(f"model:distillgate_time_to_first_token_seconds:quantile_5m{{{M}}}",
                 "{{model}} p{{quantile}}"),), unit="s"),
        Panel("Request latency", "End-to-end latency p50, p95 and p99 over 5 minutes, by model.",
              (q(f"model:distillgate_request_duration_seconds:quantile_5m{{{M}}}",
                 "{{model}} p{{quantile}}"),), unit="s"),
        Panel("Observed over predicted latency", "Routed requests' observed latency divided "
              "by the router's prediction (1 = on the estimate), p50 and p95 by model.",
              (q(f"model:distillgate_route_latency_ratio:quantile_5m{{{M}}}",
                 "{{model}} p{{quantile}}"),), threshold=1.0),
    ),
    "Load": (
        Panel("Queue depth and running", "Requests waiting for a backend slot and running "
              "now, by model.",
              (q(f"sum by (model) (distillgate_queue_depth{{{M}}})", "{{model}} waiting"),
               q(f"sum by (model) (distillgate_backend_running{{{M}}})", "{{model}} running"))),
        Panel("Queue saturation", "Waiting requests over the queue's capacity (429 at 100%; "
              "alert DistillgateQueueSaturated above 80%).",
              (q(f"model:distillgate_queue_saturation:ratio{{{M}}}", "{{model}}"),),
              unit="percentunit", threshold=0.8),
        Panel("Batch size", "Mean number of sequences decoded together while a request ran.",
              (q(f"model:distillgate_batch_size:mean_5m{{{M}}}", "{{model}}"),)),
        Panel("Tokens per second", "Prompt and completion tokens per second, by model.",
              (q(f"sum by (model) (rate(distillgate_completion_tokens_total{{{M}}}"
                 "[$__rate_interval]))", "{{model}} completion"),
               q(f"sum by (model) (rate(distillgate_prompt_tokens_total{{{M}}}"
                 "[$__rate_interval]))", "{{model}} prompt"))),
        Panel("Models ready", "1 while a model is loaded and healthy (checked at each scrape).",
              (q(f"min by (model) (distillgate_model_ready{{{M}}})", "{{model}}"),),
              kind="stat"),
        Panel("Version", "The gateway's version, per instance.",
              (q("distillgate_build_info", "{{instance}} {{version}}"),), kind="stat"),
    ),
    "Routing": (
        Panel("Routing decisions", "Requests for `auto` per second, by the chosen model, the "
              "SLO class and the reason.",
              (q(f"sum by (model, slo_class, reason) (model_slo_class_reason:"
                 f"distillgate_route_decisions:rate5m{{{M}, {C}}})",
                 "{{model}} {{slo_class}} {{reason}}"),), unit="reqps", stacked=True),
        Panel("SLO attainment", "Share of each class's routed requests answered within its "
              "latency SLO (the policy's SLOs are p95s: 95% is the target).",
              (q(f"slo_class:distillgate_slo_attainment:ratio_rate5m{{{C}}}", "{{slo_class}}"),),
              unit="percentunit", threshold=0.95),
        Panel("Domain mix", "Routed requests per second by detected domain.",
              (q("sum by (domain) (domain:distillgate_domain_detections:rate5m)", "{{domain}}"),),
              unit="reqps", stacked=True),
        Panel("Cost", "Estimated cost per second of routed requests by model (the policy's "
              "cost units), and what routing saved against sending all of them to the teacher.",
              (q(f"sum by (model) (rate(distillgate_route_cost_total{{{M}}}[$__rate_interval]))",
                 "{{model}}"),
               q("sum(rate(distillgate_route_cost_saved_total[$__rate_interval]))", "saved"))),
        Panel("Cost saved against always-teacher", "Saved over (saved + spent), last 5 minutes.",
              (q("distillgate:route_cost_saved:ratio_rate5m", "saved"),), unit="percentunit",
              kind="stat"),
        Panel("Traffic log", "Records written and dropped per second (alert "
              "DistillgateTrafficLogDropping on any drop), and the writer's queue.",
              (q("sum(rate(distillgate_traffic_log_written_total[$__rate_interval]))", "written"),
               q("sum by (reason) (rate(distillgate_traffic_log_dropped_total"
                 "[$__rate_interval]))", "dropped {{reason}}"),
               q("sum(distillgate_traffic_log_queue_depth)", "queued"))),
    ),
    "Adaptation": (
        Panel("Shift events", "Events the detectors found in the last 5 minutes, by kind.",
              (q("sum by (kind) (increase(distillgate_shift_events_total[5m]))", "{{kind}}"),)),
        Panel("Rollout stage", "Each student's current stage (shadow, canary, live, retired).",
              (q("max by (student, stage) (distillgate_adapt_stage) == 1",
                 "{{student}}: {{stage}}", instant=True),), kind="stat"),
        Panel("Share of its domain", "The share of its domain's traffic each student may "
              "answer (0 in shadow, the canary step, 1 live).",
              (q("max by (student) (distillgate_adapt_share)", "{{student}}"),),
              unit="percentunit"),
        Panel("Agreement with the teacher", "The rollout's evidence per student (adapt "
              "process), and the mean agreement of shadow answers over 5 minutes (gateway).",
              (q("max by (student) (distillgate_adapt_agreement)", "{{student}} evidence"),
               q(f"sum by (model) (rate(distillgate_shadow_agreement_sum{{{M}}}[5m])) / "
                 f"sum by (model) (rate(distillgate_shadow_agreement_count{{{M}}}[5m]))",
                 "{{model}} shadow")), unit="percentunit"),
        Panel("Shadow answers", "Teacher-answered requests replayed on students, by outcome.",
              (q(f"sum by (model, outcome) (rate(distillgate_shadow_answers_total{{{M}}}"
                 "[$__rate_interval]))", "{{model}} {{outcome}}"),), unit="reqps"),
        Panel("Stage transitions", "Transitions in the last hour (a move from canary or live "
              "back to shadow is a rollback: alert DistillgateAdaptationRollback).",
              (q("sum by (from, to) (increase(distillgate_adapt_transitions_total[1h]))",
                 "{{from}} -> {{to}}"),)),
        Panel("Adaptation jobs", "Jobs by status (pending, running, waiting for data, "
              "registered, failed).",
              (q("sum by (status) (distillgate_adapt_jobs)", "{{status}}"),)),
    ),
}
# fmt: on


def variables() -> list:
    """The datasource, and the model and SLO class filters (all by default)."""
    source = (
        dashboard.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value="prometheus"))
    )
    filters = [
        dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
        .query(f"label_values({metric}, {name})").multi(True).include_all(True)
        .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .current(VariableOption(selected=True, text="All", value="$__all"))
        for name, label, metric in (("model", "Model", "distillgate_requests_total"),
                                    ("slo_class", "SLO class", "distillgate_slo_requests_total"))
    ]  # fmt: skip
    return [source, *filters]


def panel(spec: Panel):
    kind = stat if spec.kind == "stat" else timeseries
    built = (kind.Panel().title(spec.title).description(spec.description).unit(spec.unit)
             .datasource(DATASOURCE).height(8).span(spec.width))  # fmt: skip
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
        built = built.with_target(target.instant() if query.instant else target)
    if spec.kind == "stat":  # the rollout stage is in the series' name, not its value
        named = spec.title == "Rollout stage"
        return built.text_mode(BigValueTextMode.NAME if named else BigValueTextMode.AUTO)
    built = built.fill_opacity(30 if spec.stacked else 10).line_width(1)
    if spec.stacked:
        built = built.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    if spec.threshold is not None:
        steps = [Threshold(value=None, color="green"), Threshold(value=spec.threshold,
                                                                 color="red")]  # fmt: skip
        built = built.thresholds(
            dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)
        ).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)
        )
    return built


def build() -> dict:
    board = (dashboard.Dashboard("distillgate").uid("distillgate")
             .description("The distillgate gateway and its adaptation loop: traffic, latency, "
                          "load, routing and cost, the traffic log, and each student's rollout.")
             .tags(["distillgate", "llm"]).refresh("10s").time("now-1h", "now")
             .tooltip(DashboardCursorSync.CROSSHAIR).editable())  # fmt: skip
    for variable in variables():
        board = board.with_variable(variable)
    for title, panels in ROWS.items():
        board = board.with_row(dashboard.Row(title))
        for spec in panels:
            board = board.with_panel(panel(spec))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder, sort_keys=True))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `python deploy/grafana/dashboard.py`",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
