"""`distillgate serve` on bad input: one clear message, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import cli

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_bad_config_is_reported_whole_and_server_does_not_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: a, backend: openai}\nlimits: {queue_size: 0}\n")
    out = _serve("--config", str(bad))
    assert out.returncode == 2
    assert "models[0].url: Field required" in out.stderr
    assert "limits.queue_size" in out.stderr and "Traceback" not in out.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    out = _serve("--config", str(tmp_path / "none.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert out.stderr.startswith("distillgate: error:")


def test_model_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - {{name: m, backend: local, path: {tmp_path / 'nowhere'}}}\n")
    out = _serve("--config", str(config), "--port", "0")
    assert out.returncode == 1
    assert "model 'm'" in out.stderr and "nowhere" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_port_from_environment(tmp_path: Path) -> None:
    import os

    out = _serve(env={**os.environ, "DISTILLGATE_PORT": "seventy"})
    assert out.returncode == 2 and "port" in out.stderr and "Traceback" not in out.stderr


_cli = cli


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
        (["teacher", "adapt", "--task", "general-knowledge"], "no training split"),
        (["tasks", "show", "nope"], "unknown task 'nope'"),
        (["tasks", "export", "finance-headlines", "-n", "0"], "-n must be at least 1"),
        (["eval", "ghost"], "'ghost' is not in the store"),
    ],
)  # fmt: skip
def test_factory_commands_reject_bad_arguments_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    store = tmp_path / "store"
    store_args = [] if args[0] == "tasks" else ["--store", str(store)]
    out = _cli(*args, *store_args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("distillgate") and out.stdout == ""
    assert not store.exists() or not [p for p in store.iterdir() if not p.name.startswith(".")]


def test_tasks_list_show_and_export_round_trip(tmp_path: Path) -> None:
    import json

    listed = json.loads(_cli("tasks", "list", "--json").stdout)
    assert [t["name"] for t in listed] == [
        "finance-headlines",
        "general-knowledge",
        "support-tickets",
    ]
    shown = json.loads(_cli("tasks", "show", "finance-headlines", "--json").stdout)
    assert len(shown["labels"]) >= 13 and len(shown["examples"]["test"]) == 3
    out = tmp_path / "fin.jsonl"
    wrote = _cli("tasks", "export", "finance-headlines", "-n", "20", "-o", str(out), "--json")
    assert json.loads(wrote.stdout) == {"written": 20, "path": str(out)}
    again = json.loads(_cli("tasks", "show", str(out), "--json", "--examples", "1").stdout)
    assert again["sizes"]["test"] == 20 and set(again["labels"]) <= set(shown["labels"])
