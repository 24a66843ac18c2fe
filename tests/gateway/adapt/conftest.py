"""The traffic log's databases: one throwaway PostgreSQL cluster per test process (per
pytest-xdist worker), and `log_url`, which runs a test once on a fresh SQLite file and
once on a fresh PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import create_database, postgres_server


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture
def fresh_pg(request: pytest.FixtureRequest) -> str:
    """A new, empty database on the session's cluster."""
    pg_url: str = request.getfixturevalue("pg_url")
    return create_database(pg_url, f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'traffic.db'}"
    return request.getfixturevalue("fresh_pg")
