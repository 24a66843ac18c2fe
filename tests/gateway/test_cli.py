"""The `distillgate` entry point: every package's commands under one root, every option
with help; `serve` on bad input: one clear message, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import parser
from tests.servers import cli, cli_process


def _walk(node: argparse.ArgumentParser, path: str):
    """(where, action) for every action of every parser in the tree."""
    for action in node._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the sub-commands as --help lists them
                yield f"{path} {choice.dest}", choice
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def test_every_command_option_and_positional_has_help() -> None:
    actions = list(_walk(parser(), "distillgate"))
    missing = [f"{where}: {a.option_strings or a.dest}" for where, a in actions if not a.help]
    assert not missing
    commands = {where for where, _ in actions}
    for expected in ("serve", "distill", "students list", "sweep", "law show", "tasks export"):
        assert f"distillgate {expected}" in commands


def _commands(node: argparse.ArgumentParser, path: str = "distillgate"):
    """(path, parser) of every command that runs something: the tree's leaves."""
    groups = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, node
    for group in groups:
        for name, child in group.choices.items():
            yield from _commands(child, f"{path} {name}")


def test_every_reporting_command_has_json() -> None:
    commands = dict(_commands(parser()))
    assert len(commands) >= 16
    without = [path for path, cmd in commands.items() if "--json" not in cmd._option_string_actions]
    # serve answers over HTTP, and the adapt loop's processes log; neither reports on stdout
    processes = ["distillgate adapt once", "distillgate adapt run", "distillgate serve"]
    assert sorted(without) == processes


def test_bad_config_is_reported_whole_and_server_does_not_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: a, backend: openai}\nlimits: {queue_size: 0}\n")
    out = cli("serve", "--config", str(bad))
    assert out.returncode == 2
    assert "models[0].url: Field required" in out.stderr
    assert "limits.queue_size" in out.stderr and "Traceback" not in out.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    out = cli("serve", "--config", str(tmp_path / "none.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert out.stderr.startswith("distillgate: error:")


def test_bad_port_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_PORT", "seventy")
    out = cli("serve")
    assert out.returncode == 2 and "port" in out.stderr and "Traceback" not in out.stderr


def test_usage_errors_are_one_line() -> None:
    out = cli("serve", "--port", "eighty")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("distillgate serve: error: argument --port")


@pytest.mark.slow
def test_serve_a_model_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    """The serve family's smoke test: a real `distillgate serve` process."""
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - {{name: m, backend: local, path: {tmp_path / 'nowhere'}}}\n")
    out = cli_process("serve", "--config", str(config), "--port", "0", timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]  # after the log, one line says what failed
    assert last.startswith("distillgate: error:") and "model 'm'" in last and "nowhere" in last
