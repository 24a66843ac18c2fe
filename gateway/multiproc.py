"""Prometheus multiprocess mode for `distillgate serve --workers N` (gateway/workers.py): every
worker writes its metrics to files in one directory, and a scrape of any worker reads them all.

The parent process makes the directory and names it in PROMETHEUS_MULTIPROC_DIR for its
workers only, before prometheus_client is imported there (the library picks file-backed
values once, at import). With one worker the variable is unset and nothing here is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Gauges whose value each worker computes at scrape time (or on its own one-second tick,
# gateway/workers.py), summed over the live workers.
LOAD_GAUGES = {
    "distillgate_queue_depth": "Requests waiting for a backend slot.",
    "distillgate_backend_running": "Requests a backend is running now.",
    "distillgate_queue_capacity": "Requests that may wait for a backend before it answers "
    "429 (local backends).",
}
# Per-model gauges of models the answering worker no longer serves (an unloaded student)
# are dropped at render: a file cannot forget a label set.
PER_MODEL_GAUGES = frozenset({"distillgate_model_ready", *LOAD_GAUGES})


def directory() -> str | None:
    """The multiprocess directory when this process is one of several workers, else None."""
    return os.environ.get(ENV) or None


class Mirror:
    """Writes values that the one-process gateway reads at scrape time (set_function gauges,
    the backends' load collector) into this worker's files, where any worker's scrape
    finds them."""

    def __init__(self, gauges: Iterable[Gauge]) -> None:
        self.gauges: dict[str, Gauge] = {g.describe()[0].name: g for g in gauges}
        for name, doc in LOAD_GAUGES.items():
            self.gauges[name] = Gauge(name, doc, ["model"], multiprocess_mode="livesum",
                                      registry=None)  # fmt: skip

    def write(self, families: Iterable[Metric]) -> None:
        for family in families:
            gauge = self.gauges[family.name]
            for sample in family.samples:
                bound = gauge.labels(**sample.labels) if sample.labels else gauge
                bound.set(sample.value)


def render(path: str, served: Callable[[], Mapping[str, object]]) -> bytes:
    """Every worker's metrics, merged: counters and histograms summed (exited workers'
    counts included, so no counter goes back), gauges by their multiprocess_mode."""
    registry = CollectorRegistry()
    registry.register(_Served(path, served))
    return generate_latest(registry)


class _Served:
    def __init__(self, path: str, served: Callable[[], Mapping[str, object]]) -> None:
        self.files = MultiProcessCollector(None, path=path)
        self.served = served

    def collect(self) -> Iterable[Metric]:
        names = set(self.served())
        for family in self.files.collect():
            if family.name in PER_MODEL_GAUGES:
                family.samples = [s for s in family.samples if s.labels.get("model") in names]
            yield family
