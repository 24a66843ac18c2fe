"""The batch writer against real databases (SQLite and PostgreSQL alike): batches land,
a full queue and a failing database drop and count, it recovers, retention runs, `close`
flushes, and a `kill -9` keeps every committed row."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.adapt.log import Retention, TrafficLog
from gateway.adapt.writer import TrafficWriter
from tests.gateway.adapt.test_log import DAY, NOW, rec
from tests.pg import create_database
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[3]
FAST = 0.02  # flush interval for tests that wait for rows


class Counts:
    """What the writer reported through its callbacks."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.batches: list[int] = []

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n

    def write(self, n: int) -> None:
        self.batches.append(n)

    @property
    def written(self) -> int:
        return sum(self.batches)


def writer_for(url: str, counts: Counts, **options: object) -> TrafficWriter:
    options.setdefault("flush_interval_s", FAST)
    return TrafficWriter(
        lambda: TrafficLog.open(url), on_drop=counts.drop, on_write=counts.write,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(writer: TrafficWriter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(writer.run())
    try:
        yield task
    finally:
        await writer.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def rows(url: str) -> list[str]:
    opened = TrafficLog.open(url)
    try:
        return [s.record.request_id for s in opened.read()]
    finally:
        opened.close()


async def test_batches_land_in_order(log_url: str) -> None:
    counts = Counts()
    writer = writer_for(log_url, counts, batch_size=4)
    async with running(writer):
        for i in range(10):
            writer.submit(rec(i))
        await until(lambda: counts.written == 10)
        assert writer.depth == 0
    assert rows(log_url) == [f"r{i}" for i in range(10)]
    assert max(counts.batches) <= 4 and len(counts.batches) >= 3
    assert counts.dropped == {}


async def test_a_batch_waits_for_the_flush_interval_unless_full(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    counts = Counts()
    writer = writer_for(url, counts, batch_size=3, flush_interval_s=30)
    async with running(writer):
        writer.submit(rec(0))
        await asyncio.sleep(0.2)
        assert counts.batches == []  # one record lingers for the interval
        writer.submit(rec(1))
        writer.submit(rec(2))
        await until(lambda: counts.batches == [3])  # a full batch goes at once


async def test_close_flushes_without_waiting_out_the_interval(log_url: str) -> None:
    counts = Counts()
    writer = writer_for(log_url, counts, flush_interval_s=60)
    task = asyncio.create_task(writer.run())
    for i in range(3):
        writer.submit(rec(i))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    await writer.close()
    assert time.monotonic() - start < 5 and task.done()
    assert rows(log_url) == ["r0", "r1", "r2"]
    writer.submit(rec(3))  # after close: dropped and counted
    assert counts.dropped == {"closed": 1}


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    counts = Counts()
    writer = writer_for(url, counts, queue_size=5)
    for i in range(8):  # no writer task yet: nothing drains the queue
        writer.submit(rec(i))
    assert writer.depth == 5 and counts.dropped == {"queue_full": 3}
    await writer.close()  # never started: close flushes by itself
    assert rows(url) == [f"r{i}" for i in range(5)]
    assert writer.depth == 0 and counts.written == 5


async def test_unreachable_postgres_drops_counts_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql+psycopg://distillgate@127.0.0.1:{free_port()}/nowhere"
    counts = Counts()
    writer = writer_for(url, counts, batch_size=10, queue_size=100)
    caplog.set_level(logging.WARNING, logger="distillgate")
    async with running(writer):
        for round_ in range(4):
            for i in range(10):
                writer.submit(rec(round_ * 10 + i))
            await until(lambda r=round_: counts.dropped["database"] == 10 * (r + 1))
        start = time.perf_counter()
        for i in range(10_000):
            writer.submit(rec(i))
        per_submit = (time.perf_counter() - start) / 10_000
    assert per_submit < 50e-6, f"submit took {per_submit * 1e6:.1f} us"
    assert counts.dropped["queue_full"] >= 10_000 - 100 - 20
    warnings = [r for r in caplog.records if "traffic log unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert counts.written == 0


async def test_recovers_when_the_sqlite_directory_appears(tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store directory should be")
    url = f"sqlite:///{blocker / 'traffic.db'}"
    counts = Counts()
    writer = writer_for(url, counts)
    async with running(writer):
        writer.submit(rec(0))
        await until(lambda: counts.dropped["database"] == 1)
        blocker.unlink()
        writer.submit(rec(1))
        await until(lambda: counts.written == 1)
    assert rows(url) == ["r1"]


async def test_recovers_when_the_postgres_database_appears(pg_url: str) -> None:
    name = f"late_{os.getpid()}_{time.monotonic_ns()}"
    url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    counts = Counts()
    writer = writer_for(url, counts)
    async with running(writer):
        writer.submit(rec(0))
        await until(lambda: counts.dropped["database"] == 1)
        create_database(pg_url, name)
        writer.submit(rec(1))
        await until(lambda: counts.written == 1)
    assert rows(url) == ["r1"]


async def test_an_unexpected_error_is_logged_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    attempts: list[int] = []

    def flaky_open() -> TrafficLog:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("a bug")
        return TrafficLog.open(url)

    counts = Counts()
    writer = TrafficWriter(
        flaky_open, flush_interval_s=FAST, on_drop=counts.drop, on_write=counts.write,
        retention_every_s=3600,
    )  # fmt: skip
    writer.submit(rec(0))
    async with running(writer):
        await until(lambda: counts.dropped["database"] == 1)
        writer.submit(rec(1))
        await until(lambda: counts.written == 1)
    (bug,) = [r for r in caplog.records if "a bug" in r.getMessage()]
    assert bug.exc_info is not None  # a bug is logged with its traceback
    assert rows(url) == ["r1"]


async def test_retention_runs_in_the_writer(log_url: str) -> None:
    old = TrafficLog.open(log_url)
    old.insert([rec(i, ts=NOW - 40 * DAY) for i in range(3)] + [rec(9, ts=NOW - DAY)])
    old.close()
    counts = Counts()
    writer = writer_for(log_url, counts, retention=Retention(30, 100, 0.5), clock=lambda: NOW)
    async with running(writer):
        await until(lambda: rows(log_url) == ["r9"])
    opened = TrafficLog.open(log_url)
    assert opened.read(content=True)[0].record.request is None  # content older than 12 h
    opened.close()


CHILD = """
import asyncio, sys
from gateway.adapt.log import TrafficLog
from gateway.adapt.writer import TrafficWriter
from tests.gateway.adapt.test_log import rec

async def main():
    written = []
    writer = TrafficWriter(lambda: TrafficLog.open(sys.argv[1]), batch_size=50,
                           flush_interval_s=0.01, on_write=written.append)
    task = asyncio.create_task(writer.run())
    for i in range(500):
        writer.submit(rec(i))
    while sum(written) < 500:
        await asyncio.sleep(0.01)
    writer._flush_interval_s = 3600  # what comes next stays queued
    for i in range(500, 520):
        writer.submit(rec(i))
    print("committed", sum(written), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_kill_9_keeps_every_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "traffic.db"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, f"sqlite:///{path}"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as child:  # fmt: skip
        assert child.stdout is not None and child.stderr is not None
        line = child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        assert line.strip() == "committed 500", child.stderr.read()
    assert (path.parent / "traffic.db-wal").exists()  # the rows may sit in the WAL only
    opened = TrafficLog.open(f"sqlite:///{path}")
    with opened.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert conn.execute(sa.text("SELECT count(*) FROM traffic")).scalar() == 500
    opened.close()
