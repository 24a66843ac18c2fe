"""Evaluation helpers: the bootstrap interval, retention, and answers and latency measured
through the served code path on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.evaluate import bootstrap_ci, generate_answers, measure_latency, retention


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_data() -> None:
    small = bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1, 1, 1])
    big = bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 20)
    assert small.low <= small.value == 0.7 <= small.high
    assert (big.high - big.low) < (small.high - small.low)
    assert bootstrap_ci([1, 0, 1], seed=3) == bootstrap_ci([1, 0, 1], seed=3)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_retention_is_chance_normalised() -> None:
    assert retention(0.25, 0.65, 0.25) == 0.0
    assert retention(0.65, 0.65, 0.25) == 1.0
    assert retention(0.45, 0.65, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not above chance"):
        retention(0.3, 0.2, 0.25)


async def test_answers_and_latency_on_a_tiny_model(tiny_model_dir: Path) -> None:
    prompts = [[{"role": "user", "content": f"Say {i}"}] for i in range(3)]
    answers = await generate_answers(tiny_model_dir, prompts, max_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers == await generate_answers(tiny_model_dir, prompts, max_tokens=4)  # greedy
    latency = await measure_latency(tiny_model_dir, max_tokens=6, repeats=1)
    assert latency.ttft_ms > 0 and latency.ms_per_token_b1 > 0 and latency.ms_per_token_b8 > 0
