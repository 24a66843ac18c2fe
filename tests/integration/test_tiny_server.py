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

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    # one running, one waiting: the other four are refused at once, never queued
    assert results.count("429") >= 3 and results.count("ok") >= 1, results
