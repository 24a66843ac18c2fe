"""A seeded generator of synthetic classification tasks: per-label phrasing templates with
slots, a pool of entities (companies, products) and random fillers and noise.

Example i of a split depends only on (task, split, i), never on the process. Splits are
disjoint by template and by entity: each label's templates and the entity pool are dealt
into train / validation / test (3 : 1 : 1 by position), so a test example never reuses a
phrasing or a company that training saw, and memorising the train split does not help.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from models.tasks.base import Example, Kind, Split, TaskError, check_split, match_label

DEFAULT_SIZES: dict[str, int] = {"train": 5000, "validation": 300, "test": 500}
_DEAL = ("train", "train", "train", "validation", "test")

Fill = Callable[[random.Random, Mapping[str, str]], dict[str, str]]
Noise = Callable[[random.Random, str], str]


def dealt(items: Sequence, split: Split) -> list:
    """The items that belong to `split` when dealt by position, 3 : 1 : 1."""
    return [item for i, item in enumerate(items) if _DEAL[i % len(_DEAL)] == split]


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    description: str
    instruction: str  # the question, before the label list
    field: str  # "Headline", "Message": how the input is introduced
    templates: Mapping[str, Sequence[str]]  # label -> phrasings with {slots}
    entities: Sequence[Mapping[str, str]]
    fill: Fill
    noise: Noise
    kind: Kind = "classification"

    def __post_init__(self) -> None:
        few = [label for label, t in self.templates.items() if len(t) < len(_DEAL)]
        if few or len(self.entities) < len(_DEAL):
            raise ValueError(f"{self.name}: every split needs a template and an entity {few}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.templates)

    @property
    def chance(self) -> float:
        return 1 / len(self.labels)

    def size(self, split: Split) -> int | None:
        check_split(split)
        return None

    def prompt(self, text: str) -> str:
        options = ", ".join(self.labels)
        return f"{self.instruction} Answer with one of: {options}.\n{self.field}: {text}"

    def example(self, split: Split, i: int) -> Example:
        rng = random.Random(f"{self.name}:{split}:{i}")
        label = self.labels[i % len(self.labels)]
        phrasings = dealt(list(enumerate(self.templates[label])), split)
        template_id, template = rng.choice(phrasings)
        entity_id, entity = rng.choice(dealt(list(enumerate(self.entities)), split))
        text = self.noise(rng, template.format(**self.fill(rng, entity)))
        meta = {"label": label, "template": f"{label}/{template_id}", "entity": entity_id}
        return Example(f"{self.name}/{split}/{i}", self.prompt(text), label, meta=meta)

    def examples(self, split: Split, n: int | None = None) -> list[Example]:
        check_split(split)
        count = DEFAULT_SIZES[split] if n is None else n
        if count < 0:
            raise TaskError(f"number of examples must be >= 0, got {count}")
        return [self.example(split, i) for i in range(count)]

    def score(self, example: Example, output: str) -> float:
        return float(match_label(output, self.labels) == example.answer)
