"""Draw the dashboard as a PNG from a running Prometheus that scrapes distillgate:

    python -m bench.dashboard.run --prometheus http://localhost:9090 --out docs/dashboard.png

Every panel's queries run as range queries over the last `--minutes`, as Grafana would run
them with every variable at "All". (docs/dashboard.png is drawn by the Prometheus test
instead, from traffic it sends itself: DISTILLGATE_DASHBOARD_PNG=docs/dashboard.png.)"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from bench.dashboard.preview import collect, draw

DASHBOARD = Path("deploy/grafana/distillgate.json")  # run from the repo root


def range_query(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list:
    """The matrix of Prometheus' /api/v1/query_range for `expr`."""
    params = {"query": expr, "start": start, "end": end, "step": step}
    body = client.get("/api/v1/query_range", params=params).json()
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--minutes", type=float, default=15.0)
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    end = time.time()
    start = end - args.minutes * 60
    step = max(1.0, args.minutes * 60 / 300)  # ~300 points a line
    with httpx.Client(base_url=args.prometheus.rstrip("/"), timeout=30) as client:
        results = collect(dashboard, lambda expr: range_query(client, expr, start, end, step))
    draw(dashboard, results, args.out)
    empty = sorted(t for t, series in results.items() if not any(s.has_data() for s in series))
    print(f"wrote {args.out} ({len(results)} panels with queries; no data: {empty or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
