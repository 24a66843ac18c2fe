"""VLLMBackend: the exact `vllm serve` command, and its lifecycle against a real stand-in
executable (tests/models/standin_vllm.py) that serves the OpenAI protocol on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from models.backends.base import GenerationRequest, SamplingParams, Unavailable
from models.backends.vllm import VLLMBackend

STANDIN = Path(__file__).resolve().parent / "standin_vllm.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gone(pid: int, within_s: float = 3.0) -> bool:
    """Whether `pid` stops running within `within_s` (a SIGKILL lands asynchronously)."""
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def vllm_exe(tmp_path: Path) -> str:
    """A `vllm` on disk: a shell wrapper running the stand-in with this interpreter."""
    exe = tmp_path / "vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "student-a"
    path.mkdir()
    return path


def backend(model_dir: Path, exe: str, *extra: str, **kwargs) -> VLLMBackend:
    return VLLMBackend(
        "student-a", model_dir, port=free_port(), max_model_len=1024, executable=exe,
        extra_args=extra, startup_timeout_s=kwargs.pop("startup_timeout_s", 20.0), **kwargs,
    )  # fmt: skip


def test_command_is_exactly_vllm_serve() -> None:
    b = VLLMBackend(
        "s1", "/models/s1", port=8123, gpu_memory_utilization=0.45, max_model_len=4096,
        extra_args=["--dtype", "half"],
    )  # fmt: skip
    assert b.command() == [
        "vllm", "serve", "/models/s1", "--served-model-name", "s1", "--host", "127.0.0.1",
        "--port", "8123", "--gpu-memory-utilization", "0.45", "--max-model-len", "4096",
        "--dtype", "half",
    ]  # fmt: skip
    assert VLLMBackend("s2", "/m", port=9000).command()[-4:] == [
        "--gpu-memory-utilization", "0.9", "--max-model-len", "2048"
    ]  # fmt: skip


async def test_lifecycle_start_generate_stop(model_dir: Path, vllm_exe: str, tmp_path) -> None:
    pid_file = tmp_path / "worker.pid"
    b = backend(model_dir, vllm_exe, "--standin-delay", "0.5", "--standin-worker-pid-file",
                str(pid_file), role="teacher")  # fmt: skip
    assert await b.health() is False
    await b.start()
    try:
        assert await b.health() is True
        card = b.card()
        assert (card.name, card.backend, card.role, card.context_length) == (
            "student-a",
            "vllm",
            "teacher",
            1024,
        )
        request = GenerationRequest(
            "r", SamplingParams(max_tokens=3), messages=({"role": "user", "content": "hi"},)
        )
        chunks = [c async for c in b.generate(request)]
        assert "".join(c.text for c in chunks) == "Hello! This is"
        assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 3)
        assert b.load().running == 0
        pid, worker = b.pid, int(pid_file.read_text())
        assert pid is not None and alive(pid) and alive(worker)
    finally:
        await b.stop()
    assert gone(pid) and gone(worker)
    assert await b.health() is False
    await b.stop()  # idempotent


async def test_process_that_exits_at_once_is_unavailable_with_its_output(
    model_dir: Path, vllm_exe: str
) -> None:
    b = backend(model_dir, vllm_exe, "--standin-exit", "3")
    with pytest.raises(Unavailable) as caught:
        await b.start()
    message = str(caught.value)
    assert "'student-a'" in message and "exited with code 3" in message
    assert "CUDA out of memory (simulated)" in message
    assert b.pid is None


async def test_bad_arguments_show_the_usage_error(vllm_exe: str, tmp_path: Path) -> None:
    b = backend(tmp_path / "missing", vllm_exe)
    with pytest.raises(Unavailable, match="does not exist"):
        await b.start()


async def test_startup_timeout_is_unavailable_and_kills_the_process(
    model_dir: Path, vllm_exe: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "worker.pid"
    b = backend(model_dir, vllm_exe, "--standin-never-healthy", "--standin-worker-pid-file",
                str(pid_file), startup_timeout_s=1.0)  # fmt: skip
    with pytest.raises(Unavailable, match="was not healthy within 1 s"):
        await b.start()
    assert gone(int(pid_file.read_text()))


async def test_missing_executable_is_unavailable(model_dir: Path, tmp_path: Path) -> None:
    b = backend(model_dir, str(tmp_path / "no-vllm-here"))
    with pytest.raises(Unavailable, match="cannot run"):
        await b.start()


async def test_a_crashed_server_is_unhealthy_and_refuses_work(
    model_dir: Path, vllm_exe: str
) -> None:
    b = backend(model_dir, vllm_exe)
    await b.start()
    try:
        assert b.pid is not None
        os.killpg(b.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while await b.health():
            assert time.monotonic() < deadline, "health stayed True after the crash"
            await asyncio.sleep(0.02)
        request = GenerationRequest("r", SamplingParams(), prompt="hi", stream=False)
        with pytest.raises(Unavailable, match="'student-a'"):
            [c async for c in b.generate(request)]
    finally:
        await b.stop()
