"""`serve --workers N`'s decisions: which configs it refuses (one line naming the fix) or warns
about, what the parent does when a worker exits, and /ready speaking for every worker. The
real processes are in tests/integration/test_workers.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.admission import mark_draining
from gateway.config import parse_config
from gateway.workers import AllReady, Readiness, after_exit, refusal, warning
from tests.gateway.scripted import ScriptedBackend, scripted_app
from tests.servers import cli

REMOTE = {"name": "m", "backend": "openai", "url": "http://127.0.0.1:9"}


def config(**extra: object):
    return parse_config({"models": [REMOTE], **extra})


def test_one_worker_is_never_refused_nor_warned() -> None:
    keys = config(auth={"mode": "keys"})
    local = parse_config({"models": [{"name": "t", "backend": "local", "path": "/x"}]})
    assert refusal(keys, 1) is None and warning(local, 1) is None


def test_keys_without_redis_are_refused_with_the_fix() -> None:
    why = refusal(config(auth={"mode": "keys"}), 2)
    assert why is not None and "\n" not in why
    assert "limits.redis_url" in why and "one worker" in why and "2 times" in why
    shared = config(auth={"mode": "keys"}, limits={"redis_url": "redis://127.0.0.1:6379"})
    assert refusal(shared, 2) is None
    assert refusal(config(auth={"mode": "none"}), 4) is None


def test_vllm_models_are_refused_each_worker_would_start_one() -> None:
    vllm = {"name": "v", "backend": "vllm", "path": "/m", "port": 8100}
    why = refusal(parse_config({"models": [REMOTE, vllm]}), 2)
    assert why is not None and "`vllm serve` for v" in why and "backend: openai" in why


def test_in_process_models_warn_that_memory_is_n_times() -> None:
    local = {"name": "t", "backend": "local", "path": "/x"}
    line = warning(parse_config({"models": [local, REMOTE]}), 3)
    assert line is not None and "\n" not in line
    assert "copy of t" in line and "3 times" in line
    assert warning(config(), 3) is None  # remote models: nothing loaded in the workers
    students = warning(config(students={"from_store": True}), 2)
    assert students is not None and "students" in students


@pytest.mark.parametrize(
    ("code", "stopping", "action"),
    [
        (0, True, "done"),
        (1, True, "done"),
        (-9, True, "done"),
        (1, False, "fail"),  # its models failed to load
        (3, False, "fail"),  # uvicorn's startup failure
        (-9, False, "restart"),  # kill -9, the OOM killer
        (-15, False, "restart"),
        (0, False, "restart"),  # stopped alone (a SIGTERM to that worker)
    ],
)
def test_after_a_worker_exits(code: int, stopping: bool, action: str) -> None:
    assert after_exit(code, stopping) == action


def test_server_workers_in_the_config_and_its_range() -> None:
    assert config().server.workers == 1
    assert config(server={"workers": 4}).server.workers == 4
    with pytest.raises(Exception, match=r"server\.workers"):
        config(server={"workers": 0})


def test_serve_refuses_keys_without_redis_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [REMOTE], "auth": {"mode": "keys"}}))
    out = cli("serve", "--config", str(path), "--workers", "2")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("distillgate: error: --workers 2 with auth.mode: keys")
    # the config's server.workers is the default the flag overrides
    path.write_text(yaml.safe_dump({"models": [REMOTE], "auth": {"mode": "keys"},
                                    "server": {"workers": 3}}))  # fmt: skip
    assert "--workers 3 " in cli("serve", "--config", str(path)).stderr


def test_serve_workers_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [REMOTE], "auth": {"mode": "keys"}}))
    monkeypatch.setenv("DISTILLGATE_WORKERS", "2")
    assert "--workers 2 " in cli("serve", "--config", str(path)).stderr
    bad = cli("serve", "--config", str(path), "--workers", "0")
    assert bad.returncode == 2 and "workers" in bad.stderr


def test_ready_waits_for_every_worker(tmp_path: Path) -> None:
    app = scripted_app({"m": ScriptedBackend("m")}).app
    with TestClient(AllReady(app, Readiness(tmp_path, workers=2))) as http:
        for _ in range(200):  # this worker's own models first: the gateway's own /ready
            if app.state.gateway.ready:
                break
            time.sleep(0.01)
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        message = ready.json()["error"]["message"]
        assert message == "Not ready: 1 of 2 workers are still loading their models."
        assert (tmp_path / f"ready-{os.getpid()}").exists()
        (tmp_path / "ready-1234567").touch()  # the other worker has its models in
        assert http.get("/ready").json() == {"status": "ready", "models": ["m"]}
        mark_draining(app)
        assert "shutting down" in http.get("/ready").json()["error"]["message"]
