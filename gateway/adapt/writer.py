"""The traffic log's writer: requests hand records to `submit` (O(1), never blocks or
raises); one asyncio task writes them in batches from a thread, keeps the log's retention,
and survives any database failure by dropping (and counting) the batch it could not write.

A batch is written when it holds `batch_size` records or `flush_interval_s` after the
writer found it waiting, so a `kill -9` loses at most the records still queued; what was
committed survives (SQLite in WAL mode, PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from gateway.adapt.log import Retention, TrafficLog, TrafficLogError
from gateway.adapt.records import TrafficRecord

log = logging.getLogger("distillgate")

WARN_EVERY_S = 60.0  # one warning a minute while the database fails, not one per batch
DATABASE_ERRORS = (SQLAlchemyError, TrafficLogError, OSError)


def _no_drop(reason: str, n: int) -> None:
    pass


def _no_write(n: int) -> None:
    pass


class TrafficWriter:
    """Queue and batch-write traffic records. Use from one event loop: `submit` from the
    request handlers, `run` as a task, `close` at shutdown. `on_drop(reason, n)` counts
    dropped records (reason queue_full: the writer fell behind; database: the log could
    not be opened or written; closed: submitted after the writer stopped); `on_write(n)`
    counts committed ones. Neither callback may raise."""

    def __init__(
        self,
        open_log: Callable[[], TrafficLog],
        *,
        queue_size: int = 10_000,
        batch_size: int = 512,
        flush_interval_s: float = 0.5,
        retention: Retention = Retention(),  # noqa: B008  (frozen: safe to share)
        retention_every_s: float = 60.0,
        on_drop: Callable[[str, int], None] = _no_drop,
        on_write: Callable[[int], None] = _no_write,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self._open_log, self._queue_size, self._batch_size = open_log, queue_size, batch_size
        self._flush_interval_s, self._retention = flush_interval_s, retention
        self._retention_every_s, self._clock = retention_every_s, clock
        self._on_drop, self._on_write = on_drop, on_write
        # A deque bounded by hand: append/popleft are O(1) and need no running loop.
        self._queue: deque[TrafficRecord] = deque()
        self._wake = asyncio.Event()  # the first record arrived, a batch is full, or close
        self._closing = self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._log: TrafficLog | None = None
        self._next_retention = 0.0  # monotonic: due at once, then every retention_every_s
        self._warned_at: float | None = None
        self._dropped_since_warning = 0

    def submit(self, record: TrafficRecord) -> None:
        """Queue a record; drop it (counted) when the queue is full or the writer stopped."""
        queue = self._queue
        if len(queue) >= self._queue_size or self._stopped:
            self._on_drop("closed" if self._stopped else "queue_full", 1)
            return
        queue.append(record)
        n = len(queue)
        if n == 1 or n >= self._batch_size:
            self._wake.set()

    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return len(self._queue)

    async def run(self) -> None:
        """Write batches until closed (then flush the queue) or cancelled. Never raises
        but for cancellation: an unexpected error is logged with its traceback and the
        loop goes on."""
        self._task = asyncio.current_task()
        try:
            while not (self._closing and not self._queue):
                try:
                    await self._step()
                except Exception:
                    log.exception("traffic log writer: unexpected error (continuing)")
                    await asyncio.sleep(self._flush_interval_s)
        finally:
            self._stopped = True
            if self._queue:  # cancelled before the queue was flushed
                self._on_drop("closed", len(self._queue))
                self._queue.clear()
            if self._log is not None:
                with contextlib.suppress(Exception):
                    self._log.close()
                self._log = None

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer (waiting at most `timeout_s`; what
        is left then is dropped and counted as closed)."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None and not self._stopped:  # never started: flush here
            task = asyncio.ensure_future(self.run())
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _step(self) -> None:
        batch = await self._gather()
        if batch:
            await self._write(batch)
        if not self._closing and time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + self._retention_every_s
            await self._retain()

    async def _gather(self) -> list[TrafficRecord]:
        """Wait for a record (at most until retention is due), then for a full batch (at
        most the flush interval); take up to a batch."""
        if not self._queue and not self._closing:
            self._wake.clear()
            await self._wait(self._next_retention - time.monotonic())
        if not self._queue:
            return []
        if len(self._queue) < self._batch_size and not self._closing:
            self._wake.clear()
            await self._wait(self._flush_interval_s)
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), self._batch_size))]

    async def _wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, timeout_s))

    async def _write(self, batch: list[TrafficRecord]) -> None:
        try:
            opened = await self._opened()
            await asyncio.to_thread(opened.insert, batch)
        except Exception as exc:  # whatever failed, the batch is lost: count it here, once
            self._on_drop("database", len(batch))
            self._failed(exc, len(batch))
            return
        if self._warned_at is not None:
            log.warning("traffic log: writing again")
            self._warned_at, self._dropped_since_warning = None, 0
        self._on_write(len(batch))

    async def _retain(self) -> None:
        try:
            opened = await self._opened()
            result = await asyncio.to_thread(
                opened.enforce_retention, self._retention, self._clock()
            )
        except Exception as exc:
            self._failed(exc, 0)
            return
        if result.expired or result.excess or result.stripped:
            log.info(
                "traffic log retention: deleted %d expired and %d excess rows, cleared "
                "content of %d", result.expired, result.excess, result.stripped,
            )  # fmt: skip

    async def _opened(self) -> TrafficLog:
        if self._log is None:
            self._log = await asyncio.to_thread(self._open_log)
        return self._log

    def _failed(self, exc: Exception, dropped: int) -> None:
        """Forget the log (the next batch reopens it) and warn at most once a minute; an
        error that is not the database's (a bug) with its traceback."""
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()
            self._log = None
        self._dropped_since_warning += dropped
        now = time.monotonic()
        # The first line only: SQLAlchemy puts the SQL and its parameters (which may be
        # request content) on the lines after it.
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            log.warning(
                "traffic log unavailable, %d records dropped (warning again in %.0f s "
                "at most): %s", self._dropped_since_warning, WARN_EVERY_S,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                exc_info=None if isinstance(exc, DATABASE_ERRORS) else exc,
            )  # fmt: skip
            self._warned_at, self._dropped_since_warning = now, 0
