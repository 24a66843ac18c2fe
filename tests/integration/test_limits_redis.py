"""Rate limits shared through a real redis-server by two real `distillgate serve`
processes (an `openai` backend in front of the instant server, the key table in one SQLite
file): 4 clients spread over both gateways get the key's limit through in a window, within
5%, for requests and for tokens. The benchmark's case (bench/limits/run.py) on a 5 s window
(limits.rate_window_s), so the key's limits count per 5 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.limits.run import Case, run_case
from tests.redis import redis_server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("kind", "limit"), [("requests", 60), ("tokens", 600)])
def test_two_gateways_share_one_limit_within_5_percent(tmp_path: Path, kind: str, limit: int):
    with redis_server(tmp_path) as url:
        result = run_case(Case(kind, limit, gateways=2, window_s=5.0), tmp_path, redis_url=url)
    assert result["refused"] > 0, result  # the clients asked for more than the limit
    assert 0.95 <= result["first_ratio"] <= 1.05, result
    assert result["fullest_ratio"] <= 1.05, result
