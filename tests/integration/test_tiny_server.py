"""The real gateway process with a tiny random Llama: saturation gives 429 + Retry-After."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.servers import Server, gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "models": [
            {"name": "tiny", "backend": "local", "path": str(tiny_model_dir), "max_batch_size": 1}
        ],
        "limits": {"queue_size": 1, "max_tokens": 200, "default_max_tokens": 200},
    }
    with gateway(config, tmp_path_factory.mktemp("tiny")) as srv:
        yield srv


def test_full_queue_is_429_with_retry_after(server: Server) -> None:
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

    def call(i: int) -> str:
        try:
            sdk.completions.create(
                model="tiny", prompt=f"{i}", max_tokens=200, temperature=1.0, seed=i
            )
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.response.headers["retry-after"].isdigit()
            assert exc.body["code"] == "rate_limit_exceeded"
            return "429"

    with sdk, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    # one running, one waiting: the other four are refused at once, never queued
    assert results.count("429") >= 3 and results.count("ok") >= 1, results


def test_registered_student_is_served_and_protected(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from models.store import Manifest, ModelStore

    store = ModelStore(tmp_path / "store")
    store.register(
        Manifest(name="student-a", parent="smollm2-135m-instruct", compression_ratio=0.5),
        lambda out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True),
    )
    config = {"models": [{"name": "student-a", "backend": "local"}]}
    with (
        gateway(config, tmp_path, store=store.root) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as sdk,
    ):
        listed = sdk.models.list().data
        assert [m.id for m in listed if m.model_extra["role"] != "router"] == ["student-a"]
        out = sdk.completions.create(model="student-a", prompt="Hi", max_tokens=3, seed=1)
        assert out.usage.completion_tokens == 3
        refused = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "students", "remove", "student-a",
             "--store", str(store.root)], capture_output=True, text=True,
        )  # fmt: skip
        assert refused.returncode == 2 and "served by a running gateway" in refused.stderr
    assert store.has("student-a") and store.leases() == {}
