"""Routing against its alternatives on a held-out mixed workload, through the real gateway
serving the real registered teacher and students.

The workload: test-split finance headlines, support tickets and general-knowledge
questions (bare questions, scored by which option the answer names), shuffled. Phase 1
sends every request to every model by name (temperature 0), which gives each model's
answer, correctness, tokens and latency; phase 2 sends every request as `model: "auto"`.
From the same run:

- auto: the router's choices (phase 2, once per SLO class asked for);
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

    .venv/bin/python -m bench.routing.workload --store var/bench-store \\
        --teacher smollm2-135m-instruct-finance-headlines-lora --students A B \\
        [--law docs/results/law.json] [--slo-class interactive batch ...] \\
        [--finance 120 --support 40 --general 40] [--json F]
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
from tqdm import tqdm

from bench.overhead.run import free_port, process
from distillgate_deploy import shipped
from gateway.routing.estimates import cost_per_1k
from gateway.routing.policy import load_policy
from models.store import ModelStore
from models.tasks import get_task
from models.tasks.base import match_label


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", nargs="+", required=True)
    parser.add_argument("--law", type=Path)
    parser.add_argument("--policy", type=Path, default=shipped("policy.yaml"))
    parser.add_argument("--slo-class", nargs="+", default=["interactive"])
    parser.add_argument("--finance", type=int, default=120)
    parser.add_argument("--support", type=int, default=40)
    parser.add_argument("--general", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def answer(client: httpx.Client, model: str, task: str, example, max_tokens: int):
    body, headers, tokens, seconds = ask(client, model, example.prompt, max_tokens)
    text = body["choices"][0]["message"]["content"]
    return body, headers, Answer(text, score(task, example, text), tokens, seconds)


def run_gateway(args, models, manifests, requests):
    """Phase 1 (every request to every model by name) and phase 2 (every request as
    `auto:<class>`, per class) through one gateway process."""
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
    routed: dict[str, list[tuple[str, Answer, str]]] = {c: [] for c in args.slo_class}
    with (
        process("gateway", argv, f"{url}/ready", 600),
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        for task, example in tqdm(requests, desc="every model"):
            for m in models:
                answers[m].append(answer(client, m, task, example, args.max_tokens)[2])
        for slo_class in args.slo_class:
            for task, example in tqdm(requests, desc=f"auto:{slo_class}"):
                body, headers, got = answer(client, f"auto:{slo_class}", task, example,
                                            args.max_tokens)  # fmt: skip
                routed[slo_class].append((body["model"], got, headers["x-distillgate-domain"]))
        metrics = client.get("/metrics").text
    return answers, routed, metrics


def summarise(picks, teacher_text, price, models, limit) -> dict:
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


def fixed_scores(args, models, manifests) -> dict[str, float]:
    """semantic-router's `multi_factor` style: one score per model, its measured accuracy on
    its own task relative to the teacher's there, whatever the request."""
    ref = manifests[args.teacher].evaluation.model_dump().get("in_domain", {})
    fixed = {}
    for m in models:
        task = manifests[m].task or "finance-headlines"
        own = manifests[m].evaluation.model_dump().get("in_domain", {}).get(task) or {}
        base = (ref.get(task) or {}).get("accuracy", {}).get("value", 1)
        fixed[m] = 1.0 if m == args.teacher else own.get("accuracy", {}).get("value", 0) / base
    return fixed


def strategies(args, slo, price, params, fixed, answers, routed):
    models = [args.teacher, *args.students]
    limit = slo.p95_latency_ms / 1000 if slo.p95_latency_ms else float("inf")
    teacher_text = [a.text for a in answers[args.teacher]]
    n = len(teacher_text)

    def summary(picks):
        return summarise(picks, teacher_text, price, models, limit)

    smallest = min(args.students, key=lambda m: params[m] or 0)
    meets = [m for m in models if fixed[m] >= slo.min_quality]
    fixed_pick = min(meets, key=lambda m: price[m]) if meets else args.teacher
    auto = summary([(m, a) for m, a, _ in routed])
    teacher = summary([(args.teacher, a) for a in answers[args.teacher]])
    small = summary([(smallest, a) for a in answers[smallest]])
    share = 0.0  # the teacher's share of the random split, so that its cost equals auto's
    if teacher["cost"] > small["cost"]:
        share = min(max((auto["cost"] - small["cost"]) / (teacher["cost"] - small["cost"]), 0), 1)
    rng = random.Random(args.seed)
    split = [args.teacher if rng.random() < share else smallest for _ in range(n)]
    oracle = []
    for i in range(n):
        right = [m for m in models if answers[m][i].correct]
        oracle.append(min(right, key=lambda m: price[m]) if right else args.teacher)
    out = {
        "auto": auto,
        "always-teacher": teacher,
        "always-smallest": small,
        "fixed-score": summary([(fixed_pick, answers[fixed_pick][i]) for i in range(n)]),
        "random-split-equal-cost": summary([(m, answers[m][i]) for i, m in enumerate(split)]),
        "oracle": summary([(m, answers[m][i]) for i, m in enumerate(oracle)]),
    }
    for s in out.values():
        s["cost_vs_teacher"] = s["cost"] / teacher["cost"]
        s["quality_vs_teacher"] = (
            s["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        )
    return out


def by_domain(requests, answers, routed, models) -> dict:
    """Per request domain: each model's accuracy, and where auto sent the requests."""
    out = {}
    for task in sorted({t for t, _ in requests}):
        idx = [i for i, (t, _) in enumerate(requests) if t == task]
        out[task] = {
            "n": len(idx),
            "accuracy": {m: statistics.mean(answers[m][i].correct for i in idx) for m in models},
            "auto_share": {c: {m: sum(routed[c][i][0] == m for i in idx) / len(idx)
                               for m in models} for c in routed},
        }  # fmt: skip
    return out


def main() -> None:
    args = parse_args()
    store = ModelStore(args.store)
    models = [args.teacher, *args.students]
    manifests = {m: store.manifest(m) for m in models}
    policy = load_policy(args.policy)
    params = {m: manifests[m].evaluation.non_embedding_parameters for m in models}
    price = {m: cost_per_1k(m, policy.costs, policy.teacher_cost_per_1k_tokens, params[m],
                            params[args.teacher]) for m in models}  # fmt: skip
    counts = {"finance-headlines": args.finance, "support-tickets": args.support,
              "general-knowledge": args.general}  # fmt: skip
    requests = workload(counts, args.seed)
    answers, routed, metrics = run_gateway(args, models, manifests, requests)
    fixed = fixed_scores(args, models, manifests)
    out = {
        "workload": counts, "max_tokens": args.max_tokens,
        "models": {m: {"price_per_1k": price[m], "non_embedding_parameters": params[m],
                       "fixed_score": fixed[m]} for m in models},
        "classes": {c: strategies(args, policy.classes[c], price, params, fixed, answers,
                                  routed[c]) for c in args.slo_class},
        "by_domain": by_domain(requests, answers, routed, models),
        "auto_domains": {c: {d: sum(x == d for *_, x in r) for d in {x for *_, x in r}}
                         for c, r in routed.items()},
        "route_metrics": [line for line in metrics.splitlines()
                          if line.startswith("distillgate_route_decisions_total")],
    }  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
