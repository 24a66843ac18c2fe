"""What a routing decision costs: the pure selector over 8 candidates, domain detection of
a finance-headline prompt, and the whole `Router.route` (class, detection, quality lookup,
latency and cost estimates, decision, metrics) over 8 served models, each timed call by
call; p50 and p99 in microseconds, medians over `--repeats` rounds.

    .venv/bin/python -m bench.routing.decision [--calls 20000] [--repeats 5] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distillgate_deploy import shipped
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.routing.domains import GENERAL, fit_for
from gateway.routing.policy import PolicyFile, load_policy
from gateway.routing.quality import UNKNOWN, Quality, QualityTable
from gateway.routing.router import Router, _Models
from gateway.routing.selector import Candidate, Slo, choose
from models.backends.base import Load, ModelCard
from models.store import ModelStore
from models.tasks import get_task

TASK = "finance-headlines"
NAMES = [f"m{i}" for i in range(8)]


class Idle:
    """A served model as routing sees it: its card and its load (nothing is generated)."""

    def __init__(self, name: str, parameters: int) -> None:
        self._card = ModelCard(name, "openai", parameters=parameters)

    def card(self) -> ModelCard:
        return self._card

    def load(self) -> Load:
        return Load(waiting=1, running=2)


def timed(call: Callable[[], object], n: int) -> dict[str, float]:
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter_ns()
        call()
        times[i] = time.perf_counter_ns() - start
    return {"p50_us": float(np.percentile(times, 50) / 1e3),
            "p99_us": float(np.percentile(times, 99) / 1e3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rng = random.Random(0)
    candidates = [
        Candidate(n, 0.8 + 0.025 * i, 50 + 20 * i, 500 + 100 * i, 0.1 * (i + 1), 0.01 * (i + 1))
        for i, n in enumerate(NAMES)
    ]
    candidates[-1] = dataclasses.replace(candidates[-1], teacher=True)
    slo = Slo(min_quality=0.9, p95_ttft_ms=150, p95_latency_ms=1100)

    detector, accuracy = fit_for([TASK])
    prompt = get_task(TASK).examples("test", 1)[0].prompt

    config = parse_config({"models": [{"name": n, "backend": "openai", "url": "http://x"}
                                      for n in NAMES]})  # fmt: skip
    backends = {n: Idle(n, 10_000_000 * (i + 1)) for i, n in enumerate(NAMES)}
    router = Router(config, ModelStore(Path("/nonexistent")), backends, Metrics(lambda: {}))
    table = QualityTable(
        {(n, d): Quality(0.6 + 0.05 * i, 0.55 + 0.05 * i, "measured") if n != "m0" else UNKNOWN
         for i, n in enumerate(NAMES) for d in (TASK, GENERAL)},
        {TASK: "m7", GENERAL: "m7"},
    )  # fmt: skip
    router.models = _Models({n: None for n in NAMES}, {}, table, detector, accuracy)
    for i, n in enumerate(NAMES):
        router.estimates.prior(n, 40 + 10 * i, 20 + 5 * i)
    policy = shipped("policy.yaml")
    router.policy_file = PolicyFile(policy, load_policy(policy))  # never refreshed here

    cases = {
        "select (8 candidates)": lambda: choose(candidates, slo, exploration=0.02,
                                                draws=(rng.random(), rng.random())),
        "detect domain": lambda: detector.detect(prompt),
        "route (8 models, whole)": lambda: router.route(prompt, "auto", {}, None, 16),
    }  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for name, call in cases.items():
        timed(call, 1000)  # warm up
        rounds = [timed(call, args.calls) for _ in range(args.repeats)]
        results[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results[name]["rounds_p99_us"] = [round(r["p99_us"], 1) for r in rounds]
    out = {"calls": args.calls, "repeats": args.repeats, "prompt_chars": len(prompt),
           "detector_held_out_accuracy": accuracy, "results": results}  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
