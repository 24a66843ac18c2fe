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
from importlib.resources import files
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.tasks.base import Example, Kind, Split, TaskError, check_split, normalise

# Package data (pyproject's package-data), so an installed wheel has it too.
DATA = Path(str(files("models.tasks").joinpath("data", "general_knowledge.jsonl")))


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


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    text = tokenizer.apply_chat_template(
        example.messages(), add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _chunk_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> list[tuple[float, int]]:
    """Summed option log-probabilities for a few examples. Each question is run once and
    its KV cache copied to its options (4x less compute than one sequence per option)."""
    pad = tokenizer.pad_token_id
    ids, mask = _left_padded([_prompt_ids(tokenizer, e) for e in examples], pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    owner = [i for i, e in enumerate(examples) for _ in e.choices]
    options = [
        tokenizer(o, add_special_tokens=False)["input_ids"] for e in examples for o in e.choices
    ]
    first = torch.log_softmax(out.logits[owner, -1].float(), -1)
    scores = [float(first[row, option[0]]) for row, option in enumerate(options)]
    if max(map(len, options)) > 1:
        cache = out.cache
        cache.reorder_cache(torch.tensor(owner))
        rest, rest_mask = _right_padded([o[:-1] for o in options], pad)
        full_mask = torch.cat([mask[owner], rest_mask], dim=1)
        start = mask[owner].sum(-1, keepdim=True)
        rest_positions = start + torch.arange(rest.shape[1])
        logits = model(input_ids=rest, attention_mask=full_mask, position_ids=rest_positions,
                       cache=cache).logits  # fmt: skip
        for row, option in enumerate(options):
            if len(option) > 1:
                steps = torch.log_softmax(logits[row, : len(option) - 1].float(), -1)
                scores[row] += float(steps[torch.arange(len(option) - 1), option[1:]].sum())
    return [(score, len(option)) for score, option in zip(scores, options, strict=True)]


@torch.inference_mode()
def option_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
) -> list[list[tuple[float, int]]]:
    """(summed log-probability, token count) of each option of each example."""
    model.eval()
    out: list[list[tuple[float, int]]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        flat = _chunk_scores(model, tokenizer, chunk)
        for example in chunk:
            out.append(flat[: len(example.choices)])
            flat = flat[len(example.choices) :]
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
