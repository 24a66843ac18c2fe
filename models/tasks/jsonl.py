"""A user's own task from a JSONL file, and the export that writes any task's split in the
same format (so `tasks export` -> load round-trips).

One JSON object per line: {"prompt": str, "answer": str?, "choices": [str]?, "split":
"train"|"validation"|"test"?, "id": str?}. With `choices` the task is multiple choice and
`answer` must be one of them (all rows or none have choices); otherwise the labels are the
distinct answers. Rows without a split are dealt 80/10/10 by a hash of their prompt, so
the assignment is the same on every machine. An optional first line
{"task": {"name": ..., "description": ...}} names the task (default: the file's stem).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from models.tasks.base import (
    SPLITS,
    Example,
    Kind,
    Split,
    Task,
    TaskError,
    check_split,
    match_label,
    normalise,
)


def hashed_split(prompt: str) -> Split:
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class JsonlTask:
    name: str
    description: str
    kind: Kind
    labels: tuple[str, ...]
    rows: dict[str, tuple[Example, ...]]

    @property
    def chance(self) -> float:
        if self.kind == "multiple_choice":
            counts = [len(e.choices) for split in self.rows.values() for e in split]
            return sum(1 / c for c in counts) / max(1, len(counts))
        return 1 / max(1, len(self.labels))

    def size(self, split: Split) -> int | None:
        return len(self.rows[check_split(split)])

    def examples(self, split: Split, n: int | None = None) -> list[Example]:
        rows = self.rows[check_split(split)]
        return list(rows if n is None else rows[:n])

    def score(self, example: Example, output: str) -> float:
        if self.kind == "classification":
            return float(match_label(output, self.labels) == example.answer)
        return float(normalise(output) == normalise(example.answer or ""))


def _row(path: Path, number: int, data: Any) -> tuple[Split, Example]:
    where = f"{path}:{number}"
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise TaskError(f'{where}: each line needs a string "prompt"')
    answer, choices = data.get("answer"), data.get("choices")
    if answer is not None and not isinstance(answer, str):
        raise TaskError(f'{where}: "answer" must be a string')
    if choices is not None:
        if not (isinstance(choices, list) and len(choices) >= 2):
            raise TaskError(f'{where}: "choices" must be a list of at least 2 strings')
        if answer not in choices:
            raise TaskError(f"{where}: answer {answer!r} is not one of the choices")
    split = data.get("split") or hashed_split(data["prompt"])
    if split not in SPLITS:
        raise TaskError(f"{where}: unknown split {split!r}; use {', '.join(SPLITS)}")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    example = Example(
        str(data.get("id") or f"{path.stem}/{number}"), data["prompt"], answer,
        tuple(choices or ()), meta,
    )  # fmt: skip
    return split, example


def load_jsonl_task(path: str | Path) -> JsonlTask:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror}") from None
    name, description = path.stem, f"user task from {path.name}"
    rows: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if number == 1 and isinstance(data, dict) and isinstance(data.get("task"), dict):
            name = str(data["task"].get("name", name))
            description = str(data["task"].get("description", description))
            continue
        split, example = _row(path, number, data)
        rows[split].append(example)
    every = [e for split in rows.values() for e in split]
    if not every:
        raise TaskError(f"{path}: no examples")
    with_choices = {bool(e.choices) for e in every}
    if len(with_choices) > 1:
        raise TaskError(f'{path}: some rows have "choices" and some do not')
    kind: Kind = "multiple_choice" if with_choices == {True} else "classification"
    labels = (
        () if kind == "multiple_choice" else tuple(sorted({e.answer for e in every if e.answer}))
    )
    return JsonlTask(name, description, kind, labels, {s: tuple(v) for s, v in rows.items()})


def export_jsonl(task: Task, split: Split, n: int | None, stream: IO[str]) -> int:
    """Write `n` examples of `split` (all, or the default count) as loader-ready JSONL."""
    examples: Iterable[Example] = task.examples(check_split(split), n)
    written = 0
    for example in examples:
        stream.write(json.dumps({**example.to_json(), "split": split}) + "\n")
        written += 1
    return written
