"""Server processes for the benchmarks: start one and wait until it answers, free ports, and
the CPU time a process tree has spent (bench/overhead/run.py re-exports these)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def process(
    name: str,
    argv: list[str],
    ready_url: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[int]:
    """Run `argv` until `ready_url` answers 200; stop it afterwards."""
    with tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout_s
        while not answers_200(ready_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                state = (
                    f"exited with code {proc.returncode}"
                    if proc.poll() is not None
                    else (f"was not ready within {timeout_s:g} s")
                )
                raise BenchError(f"{name} ({' '.join(argv)}) {state}; log {log.name}:\n{tail}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    # after the command's closing parenthesis: state, ppid, ... (proc(5)); the command
    # itself may hold spaces and parentheses
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> set[int]:
    """`pid` and every live process below it (a gateway's or LiteLLM's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = set(), [pid]
    while todo:
        tree.add(current := todo.pop())
        todo += children.get(current, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its live descendants (all threads) so far."""
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):  # a worker that just exited
            fields = _stat(member)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def redis_server(scratch: Path) -> Iterator[str]:
    """A throwaway redis-server (Debian's) on a free loopback port, no persistence; yields
    its URL. For the keys' rate limits shared by several gateway workers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("--workers > 1 with keys needs a Redis for the shared rate limits: "
                         "apt-get install -y redis-server, or pass --redis-url")  # fmt: skip
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(scratch)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _pongs(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server ({' '.join(argv)}) did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


def _pongs(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False
