"""Tasks: the synthetic generators are deterministic and their splits share no template,
entity or prompt; labels are balanced; prompts stay short; scoring and the JSONL loader
behave, including on bad files."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.tasks import TaskError, export_jsonl, get_task, load_jsonl_task, task_names
from models.tasks.base import match_label
from models.tasks.jsonl import hashed_split

SYNTHETIC = [("finance-headlines", 13), ("support-tickets", 10)]


@pytest.mark.parametrize("name,labels", SYNTHETIC)
def test_generators_are_deterministic_for_a_seed(name: str, labels: int) -> None:
    first, again = get_task(name).examples("train", 200), get_task(name).examples("train", 200)
    assert first == again and [e.prompt for e in first] == [e.prompt for e in again]
    assert len(get_task(name).labels) >= labels


@pytest.mark.parametrize("name,_", SYNTHETIC)
def test_splits_are_disjoint_by_template_entity_and_text(name: str, _: int) -> None:
    task = get_task(name)
    splits = {s: task.examples(s, 600) for s in ("train", "validation", "test")}
    for key in ("template", "entity"):
        seen = {s: {e.meta[key] for e in rows} for s, rows in splits.items()}
        assert not seen["train"] & seen["test"] and not seen["train"] & seen["validation"]
        assert not seen["validation"] & seen["test"]
    texts = {s: {e.prompt for e in rows} for s, rows in splits.items()}
    assert not texts["train"] & texts["test"]
    for split, rows in splits.items():  # every label is asked in every split
        assert {e.answer for e in rows} == set(task.labels), split


@pytest.mark.parametrize("name,_", SYNTHETIC)
def test_labels_balanced_and_phrasings_many(name: str, _: int) -> None:
    task = get_task(name)
    rows = task.examples("train", 1300)
    counts = Counter(e.answer for e in rows)
    assert max(counts.values()) - min(counts.values()) <= 1
    every = task.examples("train", 2000) + task.examples("validation") + task.examples("test")
    templates = Counter(
        e.meta["template"].split("/")[0] for e in {e.meta["template"]: e for e in every}.values()
    )
    assert min(templates.values()) >= 8
    assert len({e.prompt for e in rows}) >= 0.85 * len(rows)  # fillers and noise vary the text


@pytest.mark.parametrize("name,_", SYNTHETIC)
def test_prompts_are_short(name: str, _: int, teacher_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    lengths = [len(tokenizer(e.prompt)["input_ids"]) for e in get_task(name).examples("test", 200)]
    assert max(lengths) <= 110, max(lengths)


def test_scoring_reads_the_label_an_answer_names() -> None:
    task = get_task("finance-headlines")
    example = task.examples("test", 1)[0]
    assert example.answer == "earnings beat"
    for said in ("earnings beat", "Earnings Beat.", "earnings beat - the EPS was higher",
                 "The event is: earnings beat"):  # fmt: skip
        assert task.score(example, said) == 1.0, said
    for said in ("earnings miss", "", "beat", "no idea"):
        assert task.score(example, said) == 0.0, said
    labels = ("guidance raised", "guidance")
    assert match_label("guidance raised again", labels) == "guidance raised"


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_task_loads_splits_and_round_trips(tmp_path: Path) -> None:
    rows = [{"task": {"name": "tickets", "description": "mine"}}]
    rows += [{"prompt": f"message {i}", "answer": "a" if i % 2 else "b"} for i in range(50)]
    rows += [{"prompt": "fixed", "answer": "a", "split": "test", "id": "x1"}]
    task = load_jsonl_task(_write(tmp_path / "t.jsonl", rows))
    assert task.name == "tickets" and task.labels == ("a", "b") and task.kind == "classification"
    assert sum(task.size(s) for s in ("train", "validation", "test")) == 51
    assert task.examples("test")[-1].id == "x1"
    assert hashed_split("message 7") == hashed_split("message 7")
    stream = io.StringIO()
    assert export_jsonl(task, "train", None, stream) == task.size("train")
    again = load_jsonl_task(_write(tmp_path / "again.jsonl", stream.getvalue().splitlines()))
    assert again.examples("train") == task.examples("train") and again.size("test") == 0


def test_jsonl_multiple_choice(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "choices": ["x", "y"], "answer": "y", "split": "test"}
            for i in range(4)]  # fmt: skip
    task = get_task(str(_write(tmp_path / "mc.jsonl", rows)))
    assert task.kind == "multiple_choice" and task.chance == 0.5 and task.labels == ()


@pytest.mark.parametrize(
    "rows,message",
    [
        (["{not json"], "t.jsonl:1: not valid JSON"),
        ([{"answer": "a"}], 't.jsonl:1: each line needs a string "prompt"'),
        ([{"prompt": "p", "answer": 3}], '"answer" must be a string'),
        ([{"prompt": "p", "choices": ["x", "y"], "answer": "z"}], "t.jsonl:1: answer 'z' is not"),
        ([{"prompt": "p", "choices": "xy", "answer": "x"}], '"choices" must be a list'),
        ([{"prompt": "p", "answer": "a", "split": "dev"}], "unknown split 'dev'"),
        ([{"prompt": "p", "answer": "a"}, {"prompt": "q", "choices": ["a", "b"], "answer": "a"}],
         'some rows have "choices"'),
        ([""], "no examples"),
    ],
)  # fmt: skip
def test_bad_jsonl_files_name_the_line_and_problem(tmp_path: Path, rows, message: str) -> None:
    with pytest.raises(TaskError) as info:
        load_jsonl_task(_write(tmp_path / "t.jsonl", rows))
    assert message in str(info.value)


def test_unknown_task_and_names() -> None:
    assert task_names() == ["finance-headlines", "general-knowledge", "support-tickets"]
    with pytest.raises(TaskError, match="unknown task 'nope'; built-in tasks: finance-headlines"):
        get_task("nope")
    with pytest.raises(TaskError, match="cannot read task file"):
        get_task("/nowhere/x.jsonl")
    with pytest.raises(TaskError, match="split must be one of"):
        get_task("finance-headlines").examples("dev")  # type: ignore[arg-type]
