"""Latency and cost of a request on each model, predicted from what the gateway observes.

Per model, windows of the most recent time to first token (TTFT) and time per output
token; their 95th percentiles are what a class's p95 SLO is compared with. A model not yet
observed starts from its manifest's measured figures (`distillgate eval`), or is unknown
(infinite, so it is only tried by exploration). A request's predicted latency:

    ttft    = p95 TTFT + queue wait,  queue wait = ceil(waiting / slots) * mean request time
    latency = ttft + expected tokens * p95 time per token

with expected tokens the 95th percentile of completions observed for the request's
domain (any model), capped by its max_tokens; max_tokens itself before any observation.

Cost per 1,000 tokens comes from the policy's table, else the teacher's price scaled by
the model's non-embedding parameters; a request's cost counts its prompt and expected
completion tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from models.backends.base import Load


@dataclass
class Window:
    """Recent observations with their 95th percentile and mean, recomputed lazily."""

    size: int = 200
    values: deque = field(init=False)
    _p95: float = math.nan
    _mean: float = math.nan
    _dirty: bool = False

    def __post_init__(self) -> None:
        self.values = deque(maxlen=self.size)

    def add(self, value: float) -> None:
        self.values.append(value)
        self._dirty = True

    def _update(self) -> None:
        if self._dirty:
            data = np.fromiter(self.values, float, len(self.values))
            self._p95, self._mean = float(np.percentile(data, 95)), float(data.mean())
            self._dirty = False

    @property
    def p95(self) -> float:
        self._update()
        return self._p95

    @property
    def mean(self) -> float:
        self._update()
        return self._mean

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class ModelTiming:
    ttft: Window = field(default_factory=Window)  # seconds
    per_token: Window = field(default_factory=Window)  # seconds per output token
    duration: Window = field(default_factory=Window)  # seconds per request
    prior_ttft_s: float = math.inf
    prior_per_token_s: float = math.inf


@dataclass(frozen=True)
class LatencyEstimate:
    ttft_ms: float
    latency_ms: float


class Estimates:
    def __init__(self, window: int = 200) -> None:
        self.window = window
        self.models: dict[str, ModelTiming] = {}
        self.tokens: dict[str, Window] = {}  # domain -> completion tokens

    def _timing(self, model: str) -> ModelTiming:
        timing = self.models.get(model)
        if timing is None:
            timing = self.models[model] = ModelTiming(
                Window(self.window), Window(self.window), Window(self.window)
            )
        return timing

    def prior(self, model: str, ttft_ms: float | None, per_token_ms: float | None) -> None:
        """A cold model's starting figures (from its manifest's measured latency)."""
        timing = self._timing(model)
        if ttft_ms is not None:
            timing.prior_ttft_s = ttft_ms / 1000
        if per_token_ms is not None:
            timing.prior_per_token_s = per_token_ms / 1000

    def observe(
        self, model: str, domain: str, ttft_s: float, duration_s: float, completion_tokens: int
    ) -> None:
        timing = self._timing(model)
        timing.ttft.add(ttft_s)
        timing.duration.add(duration_s)
        if completion_tokens > 1:
            timing.per_token.add((duration_s - ttft_s) / (completion_tokens - 1))
        window = self.tokens.get(domain)
        if window is None:
            window = self.tokens[domain] = Window(self.window)
        window.add(completion_tokens)

    def expected_tokens(self, domain: str, max_tokens: int) -> float:
        window = self.tokens.get(domain)
        if window is None or not len(window):
            return float(max_tokens)
        return min(float(max_tokens), window.p95)

    def latency(self, model: str, load: Load, slots: int, tokens: float) -> LatencyEstimate:
        timing = self._timing(model)
        ttft = timing.ttft.p95 if len(timing.ttft) else timing.prior_ttft_s
        per_token = timing.per_token.p95 if len(timing.per_token) else timing.prior_per_token_s
        if load.waiting and len(timing.duration):
            ttft += math.ceil(load.waiting / max(slots, 1)) * timing.duration.mean
        latency = ttft + max(tokens - 1, 0) * per_token
        return LatencyEstimate(ttft * 1000, latency * 1000)


def cost_per_1k(
    model: str,
    table: dict[str, float],
    teacher_cost: float,
    parameters: int | None,
    teacher_parameters: int | None,
) -> float:
    """The policy's price for `model`, else the teacher's scaled by parameter count (the
    teacher's price when either count is unknown)."""
    if model in table:
        return table[model]
    if parameters and teacher_parameters:
        return teacher_cost * parameters / teacher_parameters
    return teacher_cost
