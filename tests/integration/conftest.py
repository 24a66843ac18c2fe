"""Shared by the integration tests: servers that stand at the far end of a gateway."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.models.test_openai_http import serving
from tests.servers import free_port


@pytest.fixture(scope="module")
def instant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The instant OpenAI-compatible server (gateway/instant.py): a teacher whose weights
    are elsewhere, answering at once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "gateway.instant", "--port", str(port), "--model", "instant"]
    with serving(argv, url, tmp_path_factory.mktemp("instant") / "server.log"):
        yield url
