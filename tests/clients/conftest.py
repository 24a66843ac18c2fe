"""One real `distillgate serve` on the tiny random Llama for every client library's tests
(tiny random answers are enough for shapes; the constrained decoder makes even this model
emit valid JSON), and `library(...)`: a client library, or a skip naming its pin."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.servers import Server, gateway
from tests.tools import require

MODEL = "tiny"


@pytest.fixture(scope="package")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {
        "models": [
            {"name": MODEL, "backend": "local", "path": str(tiny_model_dir), "max_batch_size": 4}
        ],
        "limits": {"queue_size": 16, "max_tokens": 256, "default_max_tokens": 12},
    }
    with gateway(config, tmp_path_factory.mktemp("clients")) as srv:
        yield srv


@pytest.fixture(scope="package")
def base_url(server: Server) -> str:
    return f"{server.url}/v1"


def library(module: str, pin: str) -> ModuleType:
    """Import a client library the dev extra pins; without it, skip (fail under $CI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return require(None, module, f"pip install '{pin}'", "test the client libraries")


@pytest.fixture(scope="package")
def close_early(tiny_model_dir: Path) -> dict[str, int]:
    """`logit_bias` for JSON mode on a random model: any JSON object is allowed, and a
    random model left alone opens strings it never closes before max_tokens. With the
    tokens that close an object favoured ("{}" is one token, '{"' another), the grammar
    still allows only an object, and the answer is the valid `{}`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = {*tokenizer.encode("{}", add_special_tokens=False), tokenizer.convert_tokens_to_ids("}")}
    return {str(i): 100 for i in sorted(ids)}
