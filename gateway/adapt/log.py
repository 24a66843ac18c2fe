"""The traffic log's storage: one code path (SQLAlchemy Core) for a SQLite file in WAL mode
and for PostgreSQL. A versioned schema with migrations, batched inserts, reads by
increasing id, retention, the detectors' shift events, and the counts `traffic stats` shows.

Row ids only grow (SQLite's AUTOINCREMENT, PostgreSQL's sequence) and are never reused,
even after retention deletes every row, so a reader that remembers the last id it saw
never misses or rereads a row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection, Engine

from gateway.adapt.records import SHADOW, ShiftEvent, StoredRecord, TrafficRecord
from gateway.adapt.rollout import Evidence
from gateway.adapt.state import create_v2

CONTENT = ("request", "response", "reference")
FIELDS = tuple(f.name for f in dataclasses.fields(TrafficRecord))
METADATA_FIELDS = tuple(f for f in FIELDS if f not in CONTENT)
_VALUES = operator.attrgetter(*FIELDS)  # a record's column values, in FIELDS order
# Rows per INSERT statement: under SQLite's 32,766 and PostgreSQL's 65,535 parameters.
ROWS_PER_STATEMENT = 32_000 // len(FIELDS)
CHUNK = 5_000  # rows per delete/update transaction: a big backlog never holds a long lock
TOP_FINGERPRINTS = 20
NONE_KEY = "(none)"  # how a NULL group (no class, no domain) is named in stats
_PG_MIGRATION_LOCK = 0x6469_7374_696C_6C  # "distill": one advisory lock id for migrations
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the rowid alias


class TrafficLogError(Exception):
    """A traffic log a user must fix: a bad URL, a database that cannot be reached when
    opened, or a schema written by a newer distillgate."""


@dataclass(frozen=True)
class Retention:
    """How long rows live: metadata `max_age_days` and at most `max_rows` rows; content
    (request, response, reference) only `content_max_age_days`. None: no limit."""

    max_age_days: float | None = 30
    max_rows: int | None = 1_000_000
    content_max_age_days: float | None = 7

    def __post_init__(self) -> None:
        for name in ("max_age_days", "max_rows", "content_max_age_days"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"retention {name} must be positive or None, got {value}")


@dataclass(frozen=True)
class RetentionResult:
    """Rows deleted for age (`expired`) and for the row limit (`excess`), and rows whose
    content was cleared (`stripped`)."""

    expired: int = 0
    excess: int = 0
    stripped: int = 0


class TrafficStats(BaseModel):
    """Counts over the log (or its rows since `since`), each group largest first; a NULL
    group is named "(none)"; `by_fingerprint` holds the 20 largest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: float | None
    rows: int
    with_content: int
    first_ts: float | None
    last_ts: float | None
    by_slo_class: dict[str, int]
    by_domain: dict[str, int]
    by_fingerprint: dict[str, int]
    by_model: dict[str, int]
    by_outcome: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class Schema:
    """The tables, built per log (no module-level metadata)."""

    metadata: sa.MetaData
    traffic: sa.Table
    events: sa.Table
    version: sa.Table


def schema() -> Schema:
    """The current schema (version 1). When a later version changes a table, freeze
    these definitions for `_create_v1` and let the new migration alter them."""
    md = sa.MetaData()
    text, num, whole = sa.Text, sa.Float, sa.Integer
    traffic = sa.Table(
        "traffic", md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", num, nullable=False),
        *(sa.Column(n, text, nullable=False) for n in (
            "request_id", "endpoint", "requested_model", "model", "role", "fingerprint",
            "outcome",
        )),
        sa.Column("status", whole, nullable=False),
        sa.Column("latency_ms", num, nullable=False),
        sa.Column("prompt_tokens", whole, nullable=False),
        sa.Column("completion_tokens", whole, nullable=False),
        sa.Column("ttft_ms", num),
        *(sa.Column(n, text) for n in ("slo_class", "key_hash", "domain")),
        sa.Column("confidence", num),
        sa.Column("route_reason", text),
        sa.Column("cost", num),
        *(sa.Column(n, text) for n in CONTENT),
        sa.Column("agreement", num),
        sqlite_autoincrement=True,  # ids are never reused, even after deleting every row
    )  # fmt: skip
    has_content = _has_content(traffic)
    sa.Index("ix_traffic_ts", traffic.c.ts)
    sa.Index("ix_traffic_fingerprint_ts", traffic.c.fingerprint, traffic.c.ts)
    sa.Index("ix_traffic_model_ts", traffic.c.model, traffic.c.ts)
    # Partial: retention finds rows whose content is due without rescanning stripped ones.
    sa.Index(
        "ix_traffic_content_ts", traffic.c.ts,
        sqlite_where=has_content, postgresql_where=has_content,
    )  # fmt: skip
    events = sa.Table(
        "shift_events", md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", num, nullable=False),
        sa.Column("kind", text, nullable=False),
        sa.Column("key", text, nullable=False),
        sa.Column("at_id", sa.BigInteger, nullable=False),
        sa.Column("evidence", text, nullable=False),  # JSON
        sqlite_autoincrement=True,
    )  # fmt: skip
    sa.Index("ix_shift_events_ts", events.c.ts)
    sa.Index("ix_shift_events_kind_key", events.c.kind, events.c.key)
    version = sa.Table("distillgate_schema", md, sa.Column("version", whole, nullable=False))
    return Schema(md, traffic, events, version)


def _has_content(traffic: sa.Table) -> sa.ColumnElement[bool]:
    return sa.or_(*(traffic.c[n].is_not(None) for n in CONTENT))


def _create_v1(conn: Connection) -> None:
    schema().metadata.create_all(conn)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_v1, create_v2)


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, paramstyle: str, rows: int) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"  # sqlite3; psycopg takes %s positionally
    row = "(" + ", ".join([mark] * len(FIELDS)) + ")"
    return f"INSERT INTO {table} ({', '.join(FIELDS)}) VALUES " + ", ".join([row] * rows)


def sqlite_path(store_root: Path) -> Path:
    """Where the log lives when no DSN is given: traffic.db in the model store."""
    return Path(store_root).expanduser() / "traffic.db"


def database_url(dsn: str | None, store_root: Path) -> str:
    """The log's SQLAlchemy URL: `dsn` (a plain postgresql:// one is given the installed
    psycopg 3 driver), else the SQLite file traffic.db in the model store."""
    if dsn:
        for scheme in ("postgresql://", "postgres://"):
            if dsn.startswith(scheme):
                return "postgresql+psycopg://" + dsn[len(scheme) :]
        return dsn
    return f"sqlite:///{sqlite_path(store_root)}"


def _sqlite_setup(engine: Engine) -> None:
    """WAL pragmas on every connection, and real transactions: the sqlite3 driver's legacy
    mode would neither BEGIN before DDL nor take the write lock up front (SQLAlchemy's
    documented recipe); `sqlite_immediate` asks for BEGIN IMMEDIATE (migrations)."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=5000")  # first: the others may wait for a lock
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class TrafficLog:
    """The log in one database. Methods are blocking (call them from a thread in async
    code); SQLAlchemy errors propagate as `sqlalchemy.exc.SQLAlchemyError`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.schema = schema()

    @classmethod
    def open(cls, url: str) -> TrafficLog:
        """Connect and migrate. A SQLite file's directory is created."""
        shown = "(unparsable)"  # never the raw URL: it may hold a password
        try:
            parsed = sa.make_url(url)
            shown = parsed.render_as_string(hide_password=True)
            backend, database = parsed.get_backend_name(), parsed.database
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if backend == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": 3}
            if backend == "sqlite" and database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(parsed, **kwargs)
        except sa.exc.ArgumentError as exc:
            raise TrafficLogError(f"bad traffic log URL {shown}: {exc}") from None
        except OSError as exc:
            raise TrafficLogError(f"cannot create the traffic log's directory: {exc}") from None
        if engine.dialect.name == "sqlite":
            _sqlite_setup(engine)
        log = cls(engine)
        try:
            log.migrate()
        except sa.exc.DBAPIError as exc:  # unreachable, refused, not a database, no rights
            engine.dispose()
            reason = " ".join(str(exc.orig).split())
            raise TrafficLogError(f"cannot open the traffic log at {log.url}: {reason}") from None
        except BaseException:
            engine.dispose()
            raise
        return log

    @property
    def url(self) -> str:
        """The URL with any password hidden (for messages)."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> int:
        """Bring the schema to the newest version this code knows, in one transaction that
        only one process at a time runs; return the version."""
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                stored = self._stored_version(conn)
                if stored > len(MIGRATIONS):
                    raise TrafficLogError(
                        f"the traffic log at {self.url} has schema version {stored}, this "
                        f"distillgate knows up to {len(MIGRATIONS)}: it was written by a newer "
                        "distillgate; upgrade distillgate or use another database"
                    )
                for step in MIGRATIONS[stored:]:
                    step(conn)
                if stored < len(MIGRATIONS):
                    version = self.schema.version
                    conn.execute(sa.delete(version))
                    conn.execute(sa.insert(version).values(version=len(MIGRATIONS)))
        return len(MIGRATIONS)

    def _stored_version(self, conn: Connection) -> int:
        if not sa.inspect(conn).has_table(self.schema.version.name):
            return 0
        return conn.execute(sa.select(sa.func.max(self.schema.version.c.version))).scalar() or 0

    def insert(self, records: Sequence[TrafficRecord]) -> None:
        """Append records in one transaction, as multi-row INSERT statements written for
        the driver. Not SQLAlchemy's executemany: it costs ~20 us of Python per row, and
        sqlite3's executemany releases and retakes the GIL once per row, so while the
        gateway's event loop is busy a 512-row batch took a second and slowed requests;
        one statement per 1,000 rows binds in C and releases the GIL once."""
        if not records:
            return
        with self.engine.begin() as conn:
            for start in range(0, len(records), ROWS_PER_STATEMENT):
                chunk = records[start : start + ROWS_PER_STATEMENT]
                values = [v for r in chunk for v in _VALUES(r)]
                conn.exec_driver_sql(self._insert_sql(len(chunk)), tuple(values))

    def _insert_sql(self, rows: int) -> str:
        return _insert_sql(self.schema.traffic.name, self.engine.dialect.paramstyle, rows)

    def read(
        self,
        after_id: int = 0,
        limit: int = 10_000,
        *,
        since: float | None = None,
        fingerprint: str | None = None,
        content: bool = False,
    ) -> list[StoredRecord]:
        """Rows with id > `after_id` in id order; the content columns only with `content`
        (else None in the records)."""
        t = self.schema.traffic
        names = FIELDS if content else METADATA_FIELDS
        query = sa.select(t.c.id, *(t.c[n] for n in names)).where(t.c.id > after_id)
        if since is not None:
            query = query.where(t.c.ts >= since)
        if fingerprint is not None:
            query = query.where(t.c.fingerprint == fingerprint)
        query = query.order_by(t.c.id).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            StoredRecord(row[0], TrafficRecord(**dict(zip(names, row[1:], strict=True))))
            for row in rows
        ]

    def evidence(self, model: str, after_id: int, last_pairs: int | None = None) -> Evidence:
        """A student's agreement pairs (rows with an agreement score: shadow answers and
        audits) and its own answered requests, in rows after `after_id`; with
        `last_pairs`, the agreement of only the newest that many pairs."""
        t = self.schema.traffic
        after = sa.and_(t.c.model == model, t.c.id > after_id)
        scored = sa.and_(after, t.c.agreement.is_not(None))
        pairs = sa.select(t.c.agreement).where(scored)
        if last_pairs is not None:
            pairs = pairs.order_by(t.c.id.desc()).limit(last_pairs)
        pairs = pairs.subquery()
        own = sa.and_(after, sa.or_(t.c.route_reason.is_(None), t.c.route_reason != SHADOW))
        failed = sa.case((t.c.outcome == "server_error", 1), else_=0)
        with self.engine.connect() as conn:
            n, total = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pairs.c.agreement), 0.0))
            ).one()
            requests, errors = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(failed), 0)).where(own)
            ).one()
        return Evidence(int(n), float(total), int(requests), int(errors))

    def classes_of(self, fingerprint: str) -> dict[str, int]:
        """The SLO classes that sent a fingerprint's requests, with their counts."""
        t = self.schema.traffic
        query = (
            sa.select(t.c.slo_class, sa.func.count())
            .where(t.c.fingerprint == fingerprint, t.c.slo_class.is_not(None))
            .group_by(t.c.slo_class)
        )
        with self.engine.connect() as conn:
            return {name: n for name, n in conn.execute(query)}

    def last_id(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(self.schema.traffic.c.id))).scalar() or 0

    def count(self) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(self.schema.traffic)
            return conn.execute(query).scalar_one()

    def enforce_retention(self, retention: Retention, now: float) -> RetentionResult:
        """Delete rows past the age limit, then the oldest beyond the row limit, then clear
        content past its age limit; each in chunks of `CHUNK` rows per transaction."""
        t = self.schema.traffic
        expired = excess = stripped = 0
        if retention.max_age_days is not None:
            expired = self._delete(t.c.ts < now - retention.max_age_days * 86_400)
        if retention.max_rows is not None:
            newest_excess = (
                sa.select(t.c.id).order_by(t.c.id.desc()).offset(retention.max_rows).limit(1)
            )
            with self.engine.connect() as conn:
                threshold = conn.execute(newest_excess).scalar()
            if threshold is not None:
                excess = self._delete(t.c.id <= threshold)
        if retention.content_max_age_days is not None:
            stripped = self._strip(now - retention.content_max_age_days * 86_400)
        return RetentionResult(expired, excess, stripped)

    def _delete(self, where: sa.ColumnElement[bool]) -> int:
        t = self.schema.traffic
        chunk = sa.select(t.c.id).where(where).limit(CHUNK)
        return self._chunked(sa.delete(t).where(t.c.id.in_(chunk)))

    def _strip(self, cutoff: float) -> int:
        t = self.schema.traffic
        # The same OR as the partial index's WHERE, so both databases can use the index.
        chunk = sa.select(t.c.id).where(t.c.ts < cutoff, _has_content(t)).limit(CHUNK)
        cleared = dict.fromkeys(CONTENT)
        return self._chunked(sa.update(t).where(t.c.id.in_(chunk)).values(cleared))

    def _chunked(self, statement: sa.Executable) -> int:
        total = 0
        while True:
            with self.engine.begin() as conn:
                done = conn.execute(statement).rowcount
            total += done
            if done < CHUNK:
                return total

    def add_events(self, events: Sequence[ShiftEvent]) -> list[int]:
        """Store events (evidence as JSON; it must be JSON-able); return their ids."""
        if not events:
            return []
        e = self.schema.events
        rows = [
            {"ts": ev.ts, "kind": ev.kind, "key": ev.key, "at_id": ev.at_id,
             "evidence": json.dumps(ev.evidence, sort_keys=True)}
            for ev in events
        ]  # fmt: skip
        with self.engine.begin() as conn:
            returning = sa.insert(e).returning(e.c.id, sort_by_parameter_order=True)
            return [row[0] for row in conn.execute(returning, rows)]

    def events(
        self, since: float | None = None, kind: str | None = None, limit: int = 1000
    ) -> list[tuple[int, ShiftEvent]]:
        """The newest `limit` events (matching `since` and `kind`), oldest first."""
        e = self.schema.events
        query = sa.select(e.c.id, e.c.kind, e.c.key, e.c.ts, e.c.at_id, e.c.evidence)
        if since is not None:
            query = query.where(e.c.ts >= since)
        if kind is not None:
            query = query.where(e.c.kind == kind)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(e.c.id.desc()).limit(limit)).all()
        return [
            (row.id, ShiftEvent(row.kind, row.key, row.ts, row.at_id, json.loads(row.evidence)))
            for row in reversed(rows)
        ]

    def stats(self, since: float | None = None) -> TrafficStats:
        """Totals and per-group counts, computed by the database (GROUP BY)."""
        t = self.schema.traffic
        where = sa.true() if since is None else t.c.ts >= since
        totals = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((_has_content(t), 1), else_=0)), 0),
            sa.func.min(t.c.ts),
            sa.func.max(t.c.ts),
        ).where(where)
        with self.engine.connect() as conn:
            rows, with_content, first, last = conn.execute(totals).one()

            def groups(name: str, limit: int | None = None) -> dict[str, int]:
                n = sa.func.count().label("n")
                query = sa.select(t.c[name], n).where(where).group_by(t.c[name])
                query = query.order_by(n.desc(), t.c[name]).limit(limit)
                return {NONE_KEY if k is None else k: v for k, v in conn.execute(query)}

            return TrafficStats(
                since=since, rows=rows, with_content=int(with_content), first_ts=first,
                last_ts=last, by_slo_class=groups("slo_class"), by_domain=groups("domain"),
                by_fingerprint=groups("fingerprint", TOP_FINGERPRINTS),
                by_model=groups("model"), by_outcome=groups("outcome"),
            )  # fmt: skip
