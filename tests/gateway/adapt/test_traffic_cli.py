"""`distillgate traffic stats | export` on a real log (a SQLite store and PostgreSQL via
--dsn): the counts, the export loaded back with the JSONL task loader, and each error."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import time
from pathlib import Path

import pytest

from gateway.adapt.log import TrafficLog
from gateway.adapt.records import TrafficRecord
from gateway.adapt.traffic_cli import add_commands, parse_since, prompt_of
from law.cli import CliError
from models.tasks.jsonl import load_jsonl_task
from tests.gateway.adapt.test_log import NOW, rec
from tests.servers import free_port

SYSTEM = "Classify the headline's sentiment."


def cli(*args: str) -> subprocess.CompletedProcess:
    """`distillgate ARGS` in this process: through gateway/cli.py once it composes the
    traffic commands, else through a root parser built the same way."""
    from gateway import cli as gateway_cli
    from tests import servers

    root = gateway_cli.parser()
    if "traffic" in _commands(root):
        return servers.cli(*args)
    root = gateway_cli._Parser(prog="distillgate")
    add_commands(root.add_subparsers(dest="command", required=True))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            parsed = root.parse_args(list(args))
            code = parsed.func(parsed)
        except CliError as exc:
            print(f"distillgate: error: {exc}", file=err)
            code = 2
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["distillgate", *args], code, out.getvalue(), err.getvalue())


def _commands(root: object) -> set[str]:
    for action in getattr(root, "_actions", []):
        if getattr(action, "choices", None) and isinstance(action.choices, dict):
            return set(action.choices)
    return set()


def chat(i: int, user: str, answer: str | None, **changes: object) -> TrafficRecord:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    fields: dict[str, object] = {
        "fingerprint": "fpA", "request": json.dumps({"messages": messages}),
        "response": answer, "reference": None,
    }  # fmt: skip
    return rec(i, **{**fields, **changes})


@pytest.fixture(params=["sqlite", "postgresql"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], str]:
    """The CLI's options naming a log, and the log's URL."""
    if request.param == "sqlite":
        store = tmp_path / "store"
        return ["--store", str(store)], f"sqlite:///{store / 'traffic.db'}"
    url: str = request.getfixturevalue("fresh_pg")
    return ["--dsn", url.replace("postgresql+psycopg://", "postgresql://")], url


def fill(url: str, records: list[TrafficRecord]) -> None:
    log = TrafficLog.open(url)
    log.insert(records)
    log.close()


def test_parse_since() -> None:
    assert parse_since("2h", NOW) == NOW - 7200
    assert parse_since("30m", NOW) == NOW - 1800
    assert parse_since(" 7d ", NOW) == NOW - 7 * 86_400
    assert parse_since("1.5s", NOW) == NOW - 1.5
    assert parse_since("2026-12-01T10:00+00:00", NOW) == 1_796_119_200
    assert parse_since("2026-12-01", NOW) == pytest.approx(1_796_083_200, abs=14 * 3600)
    with pytest.raises(CliError, match="neither a date/time nor a duration"):
        parse_since("yesterday", NOW)


def test_stats_json_and_text(source: tuple[list[str], str]) -> None:
    options, url = source
    fill(
        url,
        [rec(i) for i in range(4)]
        + [rec(9, domain=None, request=None, response=None, reference=None)],
    )
    done = cli("traffic", "stats", *options, "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert (stats["rows"], stats["with_content"]) == (5, 4)
    assert stats["by_domain"] == {"finance": 4, "(none)": 1}
    assert stats["by_fingerprint"] == {"fp0": 3, "fp1": 1, "fp2": 1}
    text = cli("traffic", "stats", *options)
    assert text.returncode == 0, text.stderr
    assert "5 (4 with content)" in text.stdout
    assert "   finance" in text.stdout and "80.0%" in text.stdout


def test_stats_since(tmp_path: Path) -> None:
    store = tmp_path / "store"
    now = time.time()
    fill(f"sqlite:///{store / 'traffic.db'}", [rec(0, ts=now - 3 * 3600), rec(1, ts=now - 60)])
    done = cli("traffic", "stats", "--store", str(store), "--since", "2h", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1


def test_the_environment_names_the_log(
    source: tuple[list[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options, url = source
    fill(url, [rec(0)])
    flag, value = options
    monkeypatch.setenv(
        "DISTILLGATE_STORE" if flag == "--store" else "DISTILLGATE_TRAFFIC_DSN", value
    )
    done = cli("traffic", "stats", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1


def test_export_loads_back_as_a_task(source: tuple[list[str], str], tmp_path: Path) -> None:
    options, url = source
    records = [
        chat(0, "Stocks rally", " positive\n"),
        chat(1, "Bank fails", "negative"),
        chat(2, "Stocks rally", "positive"),  # duplicate prompt
        chat(3, "Oil flat", "neutral", outcome="server_error", status=500),  # failed
        chat(4, "Gold up", None, request=None),  # no content
        chat(5, "Fed holds", "neutral", role="student", model="s1", reference="neutral"),
        chat(6, "Tech slides", "positive", role="student", model="s1"),  # no teacher answer
        rec(7, fingerprint="fpA", endpoint="completions",
            request=json.dumps({"prompt": "Headline: Rates cut\nSentiment:"}), response="positive"),
        chat(8, "Other template", "x", fingerprint="fpB"),
    ]  # fmt: skip
    fill(url, records)
    out = tmp_path / "export.jsonl"
    done = cli("traffic", "export", *options, "--fingerprint", "fpA", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert "wrote 4 rows" in done.stderr and "skipped 4" in done.stderr
    assert json.loads(done.stdout)["skipped"] == {
        "failed": 1, "no_content": 1, "no_teacher_answer": 1, "unreadable": 0, "duplicate": 1,
        "shadow": 0,
    }  # fmt: skip
    task = load_jsonl_task(out)
    assert task.name == "traffic-fpA" and "fpA" in task.description
    examples = {e.id: e for split in ("train", "validation", "test") for e in task.examples(split)}
    assert {i: (e.prompt, e.answer) for i, e in examples.items()} == {
        "r0": (f"{SYSTEM}\n\nStocks rally", "positive"),
        "r1": (f"{SYSTEM}\n\nBank fails", "negative"),
        "r5": (f"{SYSTEM}\n\nFed holds", "neutral"),
        "r7": ("Headline: Rates cut\nSentiment:", "positive"),
    }
    assert task.labels == ("negative", "neutral", "positive")
    assert list(tmp_path.glob(".export.jsonl.*")) == []  # no temporary file left


def test_export_limit_and_since(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fill(f"sqlite:///{store / 'traffic.db'}", [chat(i, f"h{i}", "positive") for i in range(5)])
    out = tmp_path / "x.jsonl"
    done = cli("traffic", "export", "--store", str(store), "--fingerprint", "fpA",
               "--limit", "2", "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the summary goes to stderr
    assert [json.loads(line).get("id") for line in out.read_text().splitlines()] == [
        None, "r0", "r1",
    ]  # fmt: skip
    late = cli("traffic", "export", "--store", str(store), "--fingerprint", "fpA",
               "--since", "2027-01-15T08:00:03+00:00", "-o", str(out))  # fmt: skip
    assert late.returncode == 0, late.stderr
    assert "wrote 2 rows" in late.stderr  # NOW + 3 and NOW + 4


def test_prompt_of_chat_shapes() -> None:
    def with_request(request: object, endpoint: str = "chat") -> str | None:
        text = request if isinstance(request, str) else json.dumps(request)
        return prompt_of(dataclasses.replace(rec(0), request=text, endpoint=endpoint))

    parts = [{"type": "text", "text": "a "}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    assert with_request({"messages": [{"role": "user", "content": parts}]}) == "a b"
    turns = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
             {"role": "user", "content": "last"}]  # fmt: skip
    assert with_request([*turns]) == "last"
    assert with_request({"messages": [{"role": "system", "content": "s"}]}) is None
    assert with_request("raw prompt", endpoint="completions") == "raw prompt"
    assert with_request("not json", endpoint="chat") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--since", "soon"], "--since 'soon' is neither"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    fill(f"sqlite:///{tmp_path / 'traffic.db'}", [rec(0)])
    done = cli("traffic", "export", "--store", str(tmp_path), "--fingerprint", "fp0",
               "-o", str(tmp_path / "x.jsonl"), *extra)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr


def test_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    missing = cli("traffic", "stats", "--store", str(tmp_path / "empty"))
    assert missing.returncode == 2
    assert f"no traffic log at {tmp_path / 'empty' / 'traffic.db'}" in missing.stderr
    assert "pass --dsn" in missing.stderr and not (tmp_path / "empty").exists()

    dsn = f"postgresql://distillgate@127.0.0.1:{free_port()}/db"
    down = cli("traffic", "stats", "--dsn", dsn)
    assert down.returncode == 2 and "cannot open the traffic log" in down.stderr
    assert "check --dsn" in down.stderr and down.stderr.count("\n") == 1

    fill(f"sqlite:///{tmp_path / 'traffic.db'}", [rec(0)])
    nowhere = tmp_path / "no" / "x.jsonl"
    no_dir = cli("traffic", "export", "--store", str(tmp_path), "--fingerprint", "fp0",
                 "-o", str(nowhere))  # fmt: skip
    assert no_dir.returncode == 2 and f"directory {nowhere.parent} does not exist" in no_dir.stderr

    empty = cli("traffic", "export", "--store", str(tmp_path), "--fingerprint", "nope",
                "-o", str(tmp_path / "x.jsonl"))  # fmt: skip
    assert empty.returncode == 2 and "nothing to export for fingerprint 'nope'" in empty.stderr
    assert not (tmp_path / "x.jsonl").exists()
