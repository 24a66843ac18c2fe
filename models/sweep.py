"""The sweep that feeds the law: a grid of students over compression ratio, distillation
examples, supervision format, method, pruning schedule and seed, each made, evaluated and
written as one JSONL row with every input, every measured metric and the versions used.

Rows already in the results file are skipped, so a killed sweep resumes; each row is
appended and flushed only when complete. Students are removed from the store once
measured unless `keep` is set (a sweep would otherwise fill the disk).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.distill.factory import StudentSpec, make_student
from models.evaluate import evaluate_entry, heldout_divergence
from models.prune import parse_schedule
from models.store import ModelStore

log = logging.getLogger("distillgate")


class SweepError(ValueError):
    """A grid file that cannot be run; the message names every problem."""


class Block(BaseModel):
    """One cartesian product of the grid."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[Annotated[float, Field(gt=0, le=1)]] = Field(min_length=1)
    examples: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    formats: list[Literal["answers", "logits", "cot"]] = Field(default=["logits"], min_length=1)
    methods: list[Literal["full", "lora"]] = Field(default=["full"], min_length=1)
    schedules: list[str] = Field(default=["one-shot"], min_length=1)

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_schedule(value)
        return values


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    teacher: str
    pruning: str = "depth"
    epochs: float = Field(2.0, gt=0)
    test_examples: int = Field(200, ge=1)
    heldout_examples: int = Field(100, ge=1)
    latency: bool = False
    blocks: list[Block] = Field(min_length=1)


def load_grid(path: Path) -> Grid:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"cannot read grid {path}: {exc}") from None
    try:
        return Grid.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SweepError(f"{path}: {problems}") from None


def specs(grid: Grid) -> Iterator[StudentSpec]:
    """Every student of the grid once, in block order."""
    seen: set[str] = set()
    for block in grid.blocks:
        product = itertools.product(
            block.ratios, block.examples, block.formats, block.methods, block.schedules,
            block.seeds,
        )  # fmt: skip
        for ratio, examples, fmt, method, schedule, seed in product:
            spec = StudentSpec(
                task=grid.task, ratio=ratio, examples=examples, format=fmt, method=method,
                schedule=schedule, pruning=grid.pruning, seed=seed, teacher=grid.teacher,
                epochs=grid.epochs,
            )  # fmt: skip
            name = f"sweep-{spec.model_name()}"
            if name not in seen:
                seen.add(name)
                yield StudentSpec(**{**spec.__dict__, "name": name})


def done(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    names = set()
    for line in results.read_text().splitlines():
        try:
            names.add(json.loads(line)["name"])
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line from a kill: that student is redone
    return names


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _teacher_reference(store: ModelStore, grid: Grid) -> dict[str, Any]:
    """The teacher's own figures the law is relative to, measured once per sweep."""
    manifest = store.manifest(grid.teacher)
    if grid.task not in manifest.evaluation.in_domain or not manifest.evaluation.general_knowledge:
        manifest = evaluate_entry(
            store, grid.teacher, task=grid.task, test_examples=grid.test_examples,
            latency=False,
        )  # fmt: skip
    from models.tasks import get_task

    loss = heldout_divergence(
        store, grid.teacher, grid.teacher, get_task(grid.task), grid.heldout_examples
    )
    ev = manifest.evaluation
    if ev.general_knowledge is None or grid.task not in ev.in_domain:
        raise SweepError(f"the teacher {grid.teacher} has no {grid.task} or general score")
    return {
        "in_domain": ev.in_domain[grid.task].accuracy.value,
        "general": ev.general_knowledge.accuracy.value,
        "cross_entropy": loss.cross_entropy,
        "non_embedding_parameters": ev.non_embedding_parameters,
    }


def row(spec: StudentSpec, manifest, teacher: dict[str, Any], seconds: float) -> dict:
    ev = manifest.evaluation
    domain, general, heldout = ev.in_domain[spec.task], ev.general_knowledge, ev.heldout[spec.task]
    if general is None or domain.agreement is None:
        raise SweepError(f"{spec.name}: no general or agreement score in its evaluation")
    phases = manifest.training["phases"]
    return {
        "name": spec.name,
        "task": spec.task,
        "teacher": spec.teacher,
        "target_ratio": spec.ratio,
        "ratio": manifest.compression_ratio,
        "examples": spec.examples,
        "format": spec.format,
        "method": spec.method,
        "schedule": spec.schedule,
        "pruning": spec.pruning,
        "seed": spec.seed,
        "epochs": spec.epochs,
        "non_embedding_parameters": ev.non_embedding_parameters,
        "train_tokens": sum(p["target_tokens"] for p in phases),
        "in_domain": domain.accuracy.value,
        "in_domain_low": domain.accuracy.low,
        "in_domain_high": domain.accuracy.high,
        "in_domain_n": domain.n,
        "chance": domain.chance,
        "agreement": domain.agreement.value,
        "general": general.accuracy.value,
        "general_n": general.n,
        "general_retention": general.retention,
        "heldout_kl": heldout.kl,
        "heldout_ce": heldout.cross_entropy,
        "teacher_in_domain": teacher["in_domain"],
        "teacher_general": teacher["general"],
        "teacher_ce": teacher["cross_entropy"],
        "teacher_non_embedding_parameters": teacher["non_embedding_parameters"],
        "latency": ev.latency.model_dump() if ev.latency else None,
        "seconds": round(seconds, 1),
        "versions": versions(),
        "created": int(time.time()),
    }


def run_sweep(
    store: ModelStore, grid: Grid, results: Path, *, keep: bool = False, progress: bool = True
) -> int:
    """Make and measure every student of `grid` not yet in `results`; returns how many."""
    finished = done(results)
    todo = [s for s in specs(grid) if s.name not in finished]
    log.info("sweep: %d students to make, %d already measured", len(todo), len(finished))
    if not todo:
        return 0
    teacher = _teacher_reference(store, grid)
    results.parent.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(todo, start=1):
        log.info("sweep %d/%d: %s", i, len(todo), spec.name)
        started = time.perf_counter()
        if store.path_for(spec.name).exists():
            store.remove(spec.name)  # made but not measured before a kill
        make_student(store, spec, progress=progress)
        manifest = evaluate_entry(
            store, spec.name, test_examples=grid.test_examples,
            heldout_examples=grid.heldout_examples, latency=grid.latency,
        )  # fmt: skip
        line = json.dumps(row(spec, manifest, teacher, time.perf_counter() - started))
        with results.open("a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        if not keep:
            store.remove(spec.name)
    return len(todo)
