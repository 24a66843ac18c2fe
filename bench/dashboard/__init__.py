"""The Grafana dashboard (deploy/grafana/distillgate.json) drawn as a PNG from its own
queries run against a real Prometheus: `python -m bench.dashboard.run`, or the Prometheus
test with DISTILLGATE_DASHBOARD_PNG set (docs/dashboard.png)."""
