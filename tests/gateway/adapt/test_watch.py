"""`distillgate adapt watch | events` over a real log (SQLite and PostgreSQL): a template
that no student covers rises and is reported once, stored, and counted; a restarted watch
warms up on the recent rows and reports nothing old again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gateway.adapt.detectors import Detectors
from gateway.adapt.log import TrafficLog
from gateway.adapt.records import TrafficRecord
from gateway.adapt.watch import Watcher, WatchMetrics
from tests.servers import cli

NEW = "feedfacefeedface"


def _stream(n: int, switch: int, seed: int = 0) -> list[TrafficRecord]:
    """Covered finance traffic, bare questions, and from `switch` on 15% of a new template
    that the teacher answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        draw = rng.random()
        if i >= switch and draw < 0.15:
            kind = ("teacher", "general", 0.2, NEW)
        elif draw < 0.6:
            kind = ("finance-student", "finance-headlines", 0.95, "aaaaaaaaaaaaaaaa")
        else:
            kind = ("teacher", "general", 0.9, f"{rng.getrandbits(64):016x}")
        role = "teacher" if kind[0] == "teacher" else "student"
        rows.append(TrafficRecord(
            ts=1_700_000_000 + i, request_id=f"r{i}", endpoint="chat", requested_model="auto",
            model=kind[0], role=role, fingerprint=kind[3], outcome="success", status=200,
            latency_ms=10.0, domain=kind[1], confidence=kind[2],
        ))  # fmt: skip
    return rows


def _log(url: str, records: list[TrafficRecord]) -> TrafficLog:
    log = TrafficLog.open(url)
    log.insert(records)
    return log


def test_watch_reports_new_traffic_once_and_a_restart_reports_nothing_old(log_url: str) -> None:
    log = _log(log_url, _stream(1500, switch=1000))
    try:
        out = cli("adapt", "watch", "--dsn", log_url, "--since", "2023-01-01", "--once", "--json")
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        new = [e for e in events if e["kind"] == "new_traffic"]
        assert [e["key"] for e in new] == [NEW]
        assert 1000 < new[0]["at_id"] <= 1000 + 300  # seen within 300 requests of the switch
        assert new[0]["evidence"]["count"] >= 10 and new[0]["evidence"]["sample_request_ids"]
        stored = cli("adapt", "events", "--dsn", log_url, "--kind", "new_traffic", "--json")
        assert [e["key"] for e in json.loads(stored.stdout)] == [NEW]

        log.insert(_stream(200, switch=0, seed=1))  # more of the same, after a restart
        again = cli("adapt", "watch", "--dsn", log_url, "--once", "--json")
        assert again.returncode == 0, again.stderr
        assert NEW not in again.stdout  # warmed up on the rows it had seen: not reported again
    finally:
        log.close()


def test_events_are_counted_for_prometheus(log_url: str) -> None:
    log = _log(log_url, _stream(1500, switch=1000))
    try:
        metrics = WatchMetrics()
        watcher = Watcher(log, Detectors(), metrics, store_events=False)
        found = watcher.step()
        assert any(e.kind == "new_traffic" for e in found)
        assert metrics.events.labels("new_traffic")._value.get() == 1
        assert metrics.rows._value.get() == 1500 and log.events() == []  # dry run stores none
    finally:
        log.close()


@pytest.mark.parametrize(
    "args,message",
    [
        (["adapt", "watch", "--interval", "0"], "--interval must be positive, got 0"),
        (["adapt", "events", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["adapt", "watch", "--since", "yesterday-ish"], "--since 'yesterday-ish' is neither"),
        (["adapt", "events", "--kind", "drift"], "invalid choice: 'drift'"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = cli(*args, "--store", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr


def test_a_missing_log_says_how_to_make_one(tmp_path: Path) -> None:
    out = cli("adapt", "events", "--store", str(tmp_path))
    assert out.returncode == 2 and "no traffic log at" in out.stderr and "--dsn" in out.stderr
