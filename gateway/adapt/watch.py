"""The detectors over the traffic log, as the adapt process runs them: read the rows after
a cursor in id order, feed each to the detectors, store and count what they find.

On start the detectors are warmed on the most recent rows without reporting (their
windows fill as they would have), so a restart neither misses a shift in progress nor
reports an old one again; `replay_from` instead reports everything from a point in time.

On PostgreSQL, with several gateways writing, ids are handed out before their batches
commit, so a row can become visible after rows with higher ids. A step therefore reads
only up to the highest id seen one step earlier (the `horizon`): every batch holding such
an id has long committed by then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from gateway.adapt.detectors import Detectors, observation
from gateway.adapt.log import TrafficLog
from gateway.adapt.records import EVENT_KINDS, ShiftEvent

READ_BATCH = 5_000


class WatchMetrics:
    """The adapt process's own metrics (served on its --metrics-port)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "distillgate_shift_events",
            "Shift events found by the detectors, by kind (new_traffic, mix_change, degradation).",
            ["kind"],
            registry=self.registry,
        )
        self.rows = Counter(
            "distillgate_adapt_rows_read", "Traffic log rows fed to the detectors.",
            registry=self.registry,
        )  # fmt: skip
        for kind in EVENT_KINDS:
            self.events.labels(kind)


@dataclass
class Watcher:
    log: TrafficLog
    detectors: Detectors
    metrics: WatchMetrics
    store_events: bool = True
    cursor: int = 0  # the id of the last row fed to the detectors
    horizon: int | None = None  # read up to this id (None: no bound, SQLite)

    def __post_init__(self) -> None:
        if self.log.engine.dialect.name == "postgresql":
            self.horizon = self.log.last_id()

    def warm_up(self, rows: int, found: list[ShiftEvent] | None = None) -> int:
        """Feed the last `rows` rows without reporting (the events they trigger go to
        `found` when given); returns how many were fed."""
        last = self.log.last_id()
        self.cursor = max(0, last - rows)
        fed = 0
        while self.cursor < last:
            batch = self.log.read(after_id=self.cursor, limit=READ_BATCH)
            if not batch:
                break
            for row in batch:
                events = self.detectors.update(observation(row))
                if found is not None:
                    found += events
            self.cursor, fed = batch[-1].id, fed + len(batch)
        return fed

    def resume(self, cursor: int, rows: int) -> None:
        """Continue from a stored `cursor` (a restarted or cron-run process): feed the
        `rows` rows up to it without reporting, so the detectors' windows hold what they
        held, then report every row after it."""
        cursor = min(cursor, self.log.last_id())
        self.cursor = max(0, cursor - rows)
        while self.cursor < cursor:
            batch = [r for r in self.log.read(after_id=self.cursor, limit=READ_BATCH)
                     if r.id <= cursor]  # fmt: skip
            if not batch:
                break
            for row in batch:
                self.detectors.update(observation(row))
            self.cursor = batch[-1].id
        self.cursor = cursor

    def replay_from(self, since: float) -> None:
        """Report everything from `since` on: start the cursor just before it."""
        first = self.log.read(since=since, limit=1)
        self.cursor = first[0].id - 1 if first else self.log.last_id()

    def step(self) -> list[ShiftEvent]:
        """Feed every row after the cursor; store, count and return the events found."""
        found: list[ShiftEvent] = []
        bound, latest = self.horizon, self.log.last_id()
        while batch := self.log.read(after_id=self.cursor, limit=READ_BATCH):
            if bound is not None:
                batch = [row for row in batch if row.id <= bound]
                if not batch:
                    break
            for row in batch:
                found += self.detectors.update(observation(row))
            self.cursor = batch[-1].id
            self.metrics.rows.inc(len(batch))
        if bound is not None:
            self.horizon = latest
        if found and self.store_events:
            self.log.add_events(found)
        for event in found:
            self.metrics.events.labels(event.kind).inc()
        return found

    def follow(
        self, report: Callable[[ShiftEvent], None], interval_s: float, once: bool = False
    ) -> None:
        """Step forever (every `interval_s`), or until caught up with `once`."""
        while True:
            for event in self.step():
                report(event)
            if once:
                return
            time.sleep(interval_s)
