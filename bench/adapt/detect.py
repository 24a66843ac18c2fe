"""Shift detection on replayed traffic (no model needed): streams built from the built-in
tasks' prompts (all splits), four user templates written here, and varied general
questions, routed by the real domain detector fitted on the tasks that have students
(finance-headlines, support-tickets); a request routed to a student's domain is served by
that student, any other by the teacher. Per seed:

 (a) a user template absent before rises to 10% of traffic at a switch point: requests
     from the switch to the new_traffic event for its fingerprint(s);
 (b) the same at 3%;
 (c) support-tickets' share doubles, 20% -> 40% (finance 40 -> 30, general 40 -> 30):
     requests to its mix_change event, hits within 500;
 (d) 20,000 stationary requests (finance 40%, support 20%, general 40%): every event is a
     false alarm;
 (e) the finance student's audited agreement drops from 0.92 to 0.60: requests to its
     degradation event.
Students are audited on 10% of their requests; agreement is exact match of a label, so
each audit is 1 with the student's accuracy and 0 otherwise. Also the fingerprint's cost
per request and the detectors' update cost per request.

    .venv/bin/python -m bench.adapt.detect [--seeds 20] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.adapt.detectors import DetectorConfig, Detectors, Observation
from gateway.adapt.fingerprint import fingerprint
from gateway.adapt.records import ShiftEvent
from gateway.routing.domains import GENERAL, fit_for
from gateway.routing.router import request_text
from models.tasks import get_task

STUDENTS = ("finance-headlines", "support-tickets")
AGREE = {"finance-headlines": 0.92, "support-tickets": 0.88}  # a student's audit accuracy
AUDIT_SHARE = 0.10
BASE = {"finance-headlines": 0.4, "support-tickets": 0.2, GENERAL: 0.4}
Messages = list[dict[str, str]]

# --- user templates: each makes one request from a random generator ---------------------

FIRST = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai",
         "Lea", "Mo", "Nia", "Otto", "Pia", "Raj", "Sol", "Tao", "Uma", "Vik", "Wen")  # fmt: skip
LAST = ("Adler", "Brandt", "Costa", "Dube", "Evans", "Fox", "Gill", "Horvat", "Ito", "Jensen",
        "Kowal", "Lund", "Mensah", "Nair", "Ortiz", "Park", "Quinn", "Rossi", "Sato")  # fmt: skip
ORGS = ("Acme Tools", "Blue Fern Studio", "Cobalt Dental", "Delta Freight", "Evergreen Law",
        "Fieldhouse Gym", "Granite Roofing", "Harbor Bakery", "Iris Optics", "Juno Travel",
)  # fmt: skip
THINGS = ("the garden chairs", "our quarterly report", "a birthday cake", "the train tickets",
          "my grandmother's recipe", "the new library", "a red bicycle", "the museum tour",
          "three cups of coffee", "the wedding photos", "an old map", "the school concert",
          "the hotel room", "a warm jacket", "the project deadline", "the city park")  # fmt: skip
VERBS = ("I would like to book", "We forgot", "She is looking for", "They finally found",
         "Please bring", "He painted", "Do you remember", "We need to cancel",
         "The children loved", "I have never seen", "Can you describe", "Nobody mentioned",
)  # fmt: skip
WHEN = ("tomorrow morning", "last summer", "before the meeting", "next weekend", "today",
        "after lunch", "in the evening", "on Tuesday", "during the holidays", "")  # fmt: skip
GOODS = ("wireless earbuds", "standing desk", "rice cooker", "yoga mat", "electric kettle",
         "hiking boots", "phone case", "desk lamp", "water bottle", "office chair",
         "board game", "air fryer", "mechanical keyboard", "sleeping bag", "espresso grinder",
)  # fmt: skip
GOOD = ("works exactly as described", "the build quality is excellent", "setup took minutes",
        "battery life is impressive", "my kids use it every day", "worth every cent",
        "it looks great in the kitchen", "arrived earlier than promised")  # fmt: skip
BAD = ("stopped working after a week", "smells of cheap plastic", "the instructions are "
       "useless", "it is much smaller than the photos", "broke on the first use",
       "the colour faded fast", "far too noisy", "the lid never closes properly")  # fmt: skip
TOPICS = ("a bulk order for our offices", "the delivery window next month", "pricing for "
          "the enterprise tier", "an invoice that lists the wrong VAT number", "a demo for "
          "our finance team", "renewing the contract early", "adding ten more licences",
          "the onboarding workshop", "a discount for a three-year term")  # fmt: skip


def contact_json(rng: random.Random) -> Messages:
    name, org = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(ORGS)
    email = f"{name.split()[0].lower()}@{org.split()[0].lower()}.example"
    phone = f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 99999)}"
    text = rng.choice((
        f"Hi, this is {name} from {org}. Reach me at {email} or {phone}.",
        f"Please call {name} ({org}) on {phone} about the quote.",
        f"Thanks for the call!\nBest regards,\n{name}\n{org}\n{phone}\n{email}",
        f"{name} | {org} | {email}",
    ))  # fmt: skip
    return [
        {"role": "system", "content": "You are a data extraction service. Reply with one "
         "JSON object and nothing else."},
        {"role": "user", "content": 'Extract the contact details from the text below as JSON '
         'with the keys "name", "email" and "phone" (null when missing).\nText: ' + text},
    ]  # fmt: skip


def translate(rng: random.Random) -> Messages:
    sentence = f"{rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(WHEN)}".strip()
    return [{"role": "user", "content": f"Translate to French: {sentence}."}]


def review(rng: random.Random) -> Messages:
    parts = rng.sample(GOOD, rng.randint(0, 2)) + rng.sample(BAD, rng.randint(0, 2))
    rng.shuffle(parts)
    body = ". ".join(parts or [rng.choice(GOOD)]).capitalize() + "."
    if rng.random() < 0.2:
        body += f"\n{rng.choice(('Would buy again', 'Returning it', 'Meh'))}."
    return [{"role": "user", "content": "What is the sentiment of this product review? "
             f"Answer positive, negative or mixed.\nProduct: {rng.choice(GOODS)}\n"
             f"Review: {body}\nSentiment:"}]  # fmt: skip


def email_summary(rng: random.Random) -> Messages:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    lines = [f"{rng.choice(('Hi', 'Hello', 'Dear'))} team,",
             f"I am writing about {rng.choice(TOPICS)}.",
             f"Could someone get back to me {rng.choice(WHEN) or 'soon'}?",
             "Kind regards,", name, rng.choice(ORGS)]  # fmt: skip
    if rng.random() < 0.2:  # an item line that reads as a label: a second fingerprint
        lines.insert(0, f"Subject: {rng.choice(TOPICS)}")
    return [
        {"role": "system", "content": "You are an assistant for the sales team at Brightline."},
        {"role": "user", "content": "Summarise the customer email below in one sentence for "
         "the CRM.\n\n" + "\n".join(lines)},
    ]  # fmt: skip


USER_TEMPLATES: dict[str, Callable[[random.Random], Messages]] = {
    "contact-json": contact_json, "translate-fr": translate,
    "review-sentiment": review, "email-summary": email_summary,
}  # fmt: skip

# --- varied general questions, single lines in many frames ------------------------------

FRAMES = (
    "How do I {task} in {lang}?", "Explain {concept} in simple terms.",
    "What is the difference between {concept} and {concept2}?",
    "Write a short poem about {topic} in the style of {poet}.",
    "Can you recommend a good book about {topic}?", "Why is {concept} important for {who}?",
    "What should I pack for a trip to {place} in {month}?",
    "What are the health benefits of {food}?", "How long should I cook {food} in {pot}?",
    "Give me some tips for {activity} as a {level}.", "Who invented {invention} and why?",
    "Plan a weekend in {place} for someone who likes {topic}.",
    "Is {activity} a good way to relax after work?", "How does {concept} relate to {topic}?",
    "What is the history of {invention} in {place}?", "Tell me a fun fact about {place}.",
    "Compare {food} and {food2} for a healthy breakfast.",
    "What is a good gift for a friend who loves {activity}?",
)  # fmt: skip
FILL = {
    "task": ("reverse a list", "read a CSV file", "sort a dictionary", "parse dates",
             "write unit tests", "handle exceptions", "make an HTTP request", "use regex",
             "read environment variables", "format strings", "spawn a thread", "log errors"),
    "lang": ("Python", "Rust", "Go", "JavaScript", "Java", "C#", "Ruby", "Kotlin", "Swift"),
    "concept": ("inflation", "photosynthesis", "compound interest", "machine learning",
                "entropy", "supply and demand", "the immune system", "plate tectonics",
                "blockchain", "climate change", "gravity", "democracy", "recursion",
                "natural selection", "the water cycle", "opportunity cost", "encryption",
                "the placebo effect", "interest rates", "evolution of language"),
    "topic": ("the ocean", "autumn", "friendship", "the night sky", "old bridges", "coffee",
              "city life", "mountains", "robots", "jazz", "gardening", "the Roman empire",
              "street food", "trains", "winter mornings", "libraries"),
    "poet": ("a limerick", "a sonnet", "haiku", "Emily Dickinson", "a sea shanty",
             "free verse", "a nursery rhyme", "Walt Whitman"),
    "who": ("small businesses", "students", "farmers", "doctors", "city planners",
            "investors", "teachers"),
    "place": ("Lisbon", "Kyoto", "Iceland", "Peru", "Morocco", "Vienna", "New Zealand",
              "Vietnam", "Scotland", "Chile", "Tasmania", "Quebec", "Ghana", "Norway",
              "Sicily", "Mongolia"),
    "month": ("January", "March", "April", "July", "October", "December", "the spring",
              "the rainy season"),
    "food": ("lentils", "salmon", "brown rice", "spinach", "quinoa", "chickpeas", "oats",
             "broccoli", "sweet potatoes", "eggs", "tofu", "barley"),
    "pot": ("a pressure cooker", "the oven", "a slow cooker", "a frying pan"),
    "activity": ("running", "learning the piano", "public speaking", "saving money",
                 "baking bread", "meditation", "chess", "photography", "rock climbing",
                 "birdwatching", "knitting", "swimming"),
    "level": ("beginner", "busy parent", "retiree", "student"),
    "invention": ("the telephone", "the printing press", "the bicycle", "paper money",
                  "the compass", "the light bulb", "the internet", "antibiotics",
                  "the steam engine", "the microscope"),
}  # fmt: skip


def general_question(rng: random.Random) -> str:
    values = {k: rng.sample(v, 2) for k, v in FILL.items()}
    firsts = {k: v[0] for k, v in values.items()}
    return rng.choice(FRAMES).format(**firsts, concept2=values["concept"][1],
                                     food2=values["food"][1])  # fmt: skip


# --- routed pools and streams ------------------------------------------------------------


@dataclass(frozen=True)
class Routed:
    """A request as the log records it: its fingerprint and where the router sent it."""

    fingerprint: str
    domain: str
    confidence: float
    model: str
    role: str


def pools(n_user: int = 600, n_general: int = 8000) -> tuple[dict[str, list[Routed]], float]:
    """Every source's requests, fingerprinted and routed once (the streams draw from them)."""
    detector, accuracy = fit_for(STUDENTS)

    def route(messages: Sequence[Mapping[str, str]]) -> Routed:
        d = detector.detect(request_text(messages))
        served = d.domain in STUDENTS
        model, role = (f"student-{d.domain}", "student") if served else ("teacher", "teacher")
        return Routed(fingerprint(messages), d.domain, d.confidence, model, role)

    out = {}
    for name in STUDENTS:
        task = get_task(name)
        out[name] = [route(e.messages()) for s in ("train", "validation", "test")
                     for e in task.examples(s)]  # fmt: skip
    probe = [e for s in ("validation", "test") for e in get_task("general-knowledge").examples(s)]
    rng = random.Random(0)
    general = {general_question(rng) for _ in range(n_general)}
    out[GENERAL] = [route(e.messages()) for e in probe] + [
        route([{"role": "user", "content": q}]) for q in sorted(general)
    ]
    for name, make in USER_TEMPLATES.items():
        out[name] = [route(make(rng)) for _ in range(n_user)]
    return out, accuracy


@dataclass
class Phase:
    """`n` requests drawn from sources by share; `agree` overrides students' accuracy."""

    n: int
    mix: dict[str, float]
    agree: dict[str, float] = field(default_factory=dict)


def stream(pool: dict[str, list[Routed]], phases: list[Phase], seed: int) -> Iterator[Observation]:
    rng = random.Random(seed)
    i = 0
    for phase in phases:
        names, weights = list(phase.mix), list(phase.mix.values())
        agree = {**AGREE, **phase.agree}
        for _ in range(phase.n):
            r = rng.choice(pool[rng.choices(names, weights)[0]])
            audited = r.role == "student" and rng.random() < AUDIT_SHARE
            score = float(rng.random() < agree[r.domain]) if audited else None
            i += 1
            yield Observation(i, float(i), f"r{i}", r.model, r.role, r.domain, r.confidence,
                              r.fingerprint, "success", score)  # fmt: skip


def rising(new: str, share: float) -> dict[str, float]:
    return {**{k: v * (1 - share) for k, v in BASE.items()}, new: share}


def replay(observations: Iterator[Observation], detectors: Detectors) -> list[ShiftEvent]:
    return [e for obs in observations for e in detectors.update(obs)]


# --- scenarios ---------------------------------------------------------------------------

PRE = 1500  # requests before a switch: the window fills and ADWIN settles


def first_after(events: list[ShiftEvent], kind: str, keys: set[str], switch: int) -> float:
    ats = [e.at_id - switch for e in events if e.kind == kind and e.key in keys
           and e.at_id > switch]  # fmt: skip
    return float(min(ats)) if ats else float("inf")


def new_traffic(pool: dict[str, list[Routed]], share: float, seeds: int,
                config: DetectorConfig, horizon: int = 3000) -> dict:  # fmt: skip
    delays, false, other = [], 0, Counter()
    by_template: dict[str, list[float]] = {}
    names = list(USER_TEMPLATES)
    for seed in range(seeds):
        new = names[seed % len(names)]
        fps = {r.fingerprint for r in pool[new]}
        phases = [Phase(PRE, BASE), Phase(horizon, rising(new, share))]
        events = replay(stream(pool, phases, seed), Detectors(config))
        delays.append(first_after(events, "new_traffic", fps, PRE))
        by_template.setdefault(new, []).append(delays[-1])
        false += sum(e.kind == "new_traffic" and e.key not in fps for e in events)
        other.update(e.kind for e in events if e.kind != "new_traffic")
    return {**summary(delays), "false_new_traffic": false, "other_events": dict(other),
            "by_template": {k: summary(v) for k, v in by_template.items()}}  # fmt: skip


def mix_change(pool: dict[str, list[Routed]], seeds: int, config: DetectorConfig,
               within: int = 500, horizon: int = 1500) -> dict:  # fmt: skip
    after = {"finance-headlines": 0.3, "support-tickets": 0.4, GENERAL: 0.3}
    delays, keys = [], Counter()
    for seed in range(seeds):
        phases = [Phase(2000, BASE), Phase(horizon, after)]
        events = replay(stream(pool, phases, 1000 + seed), Detectors(config))
        delays.append(first_after(events, "mix_change", {"support-tickets"}, 2000))
        keys.update(e.key for e in events if e.kind == "mix_change" and e.at_id > 2000)
    hits = sum(d <= within for d in delays) / len(delays)
    return {**summary(delays), f"hit_rate_{within}": hits, "mix_change_keys": dict(keys)}


def peak_count(observations: list[Observation], config: DetectorConfig) -> int:
    """The most teacher-served requests of one fingerprint in any window: the margin to
    min_count (every teacher-served request here is uncovered)."""
    window: deque[str | None] = deque()
    counts: Counter[str | None] = Counter()
    peak = 0
    for obs in observations:
        fp = obs.fingerprint if obs.role == "teacher" else None
        window.append(fp)
        counts[fp] += 1
        if len(window) > config.window:
            counts[window.popleft()] -= 1
        if fp is not None:
            peak = max(peak, counts[fp])
    return peak


def stationary(pool: dict[str, list[Routed]], seeds: int, config: DetectorConfig,
               n: int = 20_000) -> dict:  # fmt: skip
    kinds: Counter[str] = Counter()
    spent = updates = peak = 0
    for seed in range(seeds):
        detectors = Detectors(config)
        observations = list(stream(pool, [Phase(n, BASE)], 2000 + seed))
        start = time.perf_counter_ns()
        events = replay(iter(observations), detectors)
        spent += time.perf_counter_ns() - start
        updates += len(observations)
        kinds.update(e.kind for e in events)
        peak = max(peak, peak_count(observations, config))
    return {"requests": n, "events": sum(kinds.values()), "by_kind": dict(kinds),
            "peak_fingerprint_count": peak,
            "update_us_per_request": spent / updates / 1e3}  # fmt: skip


def degradation(pool: dict[str, list[Routed]], seeds: int, config: DetectorConfig,
                pre: int = 6000, horizon: int = 6000) -> dict:  # fmt: skip
    key = "student-finance-headlines/finance-headlines"
    delays, audits = [], []
    for seed in range(seeds):
        phases = [Phase(pre, BASE), Phase(horizon, BASE, {"finance-headlines": 0.60})]
        observations = list(stream(pool, phases, 3000 + seed))
        events = replay(iter(observations), Detectors(config))
        delays.append(first_after(events, "degradation", {key}, pre))
        end = pre + delays[-1] if delays[-1] != float("inf") else len(observations)
        audits.append(sum(o.agreement is not None and o.domain == "finance-headlines"
                          for o in observations[pre:int(end)]))  # fmt: skip
    return {**summary(delays), "audits_median": statistics.median(audits)}


def summary(delays: list[float]) -> dict:
    found = [d for d in delays if d != float("inf")]
    ranked = np.array(delays)  # a miss is inf; quantiles by the empirical CDF, so 19th of 20
    return {"median": float(np.quantile(ranked, 0.5, method="inverted_cdf")),
            "p95": float(np.quantile(ranked, 0.95, method="inverted_cdf")),
            "detected": f"{len(found)}/{len(delays)}"}  # fmt: skip


def fingerprint_cost(pool_requests: list[Messages], runs: int = 5, calls: int = 10) -> dict:
    """Per request: the mean of `calls` back-to-back calls; per run: the median over the
    requests; reported: the median of the runs' medians (and the p99 of the last run)."""
    medians, per = [], np.empty(len(pool_requests))
    for _ in range(runs):
        for i, messages in enumerate(pool_requests):
            start = time.perf_counter_ns()
            for _ in range(calls):
                fingerprint(messages)
            per[i] = (time.perf_counter_ns() - start) / calls / 1e3
        medians.append(float(np.median(per)))
    return {"median_us": statistics.median(medians), "p99_us": float(np.percentile(per, 99)),
            "runs_us": [round(m, 2) for m in medians], "requests": len(pool_requests)}  # fmt: skip


def timing_requests(per_source: int = 300) -> list[Messages]:
    rng = random.Random(1)
    out = [e.messages() for name in (*STUDENTS, "general-knowledge")
           for e in get_task(name).examples("test", per_source)]  # fmt: skip
    out += [[{"role": "user", "content": general_question(rng)}] for _ in range(per_source)]
    for make in USER_TEMPLATES.values():
        out += [make(rng) for _ in range(per_source)]
    return out


def fingerprint_spread(pool: dict[str, list[Routed]]) -> dict:
    """Per source: distinct fingerprints, the top one's share, and where it was routed."""
    rows = {}
    for name, items in pool.items():
        counts = Counter(r.fingerprint for r in items)
        routed = Counter(r.domain if r.role == "student" else "teacher" for r in items)
        rows[name] = {"requests": len(items), "fingerprints": len(counts),
                      "top_share": counts.most_common(1)[0][1] / len(items),
                      "served": dict(routed)}  # fmt: skip
    owners = Counter(fp for items in pool.values() for fp in {r.fingerprint for r in items})
    rows["fingerprints_in_two_sources"] = sum(c > 1 for c in owners.values())
    return rows


def table(figures: dict) -> str:
    a, b, c, d, e = (figures[k] for k in ("a", "b", "c", "d", "e"))
    fp, seeds = figures["fingerprint_cost"], figures["seeds"]

    def row(name: str, x: dict, note: str) -> str:
        return f"{name:50s} {x['median']:7.0f} {x['p95']:7.0f} {x['detected']:>7s}   {note}"

    templates = ", ".join(f"{k} {v['median']:.0f}/{w['median']:.0f}"
                          for (k, v), w in zip(a["by_template"].items(),
                                               b["by_template"].values(), strict=True))  # fmt: skip
    return "\n".join([
        f"{'requests from the switch to the event (' + str(seeds) + ' seeds)':50s} "
        f"{'median':>7s} {'p95':>7s} {'found':>7s}",
        row("(a) new template at 10% -> new_traffic", a, "target 150 / 300"),
        row("(b) new template at 3% -> new_traffic", b, "target 600 (median)"),
        f"    medians by template, 10%/3%: {templates}",
        row("(c) support 20% -> 40% -> mix_change", c,
            f"within 500: {c['hit_rate_500']:.0%}"),
        f"(d) stationary, {d['requests']} requests x {seeds} seeds: {d['events']} events "
        f"{d['by_kind'] or ''}(peak uncovered count of one fingerprint in a window: "
        f"{d['peak_fingerprint_count']}; min_count {figures['config']['min_count']})",
        row("(e) finance agreement .92 -> .60 -> degradation", e,
            f"{e['audits_median']:.0f} audits (median)"),
        f"false new_traffic in (a)/(b): {a['false_new_traffic']}/{b['false_new_traffic']}; "
        f"other events in (a): {a['other_events']}, (b): {b['other_events']}",
        f"fingerprint: {fp['median_us']:.1f} us median per request (runs {fp['runs_us']}, "
        f"p99 {fp['p99_us']:.1f} us, {fp['requests']} requests)",
        f"detector update: {d['update_us_per_request']:.1f} us per request",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    pool, accuracy = pools()
    config = DetectorConfig()
    figures = {
        "seeds": args.seeds,
        "config": config.model_dump(),
        "detector_accuracy": accuracy,
        "spread": fingerprint_spread(pool),
        "a": new_traffic(pool, 0.10, args.seeds, config),
        "b": new_traffic(pool, 0.03, args.seeds, config),
        "c": mix_change(pool, args.seeds, config),
        "d": stationary(pool, args.seeds, config),
        "e": degradation(pool, args.seeds, config),
        "fingerprint_cost": fingerprint_cost(timing_requests()),
    }
    figures["runtime_s"] = time.perf_counter() - start
    print(json.dumps(figures["spread"], indent=1))
    print(table(figures))
    print(f"runtime {figures['runtime_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
