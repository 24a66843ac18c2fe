"""`distillgate traffic stats | export`: what the traffic log holds, and one template's
answered requests as a user JSONL task (models/tasks/jsonl.py), so that traffic can be
distilled by hand with `distillgate distill --task x.jsonl`.

The export writes `{"task": {"name", "description"}}`, then one `{"prompt", "answer", "id"}`
per successful row that has content. A completions row's prompt is its prompt; a chat
row's is its last user message, with the (first) system message, if any, before it and a
blank line between (earlier turns are left out). The answer is the teacher's, whitespace
stripped: a teacher row's response, or a student row's `reference` (the teacher's answer
when the request was audited); `id` is the request id. A prompt already written is not
written again. Rows that failed, have no content or no teacher answer, cannot be read, or
are shadow answers (a student's background reply to a teacher-answered request) are
skipped and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.adapt.records import SHADOW, TrafficRecord
from law.cli import CliError, emit, json_flag
from models.cli import STORE_ENV

if TYPE_CHECKING:  # the log (SQLAlchemy) loads when a command runs, not with the parser
    from gateway.adapt.log import TrafficLog, TrafficStats

DSN_ENV = "DISTILLGATE_TRAFFIC_DSN"
PAGE = 1_000
UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
SKIP_REASONS = ("failed", "no_content", "no_teacher_answer", "unreadable", "duplicate", "shadow")


def add_commands(sub: argparse._SubParsersAction) -> None:
    traffic = sub.add_parser("traffic", help="summarise the traffic log or export a template")
    actions = traffic.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    stats = actions.add_parser(
        "stats", help="rows by SLO class, domain, fingerprint (top 20), model and outcome"
    )
    log_flags(stats)
    json_flag(stats)
    stats.set_defaults(func=_run_stats)
    export = actions.add_parser(
        "export", help="one fingerprint's requests and teacher answers, as a JSONL task"
    )
    log_flags(export)
    export.add_argument("--fingerprint", required=True, help="the template fingerprint to export")
    export.add_argument("--limit", type=int, help="write at most N rows (default: all)")
    export.add_argument("-o", "--output", type=Path, required=True, help="the .jsonl to write")
    json_flag(export)
    export.set_defaults(func=_run_export)


def log_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--store",
        type=Path,
        help=f"model store holding traffic.db (default ${STORE_ENV} or "
        "~/.cache/distillgate/models)",
    )
    cmd.add_argument("--dsn", help=f"PostgreSQL URL of the log (default ${DSN_ENV})")
    cmd.add_argument(
        "--since",
        help="only rows from then on: an ISO date/time (2026-12-01, 2026-12-01T10:00; local "
        "time unless it names a zone) or a duration ago (30m, 2h, 7d)",
    )


def parse_since(text: str, now: float) -> float:
    """`--since` as Unix seconds: a duration (that long before `now`) or an ISO date/time."""
    duration = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if duration:
        return now - float(duration[1]) * UNITS[duration[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise CliError(
            f"--since {text!r} is neither a date/time nor a duration; use e.g. 2026-12-01, "
            "2026-12-01T10:00, 30m, 2h or 7d"
        ) from None


@contextlib.contextmanager
def reading(args: argparse.Namespace) -> Iterator[TrafficLog]:
    """The log that --dsn or --store names, open for one command; its errors as CliError."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.adapt.log import TrafficLog, TrafficLogError, database_url, sqlite_path
    from models.store import ModelStore

    dsn = args.dsn or os.environ.get(DSN_ENV) or None
    root = ModelStore(args.store or os.environ.get(STORE_ENV) or None).root
    if dsn is None and not sqlite_path(root).is_file():
        raise CliError(
            f"no traffic log at {sqlite_path(root)}; start the gateway with traffic "
            "logging on, or pass --dsn"
        )
    try:
        log = TrafficLog.open(database_url(dsn, root))
    except TrafficLogError as exc:
        raise CliError(f"{_one_line(exc)}; check --dsn (or ${DSN_ENV})") from None
    try:
        yield log
    except SQLAlchemyError as exc:
        raise CliError(f"reading the traffic log at {log.url} failed: {_first(exc)}") from None
    finally:
        log.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def since_of(args: argparse.Namespace) -> float | None:
    return None if args.since is None else parse_since(args.since, time.time())


def _run_stats(args: argparse.Namespace) -> int:
    since = since_of(args)
    with reading(args) as log:
        stats, url = log.stats(since), log.url
    return emit(args.json, {"log": url, **stats.as_dict()}, format_stats(stats, url))


def _first(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).isoformat(" ", "seconds")


def format_stats(stats: TrafficStats, url: str) -> str:
    """The stats as an aligned plain-text table (times in local time)."""
    lines = [
        f"traffic log  {url}",
        f"rows         {stats.rows} ({stats.with_content} with content)",
        f"first, last  {_when(stats.first_ts)}, {_when(stats.last_ts)}",
    ]
    if stats.since is not None:
        lines.append(f"since        {_when(stats.since)}")
    groups = {
        "SLO class": stats.by_slo_class,
        "domain": stats.by_domain,
        "fingerprint (top 20)": stats.by_fingerprint,
        "model": stats.by_model,
        "outcome": stats.by_outcome,
    }
    # One width for every group, so the counts line up down the whole table.
    width = max(len(k) + 2 for k in (*groups, *(k for c in groups.values() for k in c)))
    for title, counts in groups.items():
        if not counts:
            continue
        lines += ["", f"{'by ' + title:<{width + 3}}{'rows':>8}  share"]
        for key, n in counts.items():
            share = n / stats.rows if stats.rows else 0.0
            lines.append(f"   {key:<{width}}{n:>8}  {share:6.1%}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Export:
    """An export's rows (loader-ready dicts) and what was skipped, by reason."""

    rows: tuple[dict[str, str], ...]
    skipped: dict[str, int]


def prompt_of(record: TrafficRecord) -> str | None:
    """The task prompt of a logged request (see the module docstring), or None."""
    if not record.request:
        return None
    try:
        data: Any = json.loads(record.request)
    except json.JSONDecodeError:  # a bare prompt, as records.py allows for completions
        return record.request if record.endpoint == "completions" else None
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("prompt"), str):
        return data["prompt"]
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        return None
    roles = [(m.get("role"), _text(m.get("content"))) for m in messages if isinstance(m, dict)]
    user = next((text for role, text in reversed(roles) if role == "user"), None)
    if not user:
        return None
    system = next((text for role, text in roles if role == "system"), "")
    return f"{system}\n\n{user}" if system else user


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI content parts' text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def label_of(record: TrafficRecord) -> tuple[str, str] | str:
    """A row's (prompt, teacher answer), or the reason it cannot be one (a SKIP_REASONS
    entry other than "duplicate", which only a reader of many rows can tell)."""
    # A shadow answer is a student's background reply to a request the teacher answered
    # (and logged) itself: not a request of its own.
    if record.route_reason == SHADOW:
        return "shadow"
    # The labels are the teacher's: a student's answer counts only through its audit.
    label = record.response if record.role == "teacher" else record.reference
    answer = (label or "").strip()
    if record.outcome != "success":
        return "failed"
    if record.role != "teacher" and record.request and record.reference is None:
        return "no_teacher_answer"
    if not record.request or not answer:
        return "no_content"
    prompt = prompt_of(record)
    return "unreadable" if prompt is None else (prompt, answer)


@dataclass(frozen=True)
class Row:
    """One labelled request: when it was logged, its request id, prompt and teacher answer."""

    ts: float
    id: str
    prompt: str
    answer: str


def labelled(
    records: Iterable[TrafficRecord], limit: int | None = None
) -> tuple[list[Row], dict[str, int]]:
    """The rows `records` give, in their order (at most `limit`), the first of each prompt
    kept, and the skipped counts by reason (only of the records looked at)."""
    rows: list[Row] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for record in records:
        if limit is not None and len(rows) >= limit:
            break
        label = label_of(record)
        if isinstance(label, str):
            skipped[label] += 1
        elif label[0] in seen:
            skipped["duplicate"] += 1
        else:
            seen.add(label[0])
            rows.append(Row(record.ts, record.request_id, *label))
    return rows, {reason: skipped[reason] for reason in SKIP_REASONS}


def task_rows(records: Iterable[TrafficRecord], limit: int | None = None) -> Export:
    """The loader-ready rows of `records` (at most `limit`), each prompt once."""
    rows, skipped = labelled(records, limit)
    return Export(tuple({"prompt": r.prompt, "answer": r.answer, "id": r.id} for r in rows),
                  skipped)  # fmt: skip


def _records(log: TrafficLog, fingerprint: str, since: float | None) -> Iterator[TrafficRecord]:
    after = 0
    while page := log.read(after, PAGE, since=since, fingerprint=fingerprint, content=True):
        yield from (s.record for s in page)
        after = page[-1].id


def _run_export(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    output: Path = args.output
    if not output.parent.is_dir():
        raise CliError(f"-o {output}: directory {output.parent} does not exist; create it first")
    since = since_of(args)
    with reading(args) as log:
        export = task_rows(_records(log, args.fingerprint, since), args.limit)
    skipped = sum(export.skipped.values())
    detail = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in export.skipped.items())
    if not export.rows:
        raise CliError(
            f"nothing to export for fingerprint {args.fingerprint!r} ({skipped} rows skipped: "
            f"{detail}); pick one from `distillgate traffic stats`, and log content for its "
            "SLO class (log_content: true)"
        )
    _write_task(output, _header(args.fingerprint, since, len(export.rows)), export.rows)
    print(
        f"wrote {len(export.rows)} rows to {output}; skipped {skipped} ({detail})",
        file=sys.stderr,
    )
    data = {"output": str(output), "written": len(export.rows), "skipped": export.skipped}
    return emit(True, data, "") if args.json else 0


def _header(fingerprint: str, since: float | None, n: int) -> dict[str, Any]:
    name = "traffic-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint)[:24] or "export")
    when = f" since {_when(since)}" if since is not None else ""
    description = f"{n} logged teacher answers for fingerprint {fingerprint}{when}"
    return {"task": {"name": name, "description": description}}


def _write_task(output: Path, header: dict[str, Any], rows: Iterable[dict[str, str]]) -> None:
    """Write atomically: a failed export leaves no half-written task behind."""
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(header, ensure_ascii=False) + "\n")
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
