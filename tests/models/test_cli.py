"""The factory's commands (models/cli.py), run in-process through `distillgate`'s entry
function: bad arguments are one line and exit code 2; tasks round-trip; a teacher that
cannot do the task stops `distill` before any work, unless --force; --no-progress
silences every bar. One real subprocess is the family's smoke test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.store import Manifest, ModelStore
from tests.servers import cli, cli_process


@pytest.mark.parametrize(
    "args,message",
    [
        (["distill", "--task", "finance-headlines", "--ratio", "0"], "ratio must be in (0, 1]"),
        (["distill", "--task", "finance-headlines", "--ratio", "1.2"], "ratio must be in (0, 1]"),
        (["distill", "--task", "no-such-task", "--ratio", "0.5"], "unknown task 'no-such-task'"),
        (["distill", "--task", "support-tickets", "--ratio", "0.5", "--examples", "2"],
         "examples must be at least 16"),
        (["distill", "--task", "finance-headlines", "--ratio", "half"], "invalid float value"),
        (["distill", "--task", "finance-headlines", "--ratio", "0.5", "--format", "x"],
         "invalid choice: 'x'"),
        (["distill", "--task", "support-tickets", "--ratio", "0.5", "--examples", "16",
          "--min-teacher-accuracy", "1.5"], "--min-teacher-accuracy must be in [0, 1], got 1.5"),
        (["teacher", "adapt", "--task", "general-knowledge"], "no training split"),
        (["tasks", "show", "nope"], "unknown task 'nope'"),
        (["tasks", "export", "finance-headlines", "-n", "0"], "-n must be at least 1"),
        (["eval", "ghost"], "'ghost' is not in the store"),
        (["eval", "ghost", "--general-examples", "0"], "--general-examples must be at least 1"),
        (["students", "show", "ghost"], "'ghost' is not in the store"),
        (["sweep", "--grid", "missing.yaml", "--out", "r.jsonl"], "cannot read grid"),
    ],
)  # fmt: skip
def test_factory_commands_reject_bad_arguments_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    store = tmp_path / "store"
    store_args = [] if args[0] == "tasks" else ["--store", str(store)]
    out = cli(*args, *store_args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("distillgate") and out.stdout == ""
    assert not store.exists() or not [p for p in store.iterdir() if not p.name.startswith(".")]


def test_tasks_list_show_and_export_round_trip(tmp_path: Path) -> None:
    listed = json.loads(cli("tasks", "list", "--json").stdout)
    assert [t["name"] for t in listed] == [
        "finance-headlines",
        "general-knowledge",
        "support-tickets",
    ]
    shown = json.loads(cli("tasks", "show", "finance-headlines", "--json").stdout)
    assert len(shown["labels"]) >= 13 and len(shown["examples"]["test"]) == 3
    out = tmp_path / "fin.jsonl"
    wrote = cli("tasks", "export", "finance-headlines", "-n", "20", "-o", str(out), "--json")
    assert json.loads(wrote.stdout) == {"written": 20, "path": str(out)}
    again = json.loads(cli("tasks", "show", str(out), "--json", "--examples", "1").stdout)
    assert again["sizes"]["test"] == 20 and set(again["labels"]) <= set(shown["labels"])


@pytest.mark.slow
def test_factory_smoke_in_a_child_process(tmp_path: Path) -> None:
    """The factory family's smoke test: `distillgate tasks` as a real process, from a
    directory that is not the repo."""
    shown = cli_process("tasks", "show", "support-tickets", "--examples", "1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "support-tickets"
    bad = cli_process("tasks", "export", "support-tickets", "-n", "0")
    assert bad.returncode == 2
    assert bad.stderr == "distillgate: error: -n must be at least 1, got 0\n"


@pytest.fixture
def tiny_teacher(tmp_path: Path, tiny_model_dir: Path) -> ModelStore:
    """A store whose teacher is the tiny random model: it cannot do any task."""
    store = ModelStore(tmp_path / "store")
    copy = lambda out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)  # noqa: E731
    store.register(Manifest(name="tiny", role="teacher"), copy)
    return store


def _distill(store: ModelStore, *extra: str):
    return cli(
        "distill", "--task", "support-tickets", "--ratio", "0.5", "--examples", "16",
        "--epochs", "1", "--teacher", "tiny", "--store", str(store.root), "--json", *extra,
    )  # fmt: skip


def test_a_teacher_below_twice_chance_stops_distill(tiny_teacher: ModelStore) -> None:
    out = _distill(tiny_teacher, "--teacher-check-examples", "8", "--no-progress")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    line = out.stderr
    assert "teacher 'tiny' answers 0.0% of 8 support-tickets validation items" in line
    assert "chance is 9.1%" in line and "minimum 18.2% (twice chance)" in line
    assert "distillgate teacher adapt --task support-tickets --teacher tiny" in line
    assert "--force" in line
    assert [m.name for m in tiny_teacher.entries()] == ["tiny"]  # nothing made
    stricter = _distill(tiny_teacher, "--teacher-check-examples", "4", "--no-progress",
                        "--min-teacher-accuracy", "0.5")  # fmt: skip
    assert stricter.returncode == 2 and "minimum 50.0% (--min-teacher-accuracy)" in stricter.stderr


def test_force_distils_anyway_and_no_progress_silences_every_bar(
    tiny_teacher: ModelStore,
) -> None:
    quiet = _distill(tiny_teacher, "--force", "--no-progress", "--name", "quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["parent"] == "tiny"
    assert quiet.stderr == ""  # no teacher-answer, logits, loading or training bars
    # the same without the flag shows bars (the teacher's outputs now come from the cache)
    loud = _distill(tiny_teacher, "--force", "--name", "loud")
    assert loud.returncode == 0, loud.stderr
    assert "train (kl)" in loud.stderr and "Loading weights" in loud.stderr
    assert {m.name for m in tiny_teacher.entries()} == {"tiny", "quiet", "loud"}


def test_teacher_prepare_prints_the_teachers_directory_once_converted(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`teacher prepare` is the init step of servers that read the teacher from the store
    (compose's and Kubernetes' vLLM): here the store already holds one, so nothing converts."""
    from models.store import TEACHER_NAME

    store = ModelStore(tmp_path / "store")
    copy = lambda out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)  # noqa: E731
    store.register(Manifest(name=TEACHER_NAME, role="teacher"), copy)
    done = cli("teacher", "prepare", "--store", str(store.root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(store.path_for(TEACHER_NAME))
    assert (Path(done.stdout.strip()) / "config.json").is_file()
    done = cli("teacher", "prepare", "--store", str(store.root), "--json")
    assert json.loads(done.stdout) == {
        "name": TEACHER_NAME,
        "path": str(store.path_for(TEACHER_NAME)),
    }
