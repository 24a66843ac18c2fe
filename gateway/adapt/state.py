"""What the adaptation loop knows, kept in the traffic log's database (schema version 2),
so that it survives a restart and every gateway replica reads the same: the jobs (one per
new traffic: its task, plan, attempts and outcome), each student's rollout stage, and
every stage transition with its reason and evidence.

Methods are blocking (call them from a thread in async code). A transition and the
rollout it changes are written in one transaction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.adapt.rollout import Rollout, Transition, applied

JobStatus = Literal["pending", "running", "waiting", "registered", "failed"]
JOB_STATUSES: tuple[JobStatus, ...] = ("pending", "running", "waiting", "registered", "failed")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


@dataclass(frozen=True)
class AdaptSchema:
    metadata: sa.MetaData
    jobs: sa.Table
    rollouts: sa.Table
    transitions: sa.Table
    meta: sa.Table  # the process's own small state (the detectors' cursor)


def adapt_schema() -> AdaptSchema:
    md = sa.MetaData()
    text, num = sa.Text, sa.Float
    jobs = sa.Table(
        "adapt_jobs", md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("created", num, nullable=False),
        sa.Column("updated", num, nullable=False),
        sa.Column("fingerprint", text, nullable=False, unique=True),
        sa.Column("event_id", sa.BigInteger),
        sa.Column("name", text, nullable=False),
        sa.Column("status", text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, default=0),
        sa.Column("student", text),
        sa.Column("reason", text, nullable=False, default=""),
        sa.Column("record", text, nullable=False, default="{}"),  # JSON: plan, data, results
        sqlite_autoincrement=True,
    )  # fmt: skip
    rollouts = sa.Table(
        "adapt_rollouts", md,
        sa.Column("student", text, primary_key=True),
        sa.Column("domain", text, nullable=False),
        sa.Column("stage", text, nullable=False),
        sa.Column("share", num, nullable=False),
        sa.Column("target", num, nullable=False),
        sa.Column("since_ts", num, nullable=False),
        sa.Column("since_id", sa.BigInteger, nullable=False),
        sa.Column("reason", text, nullable=False),
    )  # fmt: skip
    transitions = sa.Table(
        "adapt_transitions", md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", num, nullable=False),
        sa.Column("student", text, nullable=False),
        sa.Column("before", text, nullable=False),
        sa.Column("after", text, nullable=False),
        sa.Column("share", num, nullable=False),
        sa.Column("reason", text, nullable=False),
        sa.Column("evidence", text, nullable=False),  # JSON
        sqlite_autoincrement=True,
    )  # fmt: skip
    sa.Index("ix_adapt_transitions_student", transitions.c.student, transitions.c.id)
    meta = sa.Table(
        "adapt_meta", md,
        sa.Column("key", text, primary_key=True),
        sa.Column("value", text, nullable=False),
    )  # fmt: skip
    return AdaptSchema(md, jobs, rollouts, transitions, meta)


def create_v2(conn: Connection) -> None:
    """Migration 2 of the traffic log's database: the adaptation loop's tables."""
    adapt_schema().metadata.create_all(conn)


@dataclass(frozen=True)
class Job:
    """One adaptation job: a new traffic (by fingerprint) on its way to a student."""

    id: int
    fingerprint: str
    name: str
    status: JobStatus
    attempt: int = 0
    event_id: int | None = None
    student: str | None = None
    reason: str = ""
    created: float = 0.0
    updated: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredTransition:
    id: int
    ts: float
    transition: Transition


class AdaptState:
    """The loop's tables in one database (opened through `TrafficLog.open`, which
    migrates it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.schema = adapt_schema()

    # -- jobs --------------------------------------------------------------------------

    def add_job(self, fingerprint: str, name: str, event_id: int | None, now: float) -> Job | None:
        """A pending job for `fingerprint`, or None when one exists already (any status)."""
        j = self.schema.jobs
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(j.c.id).where(j.c.fingerprint == fingerprint))
            if exists.first() is not None:
                return None
            conn.execute(sa.insert(j).values(
                created=now, updated=now, fingerprint=fingerprint, event_id=event_id,
                name=name, status="pending", attempt=0, reason="", record="{}",
            ))  # fmt: skip
        return self.job(fingerprint)

    def job(self, key: str | int) -> Job | None:
        """A job by id, fingerprint or name."""
        j = self.schema.jobs
        where = (
            j.c.id == int(key)
            if isinstance(key, int) or str(key).isdigit()
            else sa.or_(j.c.fingerprint == key, j.c.name == key)
        )
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(j).where(where).order_by(j.c.id).limit(1)).first()
        return _job(row) if row is not None else None

    def jobs(self, statuses: tuple[str, ...] | None = None) -> list[Job]:
        j = self.schema.jobs
        query = sa.select(j).order_by(j.c.id)
        if statuses is not None:
            query = query.where(j.c.status.in_(statuses))
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query)]

    def update_job(self, job_id: int, now: float | None = None, **values: Any) -> None:
        if "record" in values:
            values["record"] = json.dumps(values["record"], sort_keys=True)
        j = self.schema.jobs
        values["updated"] = now if now is not None else time.time()
        with self.engine.begin() as conn:
            conn.execute(sa.update(j).where(j.c.id == job_id).values(**values))

    def get(self, key: str) -> str | None:
        m = self.schema.meta
        with self.engine.connect() as conn:
            return conn.execute(sa.select(m.c.value).where(m.c.key == key)).scalar()

    def put(self, key: str, value: str) -> None:
        m = self.schema.meta
        with self.engine.begin() as conn:
            conn.execute(sa.delete(m).where(m.c.key == key))
            conn.execute(sa.insert(m).values(key=key, value=value))

    # -- rollouts ----------------------------------------------------------------------

    def rollouts(self) -> dict[str, Rollout]:
        r = self.schema.rollouts
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(r).order_by(r.c.student)).all()
        return {row.student: _rollout(row) for row in rows}

    def rollout(self, student: str) -> Rollout | None:
        return self.rollouts().get(student)

    def start_rollout(self, rollout: Rollout) -> None:
        """Put a newly registered student in its first stage (shadow), with a transition
        from nothing, in one transaction; a second call for the same student does nothing."""
        r = self.schema.rollouts
        with self.engine.begin() as conn:
            if conn.execute(sa.select(r.c.student).where(r.c.student == rollout.student)).first():
                return
            conn.execute(sa.insert(r).values(**_rollout_row(rollout)))
            first = Transition(rollout.student, "registered", rollout.stage, rollout.share,
                               rollout.reason, {})  # fmt: skip
            self._add_transition(conn, first, rollout.since_ts)

    def apply(self, rollout: Rollout, transition: Transition, now: float, last_id: int) -> Rollout:
        """Store `transition` and the rollout it leads to, in one transaction."""
        after = applied(rollout, transition, now, last_id)
        r = self.schema.rollouts
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(r).where(r.c.student == rollout.student).values(**_rollout_row(after))
            )
            self._add_transition(conn, transition, now)
        return after

    def _add_transition(self, conn: Connection, t: Transition, now: float) -> None:
        conn.execute(sa.insert(self.schema.transitions).values(
            ts=now, student=t.student, before=t.before, after=t.after, share=t.share,
            reason=t.reason, evidence=json.dumps(t.evidence, sort_keys=True),
        ))  # fmt: skip

    def transitions(self, student: str | None = None, limit: int = 100) -> list[StoredTransition]:
        """The newest `limit` transitions (of `student`), oldest first."""
        t = self.schema.transitions
        query = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if student is not None:
            query = query.where(t.c.student == student)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            StoredTransition(
                row.id,
                row.ts,
                Transition(
                    row.student,
                    row.before,
                    row.after,
                    row.share,
                    row.reason,
                    json.loads(row.evidence),
                ),
            )
            for row in reversed(rows)
        ]


def _job(row: Any) -> Job:
    return Job(
        id=row.id, fingerprint=row.fingerprint, name=row.name, status=row.status,
        attempt=row.attempt, event_id=row.event_id, student=row.student, reason=row.reason,
        created=row.created, updated=row.updated, record=json.loads(row.record or "{}"),
    )  # fmt: skip


def _rollout(row: Any) -> Rollout:
    return Rollout(row.student, row.domain, row.stage, row.share, row.target, row.since_ts,
                   row.since_id, row.reason)  # fmt: skip


def _rollout_row(r: Rollout) -> dict[str, Any]:
    return {"student": r.student, "domain": r.domain, "stage": r.stage, "share": r.share,
            "target": r.target, "since_ts": r.since_ts, "since_id": r.since_id,
            "reason": r.reason}  # fmt: skip
