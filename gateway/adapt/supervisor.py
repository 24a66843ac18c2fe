"""`distillgate serve --adapt`: the adapt process as the gateway's supervised child. It is
restarted when it dies (after 1 s, doubling to at most a minute while it keeps dying
young), stopped with the gateway (SIGTERM, then SIGKILL after a grace period), and asked
by the kernel to die with its parent should the gateway itself be killed."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1
HEALTHY_AFTER_S = 60.0  # a child that lived this long resets the back-off
MAX_BACKOFF_S = 60.0
log = logging.getLogger("distillgate")


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Keeps `distillgate adapt run <args>` running in a thread of the gateway."""

    def __init__(self, args: Sequence[str], grace_s: float = 10.0) -> None:
        self.command = [sys.executable, "-m", "gateway.cli", "adapt", "run", *args]
        self.grace_s = grace_s
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapt-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.child = subprocess.Popen(self.command, preexec_fn=_die_with_parent)
            log.info("adapt: child process %s started", self.child.pid)
            if self._stop.is_set():  # stopped while it was starting
                self.child.terminate()
            code = self.child.wait()
            if self._stop.is_set():
                return
            lived = time.monotonic() - started
            backoff = 1.0 if lived >= HEALTHY_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            self.restarts += 1
            log.error("adapt: child process exited with %s after %.0f s; restarting in %.0f s",
                      code, lived, backoff)  # fmt: skip
            self._stop.wait(backoff)

    def stop(self) -> None:
        self._stop.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._thread.join(timeout=self.grace_s)
