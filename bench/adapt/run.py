"""The adaptation loop on the real teacher, by itself: the real gateway (`serve --adapt`)
serving the embedded SmolLM2 teacher with students loaded from the store, an open-loop
client at a steady rate. Phase 1: finance headlines and general questions. Phase 2:
support tickets (a task nothing covers) rise to `--share` of the traffic. Every request
is a new prompt, so the student is measured on requests it never trained on.

Measured: requests from the switch to the new_traffic event; minutes from the event to
the student in shadow and to live; the share of the shifted traffic on the student at the
end; its agreement with the teacher there (each such request asked of the teacher by name
afterwards); the shifted traffic's cost per request before and at the end (the traffic
log's costs); the teacher's p50/p99 latency on phase-1 requests while the student trains
against before the shift. A PNG puts the mix, the event, training, the stages and the
cost per request on one time axis.

    .venv/bin/python -m bench.adapt.run --store var/bench-adapt --rate 2 --share 0.3 \\
        --out docs/results/adapt
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml

from bench.overhead.run import free_port, process
from distillgate_deploy import shipped

KINDS = ("finance-headlines", "general-knowledge", "support-tickets")


@dataclass
class Sent:
    t: float  # seconds since the start
    kind: str
    prompt: str
    status: int = 0
    model: str = ""
    latency_s: float = 0.0
    answer: str = ""
    tokens: int = 0
    id: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("var/bench-adapt"))
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (open loop)")
    p.add_argument("--share", type=float, default=0.3, help="support tickets' share in phase 2")
    p.add_argument("--phase1-s", type=float, default=120.0)
    p.add_argument("--finance", type=float, default=0.0,
                   help="finance headlines' share of the other traffic (0: general questions "
                   "only; with no finance student served, they are new traffic too)")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=45.0, help="phase 2's longest run")
    p.add_argument("--after-live", type=int, default=100,
                   help="shifted requests to send once the student is live")  # fmt: skip
    p.add_argument("--min-examples", type=int, default=200)
    p.add_argument("--test-share", type=float, default=0.3)
    p.add_argument("--min-pairs", type=int, default=100)
    p.add_argument("--step-pairs", type=int, default=50)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument(
        "--klass", default="batch",
        help="SLO class of the new traffic (its min_quality is the student's target)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("docs/results/adapt"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_config(args: argparse.Namespace, scratch: Path, metrics_port: int) -> Path:
    """The shipped policy (and a `demo` class); support tickets arrive as `--klass`
    (default `batch`, min_quality 0.9)."""
    config = {
        "models": [{"name": "smollm2-135m-instruct", "backend": "local", "role": "teacher"}],
        "routing": {"policy": str(shipped("policy.yaml"))},
        "students": {"from_store": True, "max_loaded": 2},
        "threads": 2,
        "adapt": {
            "min_examples": args.min_examples, "max_examples": args.min_examples * 4,
            "ratios": args.ratios, "epochs": args.epochs, "test_share": args.test_share,
            "format": "logits", "threads": 1,
            "interval_s": 2.0, "metrics_port": metrics_port,
            "detect": {"window": 200, "min_count": 10},
            "rollout": {"min_pairs": args.min_pairs, "step_pairs": args.step_pairs,
                        "shadow_share": 0.5, "audit_share": 0.2},
        },
    }  # fmt: skip
    # the shipped policy, plus `demo`: no quality bound, content logged (for `make demo`)
    policy = yaml.safe_load(shipped("policy.yaml").read_text())
    policy["classes"]["demo"] = {"min_quality": 0.0, "log_content": True}
    (scratch / "policy.yaml").write_text(yaml.safe_dump(policy))
    config["routing"]["policy"] = str(scratch / "policy.yaml")
    path = scratch / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prompts(seed: int) -> dict[str, list[str]]:
    from models.tasks import get_task

    out = {}
    for kind in KINDS:
        task = get_task(kind)
        split = "validation" if kind == "general-knowledge" else "test"
        examples = task.examples(split, None if kind == "general-knowledge" else 6000)
        items = [e.prompt for e in examples]
        random.Random(seed).shuffle(items)
        out[kind] = items
    return out


async def one(client: httpx.AsyncClient, sent: Sent, klass: str) -> None:
    klass = klass if sent.kind == "support-tickets" else "interactive"
    body = {"model": f"auto:{klass}", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": sent.prompt}]}  # fmt: skip
    began = time.monotonic()
    try:
        response = await client.post("/v1/chat/completions", json=body)
        sent.status = response.status_code
        sent.model = response.headers.get("x-distillgate-model", "")
        if response.status_code == 200:
            data = response.json()
            sent.answer = data["choices"][0]["message"]["content"] or ""
            sent.id = data["id"]
            sent.tokens = data["usage"]["total_tokens"]
    except httpx.HTTPError:
        sent.status = -1
    sent.latency_s = time.monotonic() - began


def stages(store: Path) -> dict:
    """The loop's state now: jobs and rollouts, read from the traffic log's database."""
    from gateway.adapt.log import TrafficLog, database_url
    from gateway.adapt.state import AdaptState

    log = TrafficLog.open(database_url(None, store))
    try:
        state = AdaptState(log.engine)
        jobs = [{"status": j.status, "student": j.student, "fingerprint": j.fingerprint,
                 "reason": j.reason} for j in state.jobs()]  # fmt: skip
        rollouts = {r.student: (r.stage, r.share) for r in state.rollouts().values()}
        events = [(e.kind, e.key, e.ts) for _, e in log.events(kind="new_traffic")]
    finally:
        log.close()
    return {"jobs": jobs, "rollouts": rollouts, "events": events}


async def drive(args: argparse.Namespace, url: str, store: Path) -> tuple[list[Sent], list, float]:
    """Open-loop traffic; returns what was sent, the loop's state over time, the switch."""
    pools = prompts(args.seed)
    rng = random.Random(args.seed)
    sent: list[Sent] = []
    timeline: list[tuple[float, dict]] = []
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    switch = args.phase1_s
    live_at: int | None = None
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        i, next_poll = 0, 0.0
        while True:
            now = time.monotonic() - start
            if now >= next_poll:
                state = await asyncio.to_thread(stages, store)
                say_changes(now, timeline[-1][1] if timeline else None, state)
                timeline.append((now, state))
                next_poll = now + 5.0
                if live_at is None and any(s == "live" for s, _ in state["rollouts"].values()):
                    live_at = sum(s.kind == "support-tickets" for s in sent)
                    print(f"[{now:6.0f}s] student live", flush=True)
            shifted = sum(s.kind == "support-tickets" for s in sent)
            if live_at is not None and shifted - live_at >= args.after_live:
                break
            if now > switch + args.max_minutes * 60:
                print("max time reached", flush=True)
                break
            if now >= switch and rng.random() < args.share:
                kind = "support-tickets"
            else:
                kind = "finance-headlines" if rng.random() < args.finance else "general-knowledge"
            pool = pools[kind]
            s = Sent(now, kind, pool[i % len(pool)])
            sent.append(s)
            task = asyncio.create_task(one(client, s, args.klass))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            if i % 100 == 0:
                print(f"[{now:6.0f}s] sent {i}", flush=True)
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
    return sent, timeline, switch


def say_changes(now: float, before: dict | None, after: dict) -> None:
    """Print each step of the loop as it is seen: events, job states, rollout stages."""
    before = before or {"jobs": [], "rollouts": {}, "events": []}
    for kind, key, _ in after["events"][len(before["events"]) :]:
        print(f"[{now:6.0f}s] event {kind} {key}", flush=True)
    old_jobs = {j["fingerprint"]: j for j in before["jobs"]}
    for job in after["jobs"]:
        if old_jobs.get(job["fingerprint"]) != job:
            print(f"[{now:6.0f}s] job {job['fingerprint']}: {job['status']} {job['reason']}",
                  flush=True)  # fmt: skip
    for student, stage in after["rollouts"].items():
        if before["rollouts"].get(student) != stage:
            print(f"[{now:6.0f}s] student {student}: {stage[0]} (share {stage[1]:g})", flush=True)


def ask_teacher(url: str, prompts_: list[str]) -> list[str]:
    answers = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for prompt in prompts_:
            body = {"model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
            r = client.post("/v1/chat/completions", json=body)
            answers.append(r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                           else "")  # fmt: skip
    return answers


def first_time(timeline: list, test) -> float | None:
    return next((t for t, state in timeline if test(state)), None)


def pct(values: list[float], q: float) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(args, sent: list[Sent], timeline: list, switch: float, wall0: float,
              teacher_answers: dict[str, str], costs: dict[str, float]) -> dict:  # fmt: skip
    event_ts = next((e[2] for _, st in timeline for e in st["events"]), None)
    event_t = event_ts - wall0 if event_ts is not None else None
    student = next((j["student"] for _, st in timeline for j in st["jobs"] if j["student"]), None)
    shadow_t = first_time(timeline, lambda st: student in st["rollouts"])
    live_t = first_time(timeline, lambda st: st["rollouts"].get(student, ("",))[0] == "live")
    training = [t for t, st in timeline if any(j["status"] == "running" for j in st["jobs"])]
    shifted = [s for s in sent if s.kind == "support-tickets" and s.status == 200]
    end = shifted[-args.after_live :] if live_t is not None else []
    on_student = [s for s in end if s.model == student]
    from gateway.adapt.agreement import agreement

    agree = [agreement(s.answer, teacher_answers[s.prompt]) for s in on_student]
    phase1 = [s for s in sent if s.kind != "support-tickets" and s.status == 200
              and s.model == "smollm2-135m-instruct"]  # fmt: skip
    idle = [s.latency_s for s in phase1 if s.t < switch]
    busy = [s.latency_s for s in phase1 if training and training[0] <= s.t <= training[-1]]
    before = [costs.get(s.id, 0.0) for s in shifted if s.t < (event_t or 0)]
    after = [costs.get(s.id, 0.0) for s in end]
    detected = None if event_t is None else sum(1 for s in sent if switch <= s.t <= event_t)
    return {
        "student": student, "requests_to_event": detected,
        "event_s": event_t, "shadow_min": _minutes(shadow_t, event_t),
        "live_min": _minutes(live_t, event_t),
        "training_s": [training[0], training[-1]] if training else None,
        "end_share_on_student": len(on_student) / len(end) if end else None,
        "end_agreement": statistics.fmean(agree) if agree else None, "agreement_n": len(agree),
        "cost_before": statistics.fmean(before) if before else None,
        "cost_after": statistics.fmean(after) if after else None,
        "teacher_idle_p50_s": pct(idle, 50), "teacher_idle_p99_s": pct(idle, 99),
        "teacher_training_p50_s": pct(busy, 50), "teacher_training_p99_s": pct(busy, 99),
        "sent": len(sent), "failed": sum(1 for s in sent if s.status != 200),
    }  # fmt: skip


def _minutes(t: float | None, since: float | None) -> float | None:
    return None if t is None or since is None else (t - since) / 60


def logged_costs(store: Path) -> dict[str, float]:
    """Each request's cost as the gateway logged it (its price per 1,000 tokens, from the
    policy, times the tokens it used), by request id (the response's `id`)."""
    from gateway.adapt.log import TrafficLog, database_url

    log = TrafficLog.open(database_url(None, store))
    costs, after = {}, 0
    try:
        while page := log.read(after, 5000):
            costs |= {r.record.request_id: r.record.cost or 0.0 for r in page}
            after = page[-1].id
    finally:
        log.close()
    return costs


def plot(path: Path, sent: list[Sent], timeline: list, summary: dict, costs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mix, cost) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts = [s.t / 60 for s in sent]
    window = 60
    share = [sum(x.kind == "support-tickets" for x in sent[max(0, i - window) : i + 1])
             / len(sent[max(0, i - window) : i + 1]) for i in range(len(sent))]  # fmt: skip
    on = [sum(x.model == summary["student"] for x in sent[max(0, i - window) : i + 1]
              if x.kind == "support-tickets") / max(1, sum(
              x.kind == "support-tickets" for x in sent[max(0, i - window) : i + 1]))
          for i in range(len(sent))]  # fmt: skip
    mix.plot(ts, share, label="support tickets' share of traffic")
    mix.plot(ts, on, label="share of them on the student")
    stage_colors = {"shadow": "#ddd", "canary": "#fd8", "live": "#8d8"}
    for (t0, st0), (t1, _) in itertools.pairwise(timeline):
        stage = st0["rollouts"].get(summary["student"], (None,))[0]
        training = any(j["status"] == "running" for j in st0["jobs"])
        color = stage_colors.get(stage) or ("#bcf" if training else None)
        if color:
            mix.axvspan(t0 / 60, t1 / 60, color=color, alpha=0.5, lw=0)
    if summary["event_s"] is not None:
        for ax in (mix, cost):
            ax.axvline(summary["event_s"] / 60, color="red", ls="--", label="new_traffic event")
    mix.set_ylabel("share")
    mix.legend(loc="upper left", fontsize=8)
    mix.set_title("blue: training, grey: shadow, yellow: canary, green: live")
    shifted = [s for s in sent if s.kind == "support-tickets" and s.status == 200]
    cost.plot([s.t / 60 for s in shifted],
              [costs.get(s.id, 0.0) for s in shifted], ".", ms=3)  # fmt: skip
    cost.set_ylabel("cost per support request")
    cost.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = args.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    config = write_config(args, store, metrics_port)
    url = f"http://127.0.0.1:{port}"
    argv_ = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
             "--store", str(store), "--port", str(port), "--adapt"]  # fmt: skip
    with process("gateway", argv_, f"{url}/ready", 900):
        wall0 = time.time()
        sent, timeline, switch = asyncio.run(drive(args, url, store))
        summary_student = next((j["student"] for _, st in timeline for j in st["jobs"]
                                if j["student"]), None)  # fmt: skip
        asked = [s.prompt for s in sent[-400:] if s.kind == "support-tickets"
                 and s.model == summary_student]  # fmt: skip
        teacher_answers = dict(zip(asked, ask_teacher(url, asked), strict=True))
    costs = logged_costs(store)
    summary = summarise(args, sent, timeline, switch, wall0, teacher_answers, costs)
    summary["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "adapt.json").write_text(json.dumps(
        {"summary": summary, "sent": [asdict(s) for s in sent]}, indent=1))  # fmt: skip
    plot(args.out / "adapt_timeline.png", sent, timeline, summary, costs)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
