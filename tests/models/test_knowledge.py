"""The general-knowledge probe: a valid hand-written item file, stable disjoint splits,
option log-likelihoods that batching does not change, and a teacher clearly above chance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.evaluate import bootstrap_ci
from models.tasks import get_task
from models.tasks.knowledge import DATA, accuracy_by_loglik, choose, option_scores


def test_the_item_file_is_valid_and_balanced() -> None:
    items = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(items) >= 300
    assert len({i["id"] for i in items}) == len({i["question"] for i in items}) == len(items)
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4, item["id"]
    categories = Counter(i["category"] for i in items)
    assert set(categories) == {"geography", "science", "history", "arithmetic", "language",
                               "common sense"} and min(categories.values()) >= 40  # fmt: skip
    positions = Counter(i["answer"] for i in items)
    assert min(positions.values()) >= 0.18 * len(items)


def test_splits_are_stable_disjoint_and_cover_every_item() -> None:
    task, again = get_task("general-knowledge"), get_task("general-knowledge")
    ids = {s: [e.id for e in task.examples(s)] for s in ("train", "validation", "test")}
    assert ids["train"] == [] and not set(ids["validation"]) & set(ids["test"])
    assert len(ids["validation"]) + len(ids["test"]) == len(DATA.read_text().splitlines())
    assert ids["test"] == [e.id for e in again.examples("test")]
    example = task.examples("test", 1)[0]
    assert task.score(example, example.answer) == 1.0 and task.chance == 0.25


def _unbatched(model, tokenizer, example) -> list[float]:
    head = tokenizer.apply_chat_template(example.messages(), add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    out = []
    for option in example.choices:
        ids = head_ids + tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(head_ids), len(ids))))
    return out


def test_batched_option_scores_equal_one_at_a_time(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = get_task("general-knowledge").examples("test", 5)
    batched = option_scores(model, tokenizer, examples, batch_size=3)
    for example, scores in zip(examples, batched, strict=True):
        expected = _unbatched(model, tokenizer, example)
        np.testing.assert_allclose([s for s, _ in scores], expected, atol=1e-4)
    picks = choose(model, tokenizer, examples)
    assert picks == [int(np.argmax([s for s, _ in row])) for row in batched]
    accuracy = accuracy_by_loglik(model, tokenizer, examples)
    assert accuracy == [
        float(p == e.meta["answer_index"]) for p, e in zip(picks, examples, strict=True)
    ]


@pytest.mark.integration
def test_the_teacher_is_clearly_above_chance(teacher_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    scores = accuracy_by_loglik(
        model, tokenizer, get_task("general-knowledge").examples("validation")
    )
    interval = bootstrap_ci(scores, seed=0)
    assert interval.low > 0.30, interval  # chance is 0.25
