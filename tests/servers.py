"""The command line and real server processes for tests: `cli` runs `distillgate ARGS` in
this process (fast: no second torch import), `cli_process` as a child process (the smoke
tests), and `gateway` starts `distillgate serve` on a free loopback port, waits for it and
stops it (its output kept for failures)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

DISTILLGATE = [sys.executable, "-m", "gateway.cli"]


def cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`distillgate ARGS` run in this process through its entry function, with its exit
    code and output captured as a child process's would be. (`timeout` is accepted for
    the callers written for `cli_process`; nothing runs in the background to stop.)"""
    from gateway.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(["distillgate", *args], code, out.getvalue(), err.getvalue())


def cli_process(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`distillgate ARGS` as a child process (in `cwd`, default a fresh temporary
    directory, so nothing depends on the repo being the working directory)."""
    with contextlib.ExitStack() as stack:
        where = cwd or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        return subprocess.run(
            [*DISTILLGATE, *args], cwd=where, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def gateway(
    config: dict,
    tmp: Path,
    *,
    store: Path | None = None,
    ready: bool = True,
    timeout_s: float = 120,
    extra: tuple[str, ...] = (),
) -> Iterator[Server]:
    """`distillgate serve` on `config` (a dict written to YAML) on a free loopback port. The
    traffic log goes to a SQLite file beside the config unless `config` says otherwise."""
    path = tmp / f"config-{os.getpid()}-{time.monotonic_ns()}.yaml"
    if "traffic" not in config:
        config = {**config, "traffic": {"dsn": f"sqlite:///{path.with_suffix('.traffic.db')}"}}
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = path.with_suffix(".log")
    cmd = [
        *DISTILLGATE,
        "serve",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if store is not None:
        cmd += ["--store", str(store)]
    cmd += extra
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        if ready:
            server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()
