"""A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` on a free loopback port,
in a temporary directory, stopped (immediately) and removed at the end. PostgreSQL refuses
to run as root, so under root the server runs as the `postgres` user (Debian's package
creates it) in a directory it owns."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port
from tests.tools import require

USER = "distillgate"
DATABASE = "distillgate"
# Durability is worthless in a cluster thrown away after the run; without it
# CREATE DATABASE and commits cost no fsync.
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def binaries() -> Path | None:
    """The server's bin directory: `pg_config --bindir`, else the newest Debian one."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    versions.sort(key=lambda bindir: _major(bindir.parent.name))
    return versions[-1] if versions else None


def _major(name: str) -> int:
    return int(name) if name.isdigit() else 0


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _workdir(tmp: Path) -> tuple[Path, bool]:
    """Where the cluster lives, and whether it is ours to remove. Under root: a fresh
    directory owned by `postgres` (pytest's are private to root)."""
    if os.geteuid() != 0:
        return tmp, False
    work = Path(tempfile.mkdtemp(prefix="dg-pg-"))
    shutil.chown(work, "postgres", "postgres")
    return work, True


@contextlib.contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """Start a cluster and yield the SQLAlchemy URL of its database `distillgate` (user
    `distillgate`, trust authentication, loopback only). Skips when PostgreSQL is not
    installed, unless $CI is set: then it fails, since CI must test PostgreSQL."""
    bindir = require(binaries(), "PostgreSQL server binaries", "apt-get install postgresql",
                     "test PostgreSQL")  # fmt: skip
    work, owned = _workdir(tmp)
    data, sockets = work / "data", Path(tempfile.mkdtemp(prefix="dg-pgs-"))
    if owned:
        shutil.chown(sockets, "postgres", "postgres")
    pg_ctl = str(bindir / "pg_ctl")
    started = False
    try:
        _run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8",
             "--no-locale", "--no-sync"],
            "initdb",
        )  # fmt: skip
        port = free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 {FAST}"
        log = work / "server.log"
        _run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"], "pg_ctl")
        started = True
        _create_database(f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres", DATABASE)
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], "pg_ctl stop")
        shutil.rmtree(sockets, ignore_errors=True)
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def _create_database(admin_url: str, name: str) -> None:
    import psycopg

    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def create_database(url: str, name: str) -> str:
    """Create database `name` on the cluster of `url`; return its URL."""
    base = url.rsplit("/", 1)[0]
    _create_database(f"{base}/postgres", name)
    return f"{base}/{name}"
