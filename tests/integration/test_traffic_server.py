"""The traffic log under a real `distillgate serve` process: `kill -9` loses at most the
records still queued and never corrupts the SQLite file, and a restarted gateway goes on
writing to it."""

from __future__ import annotations

import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.models.test_openai_http import serving
from tests.servers import free_port, gateway

pytestmark = [pytest.mark.slow]


def instant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The instant OpenAI-compatible server (gateway/instant.py) as the teacher."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.instant", "--port", str(port), "--model", "instant"]
    with serving(argv, url, tmp_path_factory.mktemp("instant") / "server.log"):
        yield url


def _config(url: str, db: Path) -> dict:
    return {
        "models": [{"name": "teacher", "backend": "openai", "role": "teacher", "url": url,
                    "served_model": "instant"}],
        "traffic": {"dsn": f"sqlite:///{db}", "flush_interval_s": 0.1},
    }  # fmt: skip


def _ask(base: str, n: int) -> int:
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    done = 0
    for i in range(n):
        try:
            sdk.chat.completions.create(
                model="teacher", messages=[{"role": "user", "content": f"Question {i}?"}]
            )
            done += 1
        except openai.APIError:
            break
    return done


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return conn.execute("SELECT count(*) FROM traffic").fetchone()[0]


def test_kill_9_loses_only_queued_records_and_never_corrupts(instant: str, tmp_path: Path) -> None:
    db = tmp_path / "traffic.db"
    with gateway(_config(instant, db), tmp_path) as srv:
        assert _ask(srv.url, 40) == 40
        time.sleep(1.0)  # ten flush intervals: everything answered is written
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
    assert _rows(db) == 40

    with gateway(_config(instant, db), tmp_path) as srv:  # killed while requests run
        answered: list[int] = []
        worker = threading.Thread(target=lambda: answered.append(_ask(srv.url, 10_000)))
        worker.start()
        time.sleep(2.0)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        worker.join(timeout=30)
    after_kill = _rows(db)
    assert 40 < after_kill <= 40 + answered[0]

    with gateway(_config(instant, db), tmp_path) as srv:  # the same file serves on
        assert _ask(srv.url, 5) == 5
    assert _rows(db) == after_kill + 5  # a clean stop flushes every record
