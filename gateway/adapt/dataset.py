"""A new traffic's task from the log: one fingerprint's logged requests labelled with the
teacher's logged answers, duplicates removed, split by time (the most recent rows are the
test split), written as a user JSONL task (models/tasks/jsonl.py) that the factory loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.adapt.log import TrafficLog
from gateway.adapt.records import TrafficRecord
from gateway.adapt.traffic_cli import Row, labelled

PAGE = 1_000
SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class BuiltTask:
    """A task written to `path`. `rows`: train, validation, test and skipped counts;
    `split`: first_ts, train_until_ts, validation_until_ts, last_ts (each split holds the
    rows up to and including its boundary's time); `skipped`: by reason."""

    path: Path
    name: str
    rows: dict[str, int]
    split: dict[str, float]
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shortfall:
    """Too few usable rows to build a task: `found` of the `needed`."""

    found: int
    needed: int
    skipped: dict[str, int] = field(default_factory=dict)


def _records(log: TrafficLog, fingerprint: str) -> Iterator[TrafficRecord]:
    """The fingerprint's rows with content, in id order, a page at a time."""
    after = 0
    while page := log.read(after, PAGE, fingerprint=fingerprint, content=True):
        yield from (s.record for s in page)
        after = page[-1].id


def usable_rows(log: TrafficLog, fingerprint: str, enough: int | None = None) -> int:
    """How many distinct labelled rows the fingerprint has; with `enough`, reading stops
    once that many are found (a cheap check, each cycle, whether a task can be built)."""
    return len(labelled(_records(log, fingerprint), enough)[0])


def split_by_time(
    rows: Sequence[Row], validation_share: float, test_share: float
) -> dict[str, list[Row]]:
    """Oldest rows to train, then validation, the most recent `test_share` to test: the
    student is measured on requests newer than any it learned from. Test gets at least
    one row; train keeps at least one."""
    ordered = sorted(rows, key=lambda r: r.ts)
    n = len(ordered)
    test = min(n - 1, max(1, round(n * test_share)))
    validation = min(n - 1 - test, round(n * validation_share))
    train = n - test - validation
    return {
        "train": ordered[:train],
        "validation": ordered[train : train + validation],
        "test": ordered[train + validation :],
    }


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\n" in name:
        raise ValueError(f"task name {name!r} must be a plain file name (no '/', no leading '.')")


def _check(name: str, min_rows: int, max_rows: int, validation: float, test: float) -> None:
    _check_name(name)
    if not 2 <= min_rows <= max_rows:
        raise ValueError(f"need 2 <= min_rows <= max_rows, got {min_rows} and {max_rows}")
    if not (0 <= validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError(
            f"need 0 <= validation_share, 0 < test_share, and their sum below 1; got "
            f"{validation} and {test}"
        )


def build_task(
    log: TrafficLog,
    fingerprint: str,
    *,
    name: str,
    out_dir: Path,
    min_rows: int,
    max_rows: int,
    validation_share: float,
    test_share: float,
) -> BuiltTask | Shortfall:
    """Write `out_dir/<name>.jsonl` from the fingerprint's most recent `max_rows` distinct
    labelled rows (the newest answer of a repeated prompt), split by time; a Shortfall,
    writing nothing, when fewer than `min_rows` are found. Reads every content row of the
    fingerprint (retention bounds them)."""
    _check(name, min_rows, max_rows, validation_share, test_share)
    records = sorted(_records(log, fingerprint), key=lambda r: r.ts)
    rows, skipped = labelled(reversed(records), max_rows)
    if len(rows) < min_rows:
        return Shortfall(len(rows), min_rows, skipped)
    splits = split_by_time(rows, validation_share, test_share)
    path = Path(out_dir) / f"{name}.jsonl"
    header = _header(name, fingerprint, splits)
    body = (
        {"id": r.id, "prompt": r.prompt, "answer": r.answer, "split": split}
        for split in SPLIT_NAMES
        for r in splits[split]
    )
    write_lines(path, [header, *body])
    counts = {s: len(splits[s]) for s in SPLIT_NAMES}
    return BuiltTask(path, name, {**counts, "skipped": sum(skipped.values())},
                     _boundaries(splits), fingerprint, skipped)  # fmt: skip


def _boundaries(splits: dict[str, list[Row]]) -> dict[str, float]:
    train, validation, test = (splits[s] for s in SPLIT_NAMES)
    return {
        "first_ts": train[0].ts,
        "train_until_ts": train[-1].ts,
        "validation_until_ts": validation[-1].ts if validation else train[-1].ts,
        "last_ts": test[-1].ts,
    }


def _header(name: str, fingerprint: str, splits: dict[str, list[Row]]) -> dict[str, Any]:
    n = sum(len(rows) for rows in splits.values())
    description = f"{n} logged teacher answers for traffic fingerprint {fingerprint}"
    return {"task": {"name": name, "description": description, "fingerprint": fingerprint}}


def rename_task(path: Path, new_name: str) -> None:
    """Give a built task a new name: only its header line changes (written atomically; a
    file without a header is given one). OSError when the file cannot be read."""
    _check_name(new_name)
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        raise ValueError(f"{path}: line 1 is not JSON; not a task file") from None
    if isinstance(first, dict) and isinstance(first.get("task"), dict):
        header, rest = first, lines[1:]
    else:
        header, rest = {"task": {}}, lines
    header["task"]["name"] = new_name
    write_lines(path, [header], rest)


def write_lines(path: Path, rows: Iterable[Any], raw: Iterable[str] = ()) -> None:
    """JSON `rows`, one a line, then `raw` lines as they are, written beside `path` and
    renamed into place: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
            for line in raw:
                stream.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
