"""Failover with real processes: `distillgate serve` routes `auto` between a teacher and a
cheaper student, each its own instant OpenAI-compatible server (gateway/instant.py).
Under steady load from several threads (the openai SDK, non-streaming, no client
retries) the student is killed with SIGKILL: no request fails (each one the student
drops is retried on the teacher), its circuit opens, and when a new student process
comes up on the same port a half-open probe brings it back into routing.

The run's counts are printed (pytest -s) for docs/BENCHMARKS.md."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.servers import Server, free_port, gateway

pytestmark = pytest.mark.slow

THREADS = 4
COOL_DOWN_S, MAX_COOL_DOWN_S = 0.5, 2.0


class Student:
    """The student's server process, killed and started again on the same port."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> None:
        argv = [sys.executable, "-m", "gateway.instant", "--port", str(self.port),
                "--model", "student"]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the student exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail(f"the student did not come up:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Answer:
    at: float  # when it was answered (monotonic)
    model: str | None  # None: the request failed
    failed_over: str | None
    error: str | None = None


class Load:
    """Threads that call `auto` back to back until stopped, keeping every answer."""

    def __init__(self, server: Server) -> None:
        self.server, self.answers, self.lock = server, [], threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(THREADS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        with openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="x", max_retries=0,
                           timeout=30) as sdk:  # fmt: skip
            while not self.stopping.is_set():
                self._keep(self._ask(sdk))

    def _ask(self, sdk: openai.OpenAI) -> Answer:
        try:
            raw = sdk.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        except openai.APIError as exc:
            return Answer(time.monotonic(), None, None, repr(exc))
        model = raw.parse().model
        return Answer(time.monotonic(), model, raw.headers.get("x-distillgate-failover"))

    def _keep(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def since(self, t: float) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.at >= t]


def _metric(server: Server, line: str) -> float:
    for row in httpx.get(f"{server.url}/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def _until(check, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"{what} within {timeout_s} s")


@pytest.fixture
def routed(instant: str, tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "classes": {"cheapest": {"min_quality": 0.0}}, "default_class": "cheapest",
        "fallback": "teacher", "exploration": 0.0,
        "costs": {"teacher": 0.10, "student": 0.01},
    }))  # fmt: skip
    student = Student(free_port(), tmp_path / "student.log")
    student.start()
    teacher = {"name": "teacher", "backend": "openai", "role": "teacher", "url": instant,
               "served_model": "instant"}  # fmt: skip
    config = {
        "models": [teacher, {"name": "student", "backend": "openai", "url": student.url}],
        "routing": {"policy": str(policy)},
        "limits": {"connect_timeout_s": 1.0},
        "failover": {"cool_down_s": COOL_DOWN_S, "max_cool_down_s": MAX_COOL_DOWN_S},
    }
    try:
        with gateway(config, tmp_path) as server:
            yield server, student
    finally:
        student.stop()


def test_a_killed_student_fails_over_and_comes_back(routed) -> None:
    server, student = routed
    opened = 'distillgate_circuit_opens_total{model="student"}'
    state = 'distillgate_circuit_state{model="student"}'
    start = time.monotonic()
    with Load(server) as load:
        _until(lambda: sum(a.model == "student" for a in load.since(start)) >= 50, 20,
               "the student answered 50 requests")  # fmt: skip
        student.kill()
        killed = time.monotonic() + 0.1  # answers the student sent before dying may be late
        _until(lambda: _metric(server, opened) >= 1, 10, "the student's circuit opened")
        time.sleep(2.0)  # down for a while: failed probes back the cool-down off
        assert _metric(server, state) in (1, 2)
        restarted = time.monotonic()
        student.start()
        up = time.monotonic()
        recovered = _until(lambda: any(a.model == "student" for a in load.since(up)), 15,
                           "the restarted student answered")  # fmt: skip
        time.sleep(1.0)  # and keeps answering
    answers = load.answers
    failed = [a for a in answers if a.model is None]
    failovers = [a for a in answers if a.failed_over is not None]
    down = [a for a in answers if killed <= a.at < restarted]
    after = [a for a in answers if a.at >= recovered]
    before = [a for a in answers if a.at < killed - 0.1]
    rates = (len(before) / (killed - 0.1 - start), len(down) / (restarted - killed),
             len(after) / (answers[-1].at - recovered))  # fmt: skip
    print(  # the figures for docs/BENCHMARKS.md
        f"\nfailover: {len(answers)} requests ({THREADS} threads, "
        f"{answers[-1].at - start:.1f} s), {len(failed)} failed, "
        f"{len(failovers)} failed over to the teacher, circuit opened "
        f"{_metric(server, opened):g} times; while the student was down "
        f"{len(down)} requests, {sum(a.model == 'teacher' for a in down)} by the teacher; "
        f"back in routing {recovered - up:.2f} s after its server answered /health "
        f"({recovered - restarted:.2f} s after its restart began); after that "
        f"{sum(a.model == 'student' for a in after)} of {len(after)} by the student; "
        "requests/s before, while down, after: " + ", ".join(f"{r:.0f}" for r in rates)
    )
    assert not failed, failed[:3]
    assert failovers and all(a.failed_over == "student" and a.model == "teacher"
                             for a in failovers)  # fmt: skip
    assert all(a.model == "teacher" for a in down)
    counted = sum(
        _metric(server, f'distillgate_failovers_total{{from="student",reason="{r}",to="teacher"}}')
        for r in ("unavailable", "upstream_error", "server_error")
    )
    assert counted == len(failovers)
    assert _metric(server, state) == 0
    assert sum(a.model == "student" for a in after) > len(after) / 2
    assert recovered - up <= MAX_COOL_DOWN_S + 2.0  # a probe goes once the cool-down ends
