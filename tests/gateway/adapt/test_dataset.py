"""A new traffic's task built from a real SQLite traffic log: split by time (test the most
recent), duplicates, shadow answers and unaudited student rows left out, the newest
`max_rows` kept, a shortfall below `min_rows`, a rename, and the round trip through the
task loader."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.adapt.dataset import (
    BuiltTask,
    Row,
    Shortfall,
    build_task,
    rename_task,
    split_by_time,
    usable_rows,
)
from gateway.adapt.log import TrafficLog
from gateway.adapt.records import SHADOW, TrafficRecord
from models.tasks import get_task

T0 = 1_800_000_000.0
LABELS = ("positive", "negative", "neutral")


def record(i: int, prompt: str, answer: str | None, **changes: object) -> TrafficRecord:
    """A teacher-answered chat request logged at T0 + i (ids follow insertion order)."""
    base = TrafficRecord(
        ts=T0 + i, request_id=f"r{i}", endpoint="chat", requested_model="auto",
        model="teacher", role="teacher", fingerprint="fpA", outcome="success", status=200,
        latency_ms=10.0, slo_class="batch",
        request=json.dumps({"messages": [{"role": "user", "content": prompt}]}),
        response=answer,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[TrafficLog]:
    opened = TrafficLog.open(f"sqlite:///{tmp_path}/t.db")
    yield opened
    opened.close()


def build(log: TrafficLog, out: Path, **options: object) -> BuiltTask | Shortfall:
    settings = dict(name="fpA-task", out_dir=out, min_rows=4, max_rows=100,
                    validation_share=0.2, test_share=0.2)  # fmt: skip
    return build_task(log, "fpA", **{**settings, **options})  # type: ignore[arg-type]


def distinct(n: int, start: int = 0) -> list[TrafficRecord]:
    return [record(start + i, f"headline {start + i}", LABELS[i % 3]) for i in range(n)]


def test_rows_split_by_time_with_the_most_recent_as_test(log: TrafficLog, tmp_path: Path) -> None:
    # written out of time order: the split follows the timestamps, not the row ids
    rows = distinct(10)
    log.insert(rows[5:] + rows[:5])
    log.insert([record(50, "other template", "x", fingerprint="fpB")])
    built = build(log, tmp_path / "tasks")
    assert isinstance(built, BuiltTask)
    assert built.path == tmp_path / "tasks" / "fpA-task.jsonl" and built.fingerprint == "fpA"
    assert built.rows == {"train": 6, "validation": 2, "test": 2, "skipped": 0}
    assert built.split == {"first_ts": T0, "train_until_ts": T0 + 5,
                           "validation_until_ts": T0 + 7, "last_ts": T0 + 9}  # fmt: skip
    task = get_task(str(built.path))
    assert task.name == "fpA-task" and "fpA" in task.description
    ids = {s: [e.id for e in task.examples(s)] for s in ("train", "validation", "test")}
    assert ids == {"train": [f"r{i}" for i in range(6)], "validation": ["r6", "r7"],
                   "test": ["r8", "r9"]}  # fmt: skip
    assert task.labels == tuple(sorted(LABELS))
    first = task.examples("train", 1)[0]
    assert (first.prompt, first.answer) == ("headline 0", "positive")
    assert list(built.path.parent.glob(".*.tmp")) == []


def test_duplicates_shadow_failed_and_unaudited_rows_are_left_out(
    log: TrafficLog, tmp_path: Path
) -> None:
    student = dict(role="student", model="s1")
    log.insert([
        *distinct(6),
        record(10, "headline 1", " negative \n"),  # a repeat: its newest answer is kept
        record(11, "headline 2", "neutral", **student, route_reason=SHADOW,
               reference="neutral", agreement=1.0),  # a shadow answer, not a request
        record(12, "headline 7", "positive", **student),  # a student's answer, unaudited
        record(13, "headline 8", "negative", **student, reference="neutral"),  # audited
        record(14, "headline 9", "x", outcome="server_error", status=500),
        record(15, "headline 10", None, request=None),  # content not logged
    ])  # fmt: skip
    built = build(log, tmp_path)
    assert isinstance(built, BuiltTask)
    assert built.skipped == {"failed": 1, "no_content": 1, "no_teacher_answer": 1,
                             "unreadable": 0, "duplicate": 1, "shadow": 1}  # fmt: skip
    assert sum(built.rows[s] for s in ("train", "validation", "test")) == 7
    assert built.rows["skipped"] == 5
    task = get_task(str(built.path))
    every = {e.prompt: (e.id, e.answer) for s in ("train", "validation", "test")
             for e in task.examples(s)}  # fmt: skip
    assert every["headline 1"] == ("r10", "negative")  # the newest answer, at its time
    assert every["headline 8"] == ("r13", "neutral")  # the teacher's audit, not the student
    assert "headline 7" not in every and "headline 9" not in every
    assert [e.id for e in task.examples("validation")] == ["r10"]
    assert [e.id for e in task.examples("test")] == ["r13"]
    assert usable_rows(log, "fpA") == 7


def test_the_most_recent_max_rows_are_kept(log: TrafficLog, tmp_path: Path) -> None:
    log.insert(distinct(20))
    built = build(log, tmp_path, max_rows=10, validation_share=0.0, test_share=0.3)
    assert isinstance(built, BuiltTask)
    assert built.rows == {"train": 7, "validation": 0, "test": 3, "skipped": 0}
    assert built.split["first_ts"] == T0 + 10 and built.split["last_ts"] == T0 + 19
    assert built.split["validation_until_ts"] == built.split["train_until_ts"] == T0 + 16
    assert get_task(str(built.path)).size("validation") == 0


def test_too_few_rows_is_a_shortfall_and_writes_nothing(log: TrafficLog, tmp_path: Path) -> None:
    log.insert([*distinct(3), record(9, "headline 0", "positive")])
    assert build(log, tmp_path / "t") == Shortfall(
        3, 4, {"failed": 0, "no_content": 0, "no_teacher_answer": 0, "unreadable": 0,
               "duplicate": 1, "shadow": 0},
    )  # fmt: skip
    assert not (tmp_path / "t").exists()
    assert usable_rows(log, "fpA") == 3 and usable_rows(log, "nobody") == 0
    log.insert(distinct(5, start=20))
    assert usable_rows(log, "fpA", enough=4) == 4  # stops reading once enough are found
    assert isinstance(build(log, tmp_path / "t"), BuiltTask)


def test_rename_rewrites_only_the_header(log: TrafficLog, tmp_path: Path) -> None:
    log.insert(distinct(8))
    built = build(log, tmp_path)
    assert isinstance(built, BuiltTask)
    before = built.path.read_text().splitlines()
    rename_task(built.path, "tickets")
    after = built.path.read_text().splitlines()
    assert after[1:] == before[1:]
    header = json.loads(after[0])["task"]
    assert header["name"] == "tickets" and header["fingerprint"] == "fpA"
    assert get_task(str(built.path)).name == "tickets"
    with pytest.raises(ValueError, match="plain file name"):
        rename_task(built.path, "../escape")
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize(
    "options,message",
    [
        ({"name": "a/b"}, "plain file name"),
        ({"min_rows": 10, "max_rows": 5}, "min_rows <= max_rows"),
        ({"validation_share": 0.6, "test_share": 0.5}, "sum below 1"),
        ({"test_share": 0.0}, "0 < test_share"),
    ],
)
def test_bad_settings_are_refused(log: TrafficLog, tmp_path: Path, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build(log, tmp_path, **options)


def test_split_keeps_a_test_row_and_a_train_row() -> None:
    rows = [Row(T0 + i, f"r{i}", f"p{i}", "a") for i in (3, 1, 2)]
    splits = split_by_time(rows, 0.0, 0.01)
    assert [r.id for r in splits["train"]] == ["r1", "r2"] and [r.id for r in splits["test"]] == [
        "r3"
    ]
    two = split_by_time(rows[:2], 0.4, 0.9)
    assert [len(two[s]) for s in ("train", "validation", "test")] == [1, 0, 1]
