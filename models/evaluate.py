"""Evaluation of a registry entry: in-domain accuracy (with a 95% bootstrap interval) and
agreement with the teacher, general-knowledge accuracy and its chance-normalised
retention, held-out KL to the teacher and cross-entropy, size, and measured latency.

Answers are generated through `LocalBackend`, the same code path the gateway serves
with (batched, greedy), so accuracy and latency describe the model as it is served.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.backends.base import GenerationRequest, SamplingParams
from models.backends.local import LocalBackend


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def bootstrap_ci(
    scores: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of `scores` with a percentile bootstrap interval (seeded, so reproducible)."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))


def retention(student: float, teacher: float, chance: float) -> float:
    """Chance-normalised retention: (student - chance) / (teacher - chance); 1 keeps all of
    the teacher's margin over guessing, 0 is no better than guessing."""
    if teacher <= chance:
        raise ValueError(f"teacher accuracy {teacher:.3f} is not above chance {chance:.3f}")
    return (student - chance) / (teacher - chance)


@dataclass(frozen=True)
class Latency:
    ttft_ms: float
    ms_per_token_b1: float
    ms_per_token_b8: float


async def generate_answers(
    model_dir: Path,
    prompts: Sequence[list[dict[str, str]]],
    max_tokens: int = 8,
    batch: int = 8,
) -> list[str]:
    """Greedy answers to chat prompts, `batch` at a time through LocalBackend."""
    backend = LocalBackend("eval", model_dir, max_batch_size=batch, queue_size=len(prompts))
    await backend.start()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

        async def one(i: int, messages: list[dict[str, str]]) -> str:
            request = GenerationRequest(f"eval-{i}", params, messages=tuple(messages), stream=False)
            return "".join([c.text async for c in backend.generate(request)])

        return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(prompts))))
    finally:
        await backend.stop()


async def measure_latency(model_dir: Path, max_tokens: int = 32, repeats: int = 3) -> Latency:
    """Median time to first token and decode ms/token at batch 1 and batch 8."""
    backend = LocalBackend("latency", model_dir, max_batch_size=8)
    await backend.start()
    try:
        prompt = ({"role": "user", "content": "Write a short story about a lighthouse."},)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

        async def timed(i: int) -> tuple[float, float, int]:
            start, first, n = time.perf_counter(), None, 0
            request = GenerationRequest(f"lat-{i}", params, messages=prompt)
            async for chunk in backend.generate(request):
                first = first or time.perf_counter()
                n = chunk.completion_tokens or n
            end = time.perf_counter()
            return (first - start) * 1e3, (end - first) * 1e3 / max(1, n - 1), n

        await timed(-1)  # warm-up
        solo = [await timed(i) for i in range(repeats)]
        eights = [await asyncio.gather(*(timed(i) for i in range(8))) for _ in range(repeats)]
        return Latency(
            ttft_ms=statistics.median(t for t, _, _ in solo),
            ms_per_token_b1=statistics.median(m for _, m, _ in solo),
            ms_per_token_b8=statistics.median(m for run in eights for _, m, _ in run),
        )
    finally:
        await backend.stop()


def as_dict(value: Any) -> dict[str, Any]:
    return asdict(value)
