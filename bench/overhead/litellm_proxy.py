"""LiteLLM's proxy as the overhead benchmark's peer: its own virtualenv (made on first use,
never the project's .venv), a config routing one model to the instant server as an
OpenAI-compatible backend, and the command and environment that start it quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.overhead.procs import BenchError

# 1.110.2 (the litellm our client tests pin) cannot install its proxy extra from this
# index: it pins litellm-proxy==1.110.2, litellm-proxy-extras==0.4.114.post1 and
# litellm-enterprise==0.1.83.post1, none of which the index has (nor what 1.108.8 to
# 1.110.1 pin). 1.108.7 is the newest whose extra resolves.
PIN = "litellm[proxy]==1.108.7"
DEFAULT_VENV = Path("var/litellm-venv")
MARKER = "bench-overhead-pin.txt"  # what the venv was made with; another pin reinstalls


def config(instant_url: str, model: str, master_key: str) -> dict:
    """The fastest set-up a fair user would choose: no database (so no spend logs or
    virtual keys), no callbacks, spend and error logs off. The proxy refuses to start
    without a master key, so requests carry it: LiteLLM's own check, done on each request."""
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"{instant_url}/v1",
                    "api_key": "none",
                },
            }
        ],
        "litellm_settings": {"callbacks": []},
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
        },
    }


def environment(base: dict[str, str]) -> dict[str, str]:
    """`base` with LiteLLM quiet and offline: logs at ERROR (which also turns uvicorn's
    access log off), no .env read (PRODUCTION mode), the model price list it ships instead
    of one fetched at start; no database or master key from the caller's environment."""
    env = {k: v for k, v in base.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    return {
        **env,
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


def argv(exe: Path, config_path: Path, port: int, workers: int) -> list[str]:
    """uvicorn (LiteLLM's default and recommended server; it runs uvloop)."""
    return [str(exe), "--config", str(config_path), "--host", "127.0.0.1", "--port",
            str(port), "--num_workers", str(workers)]  # fmt: skip


def ensure_venv(path: Path, pin: str = PIN) -> Path:
    """The `litellm` executable of the virtualenv at `path`, made (python -m venv, then
    pip install `pin`) unless it already holds `pin`. Never the running interpreter's."""
    if path.resolve() == Path(sys.prefix).resolve():
        raise BenchError(f"--litellm-venv {path} is the project's own environment; give "
                         "another path (default var/litellm-venv)")  # fmt: skip
    path = path.resolve()  # the proxy runs in a scratch directory
    exe, marker = path / "bin" / "litellm", path / MARKER
    if exe.exists() and marker.exists() and marker.read_text().strip() == pin:
        return exe
    print(f"bench/overhead: installing {pin} into {path} (once)", file=sys.stderr, flush=True)
    _run([sys.executable, "-m", "venv", str(path)], "python -m venv")
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", pin], "pip install")
    if not exe.exists():
        raise BenchError(f"{pin} installed no `litellm` command in {path}; pick another pin")
    marker.write_text(pin + "\n")
    return exe


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise BenchError(f"{what} failed ({done.returncode}) making LiteLLM's venv:\n{tail}\n"
                         "fix the install or pass --litellm-pin / --litellm-venv")  # fmt: skip
