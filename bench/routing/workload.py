"""Routing against its alternatives on a held-out mixed workload, through the real gateway
serving the real registered teacher and students.

The workload: test-split finance headlines, support tickets and general-knowledge
questions (bare questions, scored by which option the answer names), shuffled. Phase 1
sends every request to every model by name (temperature 0), which gives each model's
answer, correctness, tokens and latency; phase 2 sends every request as `model: "auto"`.
From the same run:

- auto: the router's choices (phase 2);
- always-teacher, always-smallest: phase-1 answers of one model;
- fixed score (vLLM semantic-router's `multi_factor` style): each model has one quality
  score, its measured accuracy on its own task relative to the teacher's, whatever the
  request; the cheapest model whose score meets the class;
- random split at equal cost: each request to a student or the teacher at random, with
  the teacher's share set so the expected cost equals auto's;
- oracle: per request, the cheapest model that answered correctly (the teacher if none).

Cost is the policy's price per 1,000 tokens times the request's tokens; quality is
accuracy against the references and agreement with the teacher's answer; SLO attainment
is the share of requests within the class's p95_latency_ms (for the baselines, the
phase-1 latency of the model they pick).

    .venv/bin/python bench/routing/workload.py --store var/bench-store \\
        --teacher smollm2-135m-instruct-finance-headlines-lora --students A B \\
        [--law docs/results/law.json] [--finance 120 --support 40 --general 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench" / "overhead"), str(REPO)]

from run import process  # noqa: E402  (bench/overhead/run.py)

from gateway.routing.estimates import cost_per_1k  # noqa: E402
from gateway.routing.policy import load_policy  # noqa: E402
from models.store import ModelStore  # noqa: E402
from models.tasks import get_task  # noqa: E402
from models.tasks.base import match_label  # noqa: E402
from tests.servers import free_port  # noqa: E402


@dataclass
class Answer:
    text: str
    correct: bool
    tokens: int
    seconds: float


def workload(counts: dict[str, int], seed: int) -> list[tuple[str, object]]:
    rows = []
    for task, n in counts.items():
        rows += [(task, e) for e in get_task(task).examples("test", n)]
    random.Random(seed).shuffle(rows)
    return rows


def score(task: str, example, text: str) -> bool:
    if task == "general-knowledge":
        options = (example.answer, *example.choices)
        return match_label(text, options) == example.answer
    return get_task(task).score(example, text) == 1.0


def ask(client: httpx.Client, model: str, prompt: str, max_tokens: int):
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0,
    })  # fmt: skip
    r.raise_for_status()
    body = r.json()
    tokens = body["usage"]["total_tokens"]
    return body, r.headers, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", nargs="+", required=True)
    parser.add_argument("--law", type=Path)
    parser.add_argument("--policy", type=Path, default=REPO / "deploy" / "policy.yaml")
    parser.add_argument("--slo-class", default="interactive")
    parser.add_argument("--finance", type=int, default=120)
    parser.add_argument("--support", type=int, default=40)
    parser.add_argument("--general", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    store = ModelStore(args.store)
    models = [args.teacher, *args.students]
    manifests = {m: store.manifest(m) for m in models}
    policy = load_policy(args.policy)
    slo = policy.classes[args.slo_class]
    params = {m: manifests[m].evaluation.get("non_embedding_parameters") for m in models}
    price = {m: cost_per_1k(m, policy.costs, policy.teacher_cost_per_1k_tokens, params[m],
                            params[args.teacher]) for m in models}  # fmt: skip
    counts = {"finance-headlines": args.finance, "support-tickets": args.support,
              "general-knowledge": args.general}  # fmt: skip
    requests = workload(counts, args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    config = {
        "models": [{"name": m, "backend": "local", "role": manifests[m].role} for m in models],
        "routing": {
            "policy": str(args.policy.resolve()),
            **({"law": str(args.law.resolve())} if args.law else {}),
        },
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp / "config.yaml"),
            "--store", str(args.store), "--port", str(port)]  # fmt: skip
    answers: dict[str, list[Answer]] = {m: [] for m in models}
    routed: list[tuple[str, Answer, str]] = []
    with (
        process("gateway", argv, f"{url}/ready", 600),
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        for task, example in requests:  # phase 1: every model by name
            for m in models:
                body, _, tokens, seconds = ask(client, m, example.prompt, args.max_tokens)
                text = body["choices"][0]["message"]["content"]
                answers[m].append(Answer(text, score(task, example, text), tokens, seconds))
        for task, example in requests:  # phase 2: auto
            body, headers, tokens, seconds = ask(client, f"auto:{args.slo_class}",
                                                 example.prompt, args.max_tokens)  # fmt: skip
            text = body["choices"][0]["message"]["content"]
            routed.append(
                (
                    body["model"],
                    Answer(text, score(task, example, text), tokens, seconds),
                    headers["x-distillgate-domain"],
                )
            )
        metrics = client.get("/metrics").text

    teacher_text = [a.text for a in answers[args.teacher]]
    limit = slo.p95_latency_ms / 1000 if slo.p95_latency_ms else float("inf")

    def summary(picks: list[tuple[str, Answer]]) -> dict:
        cost = sum(price[m] * a.tokens / 1000 for m, a in picks)
        return {
            "cost": cost,
            "accuracy": statistics.mean(a.correct for _, a in picks),
            "agreement_with_teacher": statistics.mean(
                a.text.strip() == t.strip() for (_, a), t in zip(picks, teacher_text, strict=True)
            ),
            "slo_attainment": statistics.mean(a.seconds <= limit for _, a in picks),
            "share_by_model": {m: sum(p == m for p, _ in picks) / len(picks) for m in models},
        }

    n = len(requests)
    smallest = min(args.students, key=lambda m: params[m] or 0)
    teacher_accuracy = {m: manifests[m].evaluation.get("in_domain", {}) for m in models}
    ref = teacher_accuracy[args.teacher]
    fixed = {}
    for m in models:
        task = manifests[m].task or "finance-headlines"
        own = (teacher_accuracy[m].get(task) or {}).get("accuracy", {}).get("value", 0)
        base = (ref.get(task) or {}).get("accuracy", {}).get("value", 1)
        fixed[m] = 1.0 if m == args.teacher else own / base
    fixed_pick = min((m for m in models if fixed[m] >= slo.min_quality), key=lambda m: price[m])
    auto = summary([(m, a) for m, a, _ in routed])
    teacher = summary([(args.teacher, a) for a in answers[args.teacher]])
    small = summary([(smallest, a) for a in answers[smallest]])
    share = 0.0
    if teacher["cost"] > small["cost"]:
        share = min(max((auto["cost"] - small["cost"]) / (teacher["cost"] - small["cost"]), 0), 1)
    rng = random.Random(args.seed)
    split = [args.teacher if rng.random() < share else smallest for _ in range(n)]
    oracle = []
    for i in range(n):
        right = [m for m in models if answers[m][i].correct]
        oracle.append(min(right, key=lambda m: price[m]) if right else args.teacher)
    out = {
        "workload": counts, "slo_class": args.slo_class, "max_tokens": args.max_tokens,
        "models": {m: {"price_per_1k": price[m], "non_embedding_parameters": params[m],
                       "fixed_score": fixed[m]} for m in models},
        "strategies": {
            "auto": auto,
            "always-teacher": teacher,
            "always-smallest": small,
            "fixed-score": summary([(fixed_pick, answers[fixed_pick][i]) for i in range(n)]),
            "random-split-equal-cost": summary([(m, answers[m][i]) for i, m in enumerate(split)]),
            "oracle": summary([(m, answers[m][i]) for i, m in enumerate(oracle)]),
        },
        "auto_domains": {d: sum(x == d for *_, x in routed) for d in {x for *_, x in routed}},
        "route_metrics": [line for line in metrics.splitlines()
                          if line.startswith("distillgate_route_decisions_total")],
    }  # fmt: skip
    base = out["strategies"]["always-teacher"]
    for s in out["strategies"].values():
        s["cost_vs_teacher"] = s["cost"] / base["cost"]
        s["quality_vs_teacher"] = s["accuracy"] / base["accuracy"] if base["accuracy"] else None
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
