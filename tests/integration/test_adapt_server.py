"""The adaptation loop by itself, in real processes: a teacher behind a separate
OpenAI-compatible server (the instant server: its weights are elsewhere), a gateway with
`serve --adapt` in front of it, the official SDK sending a new traffic. The loop detects
it, distils a student from a local base model on the logged answers, registers it; the
gateway hot-adds it and the rollout takes it through shadow and canary to live. The adapt
child killed with SIGKILL mid-way is restarted by the gateway, and stops with it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from gateway.adapt.log import TrafficLog
from gateway.adapt.state import AdaptState
from models.tasks import get_task
from tests.models.test_openai_http import serving
from tests.servers import free_port, gateway

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def instant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.instant", "--port", str(port), "--model", "instant"]
    with serving(argv, url, tmp_path_factory.mktemp("instant") / "server.log"):
        yield url


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _config(tmp: Path, url: str, db: Path, base: Path) -> dict:
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "classes": {"any": {"min_quality": 0.0, "log_content": True}}, "default_class": "any",
        # a remote teacher has no parameter count to scale prices by: it is priced here,
        # and every other model at teacher_cost_per_1k_tokens
        "costs": {"teacher": 1.0}, "teacher_cost_per_1k_tokens": 0.1,
    }))  # fmt: skip
    return {
        "models": [{"name": "teacher", "backend": "openai", "role": "teacher", "url": url,
                    "served_model": "instant"}],
        "routing": {"policy": str(policy)},
        "traffic": {"dsn": f"sqlite:///{db}", "flush_interval_s": 0.1},
        "students": {"from_store": True},
        "threads": 1,
        "adapt": {"min_examples": 30, "max_examples": 60, "ratios": [0.5], "epochs": 1,
                  "student_base": str(base), "interval_s": 0.5, "nice": 0,
                  "detect": {"window": 60, "min_count": 5, "min_share": 0.05, "confirm": 5},
                  "rollout": {"min_pairs": 10, "step_pairs": 5, "shadow_share": 1.0,
                              "audit_share": 1.0}},
    }  # fmt: skip


def test_remote_teacher_new_traffic_to_a_live_student(
    tmp_path: Path, tiny_model_dir: Path, instant: str
) -> None:
    db = tmp_path / "traffic.db"
    prompts = [e.prompt for e in get_task("support-tickets").examples("test", 500)]
    routed: list[str] = []
    stop = threading.Event()
    config = _config(tmp_path, instant, db, tiny_model_dir)
    with gateway(config, tmp_path, store=tmp_path / "store", extra=("--adapt",)) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=2)

        def send() -> None:
            for prompt in itertools.cycle(prompts):  # until told to stop
                if stop.is_set():
                    return
                raw = sdk.chat.completions.with_raw_response.create(
                    model="auto", max_tokens=3, messages=[{"role": "user", "content": prompt}]
                )
                routed.append(raw.headers.get("x-distillgate-model", ""))
                time.sleep(0.02)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        log = None
        try:
            deadline, killed, stage, student = time.monotonic() + 300, False, None, None
            while time.monotonic() < deadline and stage != "live":
                time.sleep(1)
                if not db.exists():
                    continue
                log = log or TrafficLog.open(f"sqlite:///{db}")
                state = AdaptState(log.engine)
                jobs = state.jobs()
                if jobs and not killed:  # a job exists: SIGKILL the loop, the gateway restarts it
                    (child,) = _children(server.proc.pid)
                    os.kill(child, signal.SIGKILL)
                    killed = True
                    time.sleep(2.5)  # the supervisor's first back-off is 1 s
                    assert _children(server.proc.pid) not in ([], [child])
                student = jobs[0].student if jobs else None
                rollout = state.rollout(student) if student else None
                stage = rollout.stage if rollout else None
            assert stage == "live", (jobs, server.output()[-3000:])
            manifest_dir = tmp_path / "store" / student
            assert (manifest_dir / "distillgate.json").is_file()
            stages = [t.transition.after for t in AdaptState(log.engine).transitions(student)]
            assert stages[:2] == ["shadow", "canary"] and stages[-1] == "live"
            answered = len(routed)
            time.sleep(5)
            assert student in routed[answered:], "live student takes its domain's requests"
        finally:
            stop.set()
            sender.join(timeout=30)
            if log is not None:
                log.close()
        child = _children(server.proc.pid)
    time.sleep(1)
    assert all(not Path(f"/proc/{pid}").exists() for pid in child), "the loop stops with serve"
