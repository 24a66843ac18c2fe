"""The adapt process (`distillgate adapt run | once`, or `serve --adapt`'s child): a thin
loop that reads the traffic log, runs the detectors, turns their events into jobs and
rollbacks, advances every student's rollout on the evidence in the log, and runs one job
at a time in a worker thread (so detection and rollouts go on while a student trains).

It runs niced, with its own torch thread count, and serves its own /metrics. Everything
it knows is in the database and the model store: the detectors' cursor, the jobs, the
rollouts; a restart resumes (a job that was running is resumed by the factory, or
completed when its student is already registered).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from gateway.adapt.dataset import usable_rows
from gateway.adapt.detectors import Detectors
from gateway.adapt.job import Context, finish_registered, run_job
from gateway.adapt.records import ShiftEvent
from gateway.adapt.rollout import STAGES, Transition, decide
from gateway.adapt.state import JOB_STATUSES, Job
from gateway.adapt.watch import Watcher, WatchMetrics

CURSOR_KEY = "cursor"
log = logging.getLogger("distillgate")


class AdaptMetrics(WatchMetrics):
    """The watcher's counters plus the loop's: transitions, jobs, stages, agreement."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.transitions = Counter(
            "distillgate_adapt_transitions",
            "Rollout stage transitions, by the stage left and the stage entered.",
            ["from", "to"], registry=r,
        )  # fmt: skip
        self.jobs = Gauge("distillgate_adapt_jobs", "Adaptation jobs by status.", ["status"],
                          registry=r)  # fmt: skip
        self.stage = Gauge(
            "distillgate_adapt_stage", "1 for each student's current rollout stage.",
            ["student", "stage"], registry=r,
        )  # fmt: skip
        self.share = Gauge("distillgate_adapt_share", "Share of its domain a student may answer.",
                           ["student"], registry=r)  # fmt: skip
        self.agreement = Gauge(
            "distillgate_adapt_agreement",
            "A student's agreement with the teacher over the evidence of its current stage.",
            ["student"], registry=r,
        )  # fmt: skip
        self.cycles = Counter("distillgate_adapt_cycles", "Cycles of the adapt loop.", registry=r)
        for status in JOB_STATUSES:
            self.jobs.labels(status)
        # Zeros for every move out of a live stage, so that an alert's increase() sees the
        # first rollback (a series born at 1 shows no increase).
        for before in STAGES[:-1]:
            for after in STAGES:
                self.transitions.labels(before, after)


@dataclass
class AdaptProcess:
    ctx: Context
    metrics: AdaptMetrics
    watcher: Watcher = field(init=False)
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    running: tuple[Job, Future[Job]] | None = None

    def __post_init__(self) -> None:
        detect = self.ctx.config.adapt.detect
        self.watcher = Watcher(self.ctx.log, Detectors(detect), self.metrics)
        stored = self.ctx.state.get(CURSOR_KEY)
        if stored is None:
            self._first_start(detect.window * 4)
        else:
            self.watcher.resume(int(stored), detect.window * 4)
        self._recover()

    def _first_start(self, rows: int) -> None:
        """The first start on a database: warm the detectors on its recent rows, and act
        on new traffic found there that still holds (a shift already under way when the
        loop is first started must not be missed; the jobs table keeps it from being
        acted on twice)."""
        found: list[ShiftEvent] = []
        self.watcher.warm_up(rows, found)
        new = self.watcher.detectors.new_traffic
        holding = [e for e in found if e.kind == "new_traffic" and new.holds(e.key)]
        if holding:
            self.ctx.log.add_events(holding)
        for event in holding:
            self.metrics.events.labels(event.kind).inc()
            self.on_event(event)

    def _recover(self) -> None:
        """Jobs left `running` by a process that died: complete those whose student is
        registered, queue the others again (the factory resumes its saved phases)."""
        for job in self.ctx.state.jobs(("running",)):
            if job.student and self.ctx.store.has(job.student):
                target = float(job.record.get("target", 0.0))
                finish_registered(self.ctx, job, target)
            else:
                self.ctx.state.update_job(
                    job.id, status="pending", reason="resumed after a restart"
                )

    # -- one cycle ---------------------------------------------------------------------

    def cycle(self, inline: bool = False) -> list[ShiftEvent]:
        """Detect, act on events, advance rollouts, run jobs (in this thread with
        `inline`, for `adapt once`)."""
        if self.ctx.policy_file is not None:
            self.ctx.policy_file.refresh()
        events = self.watcher.step()
        self.ctx.state.put(CURSOR_KEY, str(self.watcher.cursor))
        for event in events:
            self.on_event(event)
        self.advance()
        self.schedule(inline)
        self.metrics.cycles.inc()
        self._export()
        return events

    def on_event(self, event: ShiftEvent) -> None:
        state = self.ctx.state
        if event.kind == "new_traffic":
            name = "traffic-" + "".join(c for c in event.key if c.isalnum())[:12]
            job = state.add_job(event.key, name, None, time.time())
            if job is not None:
                state.update_job(job.id, record={"event": _event_dict(event)})
                log.info("adapt: new traffic %s: job %s (%s)", event.key, job.id, name)
        elif event.kind == "degradation":
            self._degraded(event)
        else:
            log.info("adapt: %s %s %s", event.kind, event.key, event.evidence)

    def _degraded(self, event: ShiftEvent) -> None:
        """A live student's agreement dropped: back to shadow, and a refresh of its job
        with recent data (a new student; this one stays in shadow until it proves itself
        again or is retired)."""
        student = event.key.split("/", 1)[0]
        rollout = self.ctx.state.rollout(student)
        if rollout is None or rollout.stage not in ("canary", "live"):
            return
        figures = {k: v for k, v in event.evidence.items() if isinstance(v, int | float)}
        reason = "degradation event: agreement with the teacher dropped"
        t = Transition(student, rollout.stage, "shadow", 0.0, reason, figures)
        self._apply(rollout, t)
        job = next((j for j in self.ctx.state.jobs() if j.student == student), None)
        if job is not None:
            generation = int(job.record.get("generation", 0)) + 1
            record = {**job.record, "generation": generation, "tried": [], "refresh_of": student}
            reason = f"refresh after degradation of {student}"
            self.ctx.state.update_job(job.id, status="pending", attempt=0, reason=reason,
                                      record=record)  # fmt: skip

    def advance(self) -> None:
        """Decide every student's next stage on the evidence since it entered this one
        (live: the newest min_pairs pairs, so a late drop is not diluted)."""
        config = self.ctx.config.adapt.rollout
        for rollout in self.ctx.state.rollouts().values():
            if rollout.stage == "retired":
                continue
            last = config.min_pairs if rollout.stage == "live" else None
            evidence = self.ctx.log.evidence(rollout.student, rollout.since_id, last)
            if evidence.agreement is not None:
                self.metrics.agreement.labels(rollout.student).set(evidence.agreement)
            transition = decide(rollout, evidence, config)
            if transition is not None:
                self._apply(rollout, transition)

    def _apply(self, rollout, transition: Transition) -> None:
        self.ctx.state.apply(rollout, transition, time.time(), self.ctx.log.last_id())
        self.metrics.transitions.labels(transition.before, transition.after).inc()
        log.info("adapt: %s %s -> %s (share %g): %s", transition.student, transition.before,
                 transition.after, transition.share, transition.reason)  # fmt: skip

    # -- jobs ------------------------------------------------------------------------

    def schedule(self, inline: bool) -> None:
        if self.running is not None:
            job, future = self.running
            if not future.done():
                return
            self.running = None
            if (exc := future.exception()) is not None:
                self._errored(job, exc)
        self._wake_waiting()
        pending = self.ctx.state.jobs(("pending",))
        if not pending:
            return
        job = pending[0]
        if inline:
            try:
                run_job(self.ctx, job)
            except Exception as exc:
                self._errored(job, exc)
            return
        self.running = (job, self.worker.submit(run_job, self.ctx, job))

    def _errored(self, job: Job, exc: BaseException) -> None:
        log.error("adapt: job %s failed", job.id, exc_info=exc)
        reason = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        self.ctx.state.update_job(job.id, status="failed", reason=reason)

    def _wake_waiting(self) -> None:
        """A waiting job goes back to pending once the log holds the rows it waits for."""
        for job in self.ctx.state.jobs(("waiting",)):
            needed = int(job.record.get("wait_rows", self.ctx.config.adapt.min_examples))
            if usable_rows(self.ctx.log, job.fingerprint, enough=needed) >= needed:
                self.ctx.state.update_job(job.id, status="pending", reason=f"{needed} rows logged")

    def _export(self) -> None:
        state, m = self.ctx.state, self.metrics
        counts = {s: 0 for s in JOB_STATUSES}
        for job in state.jobs():
            counts[job.status] = counts.get(job.status, 0) + 1
        for status, n in counts.items():
            m.jobs.labels(status).set(n)
        for rollout in state.rollouts().values():
            for stage in STAGES:
                m.stage.labels(rollout.student, stage).set(float(stage == rollout.stage))
            m.share.labels(rollout.student).set(rollout.share)

    def run(self, interval_s: float, stop: Iterator[bool]) -> None:
        """Cycle every `interval_s` until `stop` yields True."""
        while not next(stop):
            started = time.monotonic()
            try:
                self.cycle()
            except Exception:  # a cycle that fails (database away) is retried, not fatal
                log.exception("adapt: cycle failed; retrying in %.0f s", interval_s)
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def _event_dict(event: ShiftEvent) -> dict[str, object]:
    return {"kind": event.kind, "key": event.key, "ts": event.ts, "at_id": event.at_id,
            "evidence": event.evidence}  # fmt: skip


def lower_priority(nice: int, threads: int | None) -> None:
    """Let serving keep its latency: a higher nice value, and few torch threads."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    if threads:
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # already set once in this process
            torch.set_num_interop_threads(1)


@contextlib.contextmanager
def single(store_root: Path) -> Iterator[None]:
    """One adapt process per model store: an exclusive lock on `<store>/.adapt.lock`."""
    store_root.mkdir(parents=True, exist_ok=True)
    path = store_root / ".adapt.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise RuntimeError(
                f"another adapt process (pid {holder}) already runs on the store {store_root}; "
                "stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
