"""`general-knowledge`: a hand-written multiple-choice probe (geography, science, history,
arithmetic, language, common sense; models/tasks/data/general_knowledge.jsonl), scored by
option log-likelihood, to measure what compression erases.

It is for evaluation only: we never distil on it, so there is no train split; items are
dealt about 20% validation, 80% test by a hash of their id. A model's choice is the option
whose tokens have the highest summed log-probability as its reply to the question (the
`acc` of lm-evaluation-harness; `normalise_length=True` gives the per-token mean).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.tasks.base import Example, Kind, Split, TaskError, check_split, normalise

DATA = Path(__file__).parent / "data" / "general_knowledge.jsonl"


def _split_of(item_id: str) -> Split:
    bucket = int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) % 5
    return "validation" if bucket == 0 else "test"


@dataclass(frozen=True)
class GeneralKnowledge:
    rows: dict[str, tuple[Example, ...]]
    name: str = "general-knowledge"
    kind: Kind = "multiple_choice"
    description: str = "hand-written 4-option questions on general knowledge, by log-likelihood"
    labels: tuple[str, ...] = ()

    @property
    def chance(self) -> float:
        return 0.25

    def size(self, split: Split) -> int | None:
        return len(self.rows[check_split(split)])

    def examples(self, split: Split, n: int | None = None) -> list[Example]:
        rows = self.rows[check_split(split)]
        return list(rows if n is None else rows[:n])

    def score(self, example: Example, output: str) -> float:
        return float(normalise(output) == normalise(example.answer or ""))


def general_knowledge(path: Path = DATA) -> GeneralKnowledge:
    rows: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror}") from None
    for line in lines:
        item = json.loads(line)
        example = Example(
            item["id"],
            item["question"],
            item["choices"][item["answer"]],
            tuple(item["choices"]),
            {"category": item["category"], "answer_index": item["answer"]},
        )
        rows[_split_of(item["id"])].append(example)
    return GeneralKnowledge({split: tuple(items) for split, items in rows.items()})


def _pairs(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]):
    """(prompt ids, option ids) for every option of every example, in order."""
    for example in examples:
        text = tokenizer.apply_chat_template(
            example.messages(), add_generation_prompt=True, tokenize=False
        )
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        for option in example.choices:
            yield head, tokenizer(option, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def option_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 32,
) -> list[list[tuple[float, int]]]:
    """(summed log-probability, token count) of each option of each example."""
    model.eval()
    pairs = list(_pairs(tokenizer, examples))
    scores: list[tuple[float, int]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        rows = [h + o for h, o in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_at, cols_at, targets = [], [], []
        for row, (head, option) in enumerate(chunk):
            rows_at += [row] * len(option)
            cols_at += range(len(head) - 1, len(head) + len(option) - 1)
            targets += option
        # the vocabulary projection only where an option token is predicted
        logits = model.lm_head(hidden[torch.tensor(rows_at), torch.tensor(cols_at)])
        picked = torch.log_softmax(logits.float(), -1)[torch.arange(len(targets)), targets]
        offset = 0
        for _, option in chunk:
            scores.append((float(picked[offset : offset + len(option)].sum()), len(option)))
            offset += len(option)
    out, offset = [], 0
    for example in examples:
        out.append(scores[offset : offset + len(example.choices)])
        offset += len(example.choices)
    return out


def choose(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    normalise_length: bool = False,
) -> list[int]:
    """The index of the option each example's model ranks first."""
    picks = []
    for options in option_scores(model, tokenizer, examples):
        values = [s / n if normalise_length else s for s, n in options]
        picks.append(max(range(len(values)), key=values.__getitem__))
    return picks


def accuracy_by_loglik(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    normalise_length: bool = False,
) -> list[float]:
    picks = choose(model, tokenizer, examples, normalise_length)
    return [float(p == e.meta["answer_index"]) for p, e in zip(picks, examples, strict=True)]
