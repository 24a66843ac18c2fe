"""`distillgate serve` on bad input: one clear message, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_bad_config_is_reported_whole_and_server_does_not_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: a, backend: openai}\nlimits: {queue_size: 0}\n")
    out = _serve("--config", str(bad))
    assert out.returncode == 2
    assert "models[0].url: Field required" in out.stderr
    assert "limits.queue_size" in out.stderr and "Traceback" not in out.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    out = _serve("--config", str(tmp_path / "none.yaml"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert out.stderr.startswith("distillgate: error:")


def test_model_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - {{name: m, backend: local, path: {tmp_path / 'nowhere'}}}\n")
    out = _serve("--config", str(config), "--port", "0")
    assert out.returncode == 1
    assert "model 'm'" in out.stderr and "nowhere" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_port_from_environment(tmp_path: Path) -> None:
    import os

    out = _serve(env={**os.environ, "DISTILLGATE_PORT": "seventy"})
    assert out.returncode == 2 and "port" in out.stderr and "Traceback" not in out.stderr
