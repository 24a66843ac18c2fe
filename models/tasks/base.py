"""What a task is: examples (a chat prompt, a reference answer, options for multiple
choice) drawn from fixed train/validation/test splits, and a scorer for a model's output.

Classification tasks are scored on the generated text (the label it names); multiple-choice
tasks are scored by option log-likelihood (models/tasks/knowledge.py), so `score` there
takes the index of the option the model ranked first, rendered as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
Kind = Literal["classification", "multiple_choice"]


class TaskError(ValueError):
    """A task name, split, size or task file that cannot be used; the message says which."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    answer: str | None = None
    choices: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def messages(self) -> list[dict[str, str]]:
        """The chat a model is asked (one user turn; the chat template adds the rest)."""
        return [{"role": "user", "content": self.prompt}]

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "answer": self.answer}
        if self.choices:
            row["choices"] = list(self.choices)
        if self.meta:
            row["meta"] = self.meta
        return row


class Task(Protocol):
    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]  # classification labels; () for multiple choice

    @property
    def chance(self) -> float: ...

    def examples(self, split: Split, n: int | None = None) -> list[Example]:
        """The first `n` examples of `split` (all when None), the same on every call."""
        ...

    def size(self, split: Split) -> int | None:
        """How many examples `split` holds; None when generated without limit."""
        ...

    def score(self, example: Example, output: str) -> float:
        """1.0 when `output` is the reference answer, else 0.0."""
        ...


_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def match_label(output: str, labels: tuple[str, ...]) -> str | None:
    """The label an output names: an exact match after normalising case and punctuation,
    else the label the output starts with, else the only label it contains (the longest
    wins when labels nest, e.g. "guidance raised" within "guidance raised again")."""
    said = normalise(output)
    by_form = {normalise(label): label for label in labels}
    if said in by_form:
        return by_form[said]
    for form in sorted(by_form, key=len, reverse=True):
        if said.startswith(form + " ") or said == form:
            return by_form[form]
    inside = [form for form in by_form if re.search(rf"\b{re.escape(form)}\b", said)]
    if len(inside) == 1:
        return by_form[inside[0]]
    return None


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise TaskError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split  # type: ignore[return-value]
