"""A throwaway redis-server for tests: Debian's `redis-server` on a free loopback port, no
persistence, stopped at the end. Skips when it is not installed, unless $CI is set (CI
must test the shared rate limits: .ci/run installs it)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port
from tests.tools import require


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """Start one and yield its URL (redis://127.0.0.1:PORT/0)."""
    binary = require(shutil.which("redis-server"), "redis-server",
                     "apt-get install redis-server", "test the shared rate limits")  # fmt: skip
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(tmp)]  # fmt: skip
    log = (tmp / f"redis-{port}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (tmp / f"redis-{port}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start:\n{tail}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False
