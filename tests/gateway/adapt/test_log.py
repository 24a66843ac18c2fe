"""The traffic log on a real SQLite file and a real PostgreSQL server (every test that takes
`log_url` runs on both): round trips, reads, retention, events, stats, migrations."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.adapt import log as log_module
from gateway.adapt.log import (
    MIGRATIONS,
    NONE_KEY,
    Retention,
    RetentionResult,
    TrafficLog,
    TrafficLogError,
    database_url,
    schema,
)
from gateway.adapt.records import ShiftEvent, TrafficRecord
from tests.servers import free_port

DAY = 86_400.0
NOW = 1_800_000_000.0


def rec(i: int, **changes: object) -> TrafficRecord:
    """A record with every field set (so a column that loses a value shows)."""
    base = TrafficRecord(
        ts=NOW + i, request_id=f"r{i}", endpoint="chat", requested_model="auto",
        model="teacher", role="teacher", fingerprint=f"fp{i % 3}", outcome="success",
        status=200, latency_ms=12.5 + i, prompt_tokens=10 + i, completion_tokens=3,
        ttft_ms=4.25, slo_class="interactive", key_hash="k1", domain="finance",
        confidence=0.875, route_reason="cheapest_feasible", cost=0.001, request=f"q{i}",
        response=f"a{i}", reference="ref", agreement=1.0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.fixture
def log(log_url: str) -> Iterator[TrafficLog]:
    opened = TrafficLog.open(log_url)
    yield opened
    opened.close()


def test_database_url() -> None:
    store = Path("/srv/store")
    assert database_url(None, store) == "sqlite:////srv/store/traffic.db"
    assert database_url("", store) == "sqlite:////srv/store/traffic.db"
    assert database_url("postgresql://u@h:5432/db", store) == "postgresql+psycopg://u@h:5432/db"
    assert database_url("postgres://u@h/db", store) == "postgresql+psycopg://u@h/db"
    assert database_url("postgresql+psycopg://u@h/db", store) == "postgresql+psycopg://u@h/db"


def test_every_record_field_has_a_column() -> None:
    """A field added to TrafficRecord needs a migration that adds its column."""
    columns = [c.name for c in schema().traffic.columns]
    assert columns == ["id", *(f.name for f in dataclasses.fields(TrafficRecord))]


def test_round_trip_keeps_every_field(log: TrafficLog) -> None:
    records = [rec(i) for i in range(5)] + [
        rec(5, ttft_ms=None, slo_class=None, key_hash=None, domain=None, confidence=None,
            route_reason=None, cost=None, request=None, response=None, reference=None,
            agreement=None, endpoint="completions", outcome="server_error", status=503)
    ]  # fmt: skip
    log.insert(records)
    log.insert([])
    stored = log.read(content=True)
    assert [s.record for s in stored] == records
    ids = [s.id for s in stored]
    assert ids == sorted(ids) and len(set(ids)) == 6
    assert log.last_id() == ids[-1] and log.count() == 6


def test_content_is_loaded_only_when_asked(log: TrafficLog) -> None:
    log.insert([rec(0)])
    (bare,) = log.read()
    assert (bare.record.request, bare.record.response, bare.record.reference) == (None,) * 3
    assert bare.record == dataclasses.replace(rec(0), request=None, response=None, reference=None)


def test_read_filters_and_pages(log: TrafficLog) -> None:
    log.insert([rec(i) for i in range(10)])
    first = log.read(limit=4)
    assert [s.record.request_id for s in first] == ["r0", "r1", "r2", "r3"]
    rest = log.read(after_id=first[-1].id)
    assert [s.record.request_id for s in rest] == [f"r{i}" for i in range(4, 10)]
    assert log.read(after_id=rest[-1].id) == []
    assert [s.record.request_id for s in log.read(since=NOW + 7)] == ["r7", "r8", "r9"]
    fp1 = log.read(fingerprint="fp1", since=NOW + 2)
    assert [s.record.request_id for s in fp1] == ["r4", "r7"]


def test_empty_log(log: TrafficLog) -> None:
    assert (log.last_id(), log.count(), log.read(), log.events()) == (0, 0, [], [])
    stats = log.stats()
    assert (stats.rows, stats.with_content, stats.first_ts, stats.by_model) == (0, 0, None, {})


def test_retention_deletes_old_rows_then_excess_then_strips_content(log: TrafficLog) -> None:
    # Ages (days before now): 40, 35 (expired); 10, 9, 8 (keep metadata, lose content);
    # 2, 1, 0 (keep all). max_rows=5 then drops the oldest one left.
    ages = [40, 35, 10, 9, 8, 2, 1, 0]
    now = NOW + 100 * DAY
    log.insert([rec(i, ts=now - age * DAY) for i, age in enumerate(ages)])
    result = log.enforce_retention(Retention(30, 5, 7), now)
    assert result == RetentionResult(expired=2, excess=1, stripped=2)
    kept = log.read(content=True)
    assert [s.record.request_id for s in kept] == ["r3", "r4", "r5", "r6", "r7"]
    assert [s.record.request is not None for s in kept] == [False, False, True, True, True]
    assert all(s.record.response is None and s.record.reference is None for s in kept[:2])
    assert kept[0].record.agreement == 1.0  # metadata stays
    assert log.enforce_retention(Retention(30, 5, 7), now) == RetentionResult()


def test_retention_works_in_chunks(log: TrafficLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "CHUNK", 3)
    log.insert([rec(i, ts=NOW - 50 * DAY) for i in range(10)] + [rec(10, ts=NOW)])
    log.insert([rec(20 + i, ts=NOW - 8 * DAY) for i in range(7)])
    result = log.enforce_retention(Retention(30, None, 7), NOW)
    assert result == RetentionResult(expired=10, excess=0, stripped=7)
    assert log.count() == 8


def test_no_limits_keep_everything(log: TrafficLog) -> None:
    log.insert([rec(0, ts=0.0)])
    assert log.enforce_retention(Retention(None, None, None), NOW) == RetentionResult()
    assert log.read(content=True)[0].record.request == "q0"


def test_retention_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Retention(max_rows=0)


def test_ids_are_never_reused(log: TrafficLog) -> None:
    """A reader that remembers the last id must see rows written after the log emptied."""
    log.insert([rec(i) for i in range(3)])
    last = log.last_id()
    log.enforce_retention(Retention(max_age_days=1), NOW + 10 * DAY)
    assert log.count() == 0
    log.insert([rec(9)])
    (new,) = log.read(after_id=last)
    assert new.id > last and new.record.request_id == "r9"


def test_events_round_trip(log: TrafficLog) -> None:
    events = [
        ShiftEvent("new_traffic", "fpA", NOW, 10, {"count": 40, "share": 0.125, "ids": ["r1"]}),
        ShiftEvent("mix_change", "finance", NOW + 1, 11, {"from": 0.2, "to": 0.4}),
        ShiftEvent("degradation", "s1/finance", NOW + 2, 12),
    ]
    ids = log.add_events(events)
    assert len(ids) == 3 and ids == sorted(ids)
    assert log.add_events([]) == []
    assert log.events() == list(zip(ids, events, strict=True))
    # the newest two, oldest first
    assert log.events(limit=2) == list(zip(ids[1:], events[1:], strict=True))
    assert log.events(since=NOW + 1, kind="mix_change") == [(ids[1], events[1])]
    assert log.events(kind="degradation")[0][1].evidence == {}


def test_stats_groups_in_the_database(log: TrafficLog) -> None:
    log.insert([rec(i) for i in range(6)])
    log.insert([rec(6, slo_class=None, domain=None, model="s1", outcome="client_error")])
    log.insert([rec(7, request=None, response=None, reference=None, model="s1")])
    log.insert([rec(100 + i, fingerprint=f"many{i:02}") for i in range(25)])
    stats = log.stats()
    assert (stats.rows, stats.with_content) == (33, 32)
    assert (stats.first_ts, stats.last_ts) == (NOW, NOW + 124)
    assert stats.by_slo_class == {"interactive": 32, NONE_KEY: 1}
    assert stats.by_domain == {"finance": 32, NONE_KEY: 1}
    assert stats.by_model == {"teacher": 31, "s1": 2}
    assert stats.by_outcome == {"success": 32, "client_error": 1}
    assert len(stats.by_fingerprint) == 20
    assert list(stats.by_fingerprint.items())[:3] == [("fp0", 3), ("fp1", 3), ("fp2", 2)]
    recent = log.stats(since=NOW + 6)
    assert (recent.rows, recent.since, recent.by_model) == (27, NOW + 6, {"teacher": 25, "s1": 2})
    assert recent.as_dict()["by_outcome"] == {"success": 26, "client_error": 1}


def test_schema_has_the_indexes(log: TrafficLog) -> None:
    inspector = sa.inspect(log.engine)
    traffic = {i["name"]: i["column_names"] for i in inspector.get_indexes("traffic")}
    assert traffic == {
        "ix_traffic_ts": ["ts"],
        "ix_traffic_fingerprint_ts": ["fingerprint", "ts"],
        "ix_traffic_model_ts": ["model", "ts"],
        "ix_traffic_content_ts": ["ts"],
    }
    events = {i["name"]: i["column_names"] for i in inspector.get_indexes("shift_events")}
    assert events == {"ix_shift_events_ts": ["ts"], "ix_shift_events_kind_key": ["kind", "key"]}


def test_migrate_is_idempotent(log_url: str) -> None:
    first = TrafficLog.open(log_url)
    first.insert([rec(0)])
    first.close()
    again = TrafficLog.open(log_url)
    assert again.migrate() == len(MIGRATIONS) == 2
    assert again.count() == 1
    with again.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM distillgate_schema")).all() == [(2,)]
    again.close()


def test_a_version_1_log_gains_the_adaptation_tables(log_url: str) -> None:
    first = TrafficLog.open(log_url)
    first.insert([rec(0)])
    with first.engine.begin() as conn:
        for table in ("adapt_transitions", "adapt_rollouts", "adapt_jobs", "adapt_meta"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        conn.execute(sa.text("UPDATE distillgate_schema SET version = 1"))
    first.close()
    again = TrafficLog.open(log_url)
    tables = set(sa.inspect(again.engine).get_table_names())
    assert {"adapt_jobs", "adapt_rollouts", "adapt_transitions", "adapt_meta"} <= tables
    assert again.count() == 1
    again.close()


def test_a_newer_schema_is_refused(log_url: str) -> None:
    opened = TrafficLog.open(log_url)
    with opened.engine.begin() as conn:
        conn.execute(sa.text("UPDATE distillgate_schema SET version = 99"))
    opened.close()
    with pytest.raises(TrafficLogError, match="written by a newer distillgate"):
        TrafficLog.open(log_url)


def test_concurrent_first_opens_migrate_once(log_url: str) -> None:
    """A gateway replica and the adapt process starting together on a fresh database."""
    n = 4
    barrier = threading.Barrier(n)
    logs: list[TrafficLog] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            logs.append(TrafficLog.open(log_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(logs) == n
    logs[0].insert([rec(0)])
    assert [lg.count() for lg in logs] == [1] * n
    with logs[0].engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM distillgate_schema")).scalar() == 1
    for lg in logs:
        lg.close()


def test_sqlite_file_is_wal_and_its_directory_is_made(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "traffic.db"
    opened = TrafficLog.open(f"sqlite:///{path}")
    with opened.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    opened.close()
    assert path.is_file()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "bad traffic log URL"),
        ("mysqlx+nodriver://u:secret@h/db", "bad traffic log URL mysqlx"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(TrafficLogError, match=message) as info:
        TrafficLog.open(url)
    assert "secret" not in str(info.value)


def test_unreachable_postgres_is_a_user_error() -> None:
    url = f"postgresql+psycopg://nobody:secret@127.0.0.1:{free_port()}/db"
    start = time.monotonic()
    with pytest.raises(TrafficLogError, match="cannot open the traffic log") as info:
        TrafficLog.open(url)
    assert time.monotonic() - start < 5
    assert "secret" not in str(info.value)


def test_sqlite_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(TrafficLogError, match="directory"):
        TrafficLog.open(f"sqlite:///{tmp_path / 'file' / 'traffic.db'}")


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "traffic.db").write_bytes(b"not a database, just bytes " * 100)
    with pytest.raises(TrafficLogError, match=r"cannot open the traffic log.*not a database"):
        TrafficLog.open(f"sqlite:///{tmp_path / 'traffic.db'}")
