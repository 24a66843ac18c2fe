"""Template fingerprints on real prompts: each built-in task's requests share one, tasks
never share one, bare general questions spread, user-style templates (written here) hold
together; the normalisation rules one by one; the documented limits; the cost."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from importlib.resources import files

import pytest

from gateway.adapt.fingerprint import fingerprint, template
from models.tasks import get_task

BUILT_IN = ("finance-headlines", "support-tickets")


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def task_requests(name: str, n: int = 400) -> list[list[dict[str, str]]]:
    if name == "general-knowledge":  # its rows, read without the task (which imports torch)
        data = files("models.tasks").joinpath("data", "general_knowledge.jsonl").read_text()
        return [user(json.loads(line)["question"]) for line in data.splitlines()][:n]
    task = get_task(name)
    return [e.messages() for split in ("train", "validation", "test")
            for e in task.examples(split, n)]  # fmt: skip


# User-style templates, as a program would send them: a fixed frame around changing items.
NAMES = ("Ana Costa", "Ben Ito", "Chloe Park", "Dev Nair", "Elif Quinn", "Femi Lund")
SENTENCES = ("I would like to book a table for 4 tomorrow.", "Where is the train station?",
             "The meeting moved to Tuesday at 10:30.", "We loved the \"blue\" room.",
             "Can you send me the invoice?", "My flight leaves at 7 pm.")  # fmt: skip
REVIEWS = ("Great kettle, boils in 2 minutes.", "Broke after a week.\nReturning it.",
           "Note: arrived late, but it works.", "Meh. It's fine I guess",
           "Best purchase of 2024!!!", "too loud\n\nand the lid leaks")  # fmt: skip


def contact_json(i: int) -> list[dict[str, str]]:
    name = NAMES[i % len(NAMES)]
    text = (f"Hi, I'm {name}, call me on +44 20 7946 0{i:03d}" if i % 2
            else f"Best,\n{name}\n{name.split()[0].lower()}@example.com")  # fmt: skip
    return [
        {"role": "system", "content": "You extract data. Reply with JSON only."},
        {"role": "user", "content": 'Extract "name", "email" and "phone" as JSON.\nText: '
         + text},
    ]  # fmt: skip


def translation(i: int) -> list[dict[str, str]]:
    return user(f"Translate to French: {SENTENCES[i % len(SENTENCES)]}")


def review(i: int) -> list[dict[str, str]]:
    return user("Is this review positive or negative? Answer with one word.\n"
                f"Review: {REVIEWS[i % len(REVIEWS)]}\nSentiment:")  # fmt: skip


USER_TEMPLATES = {"contact-json": contact_json, "translation": translation, "review": review}


def test_each_built_in_task_has_one_fingerprint_and_they_differ() -> None:
    seen = {name: Counter(map(fingerprint, task_requests(name))) for name in BUILT_IN}
    assert all(len(counts) == 1 for counts in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == len(BUILT_IN)


def test_general_questions_spread_over_many() -> None:
    requests = task_requests("general-knowledge", 1000)
    distinct = len(set(map(fingerprint, requests)))
    assert len(requests) > 300 and distinct >= 0.9 * len(requests), distinct


def test_user_templates_hold_together_and_apart() -> None:
    prints = {name: {fingerprint(make(i)) for i in range(24)}
              for name, make in USER_TEMPLATES.items()}  # fmt: skip
    assert all(len(p) == 1 for p in prints.values()), prints
    built_in = {fingerprint(task_requests(name, 1)[0]) for name in BUILT_IN}
    every = [p for s in prints.values() for p in s] + list(built_in)
    assert len(set(every)) == len(every)


def test_the_template_text_shows_what_is_kept() -> None:
    assert template(review(0)) == (
        "user: is this review positive or negative? answer with one word.\nreview:\nsentiment:"
    )
    assert template(translation(2)) == "user: translate to french:"
    assert template(contact_json(0)) == (
        'system: you extract data. reply with json only.\nuser: extract "…", "…" and "…" as '
        "json.\ntext:"
    )


def test_a_fingerprint_is_16_hex_digits() -> None:
    fp = fingerprint("hello")
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_a_completions_prompt_reads_as_one_user_message() -> None:
    prompt = "Classify this.\nHeadline: X beats estimates"
    assert fingerprint(prompt) == fingerprint(user(prompt))


def test_content_parts_read_as_their_text() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Translate to French: hi"}]}]
    assert fingerprint(parts) == fingerprint(translation(0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Summarise report Q3 2024.\nText: a", "Summarise report Q4 2025.\nText: b"),  # digits
        ('Rate "Acme" from 1-5.\nReview: a', 'Rate "Zeta Corp" from 1-5.\nReview: b'),  # quoted
        ("Rate 'Acme' please.\nReview: a", "Rate 'Zeta' please.\nReview: b"),  # single quotes
        ("CLASSIFY   this.\nHeadline: a", "classify this.\nheadline: B"),  # case, spaces
        ("Classify.\nHeadline: a", "Classify.\n\nHeadline: one\ntwo\nthree"),  # item lines
        ("Summarise the email below.\n\nHi,\nthanks", "Summarise the email below.\nHello"),
        ("Summarise:\nline one\nline two", "Summarise: one line"),
    ],
)
def test_what_a_template_ignores(a: str, b: str) -> None:
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Classify the sentiment.\nReview: a", "Classify the topic.\nReview: a"),
        ("Classify.\nReview: a", "Classify.\nHeadline: a"),
        ("What is the capital of France?", "What is the capital of Peru?"),
        ("King's Lane is where?", "Queen's Road is where?"),  # apostrophes are not quotes
        ("Translate to French: hi", "Translate to German: hi"),
        ("See http://a.example/x now", "See http://b.example/y now"),  # a URL is no label
    ],
)
def test_what_tells_templates_apart(a: str, b: str) -> None:
    assert fingerprint(a) != fingerprint(b)


def test_system_prompt_and_earlier_turns_are_kept_whole() -> None:
    def chat(system: str, earlier: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": earlier},
                {"role": "assistant", "content": "ok"}, *translation(0)]  # fmt: skip

    assert fingerprint(chat("Be brief.", "hi")) == fingerprint(chat("be  BRIEF.", "hi"))
    assert fingerprint(chat("Be brief.", "hi")) != fingerprint(chat("Be kind.", "hi"))
    assert fingerprint(chat("Be brief.", "hi")) != fingerprint(chat("Be brief.", "hello"))


def test_limit_item_first_templates_spread() -> None:
    """Documented limit: with the item before the instruction every request differs."""
    requests = [f"{r}\n\nIs the review above positive or negative?" for r in SENTENCES]
    assert len({fingerprint(r) for r in requests}) == len(requests)


def test_limit_an_item_line_that_looks_like_a_label_splits_a_template() -> None:
    """Documented limit: "Note: ..." inside an item reads as a label ("review:\\nnote:"
    is not "review:"), so one template can show as a few fingerprints."""
    a = "Rate this.\nReview: fine\nNote: it came late"
    assert fingerprint(a) != fingerprint("Rate this.\nReview: fine\nit came late")


def test_cost_per_request_is_within_20_us() -> None:
    """Median over the tasks' prompts of the per-call time (best of three rounds, since
    other processes share these cores)."""
    requests = [r for name in (*BUILT_IN, "general-knowledge") for r in task_requests(name, 60)]
    requests += [make(i) for make in USER_TEMPLATES.values() for i in range(60)]
    random.Random(0).shuffle(requests)
    rounds = []
    for _ in range(3):
        per_call = []
        for request in requests:
            start = time.perf_counter_ns()
            for _ in range(5):
                fingerprint(request)
            per_call.append((time.perf_counter_ns() - start) / 5 / 1e3)
        rounds.append(statistics.median(per_call))
    assert min(rounds) <= 20, rounds
