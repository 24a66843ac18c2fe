"""The student factory: teacher outputs (cached) -> structural pruning -> distillation ->
an atomic registry entry with its lineage; and task adaptation of the teacher itself.

Work in progress lives in `<store>/.work/<name>/`: each finished phase of an iterative
schedule is saved there as a plain model and the running phase checkpoints, so rerunning
the same command after a kill resumes; the directory is removed once the model is
registered. Nothing appears in the registry until the model is whole.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from models.distill.data import FORMATS, Format, TeacherCache, cached_sequences
from models.distill.train import METHODS, Method, TrainConfig, train
from models.prune import parse_schedule, prune_schedule, save_pruned
from models.store import TEACHER_NAME, Manifest, ModelStore, StoreError
from models.tasks import get_task
from models.tasks.base import Task, TaskError

MIN_EXAMPLES = 16
CALIBRATION_SEQUENCES = 64
OBJECTIVE = {"answers": "ce", "logits": "kl", "cot": "cot"}
log = logging.getLogger("distillgate")


class FactoryError(ValueError):
    """A student or adaptation that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class StudentSpec:
    task: str
    ratio: float
    examples: int
    format: Format = "logits"
    method: Method = "full"
    schedule: str = "one-shot"
    pruning: str = "depth"
    seed: int = 0
    teacher: str = TEACHER_NAME
    epochs: float = 2.0
    top_k: int = 128
    name: str | None = None

    def model_name(self) -> str:
        if self.name:
            return self.name
        schedule = self.schedule.replace(":", "")
        return (
            f"{self.task}-{self.pruning}{self.ratio:g}-{self.format}-{self.method}-"
            f"{schedule}-d{self.examples}-s{self.seed}"
        )


def _task(name: str) -> Task:
    try:
        task = get_task(name)
    except TaskError as exc:
        raise FactoryError(str(exc)) from None
    if task.kind != "classification" or task.size("train") == 0:
        raise FactoryError(f"task {name!r} has no training split to distil on")
    return task


def _check_examples(task: Task, examples: int) -> None:
    available = task.size("train")
    if examples < MIN_EXAMPLES:
        raise FactoryError(f"examples must be at least {MIN_EXAMPLES}, got {examples}")
    if available is not None and examples > available:
        raise FactoryError(
            f"examples must be at most {available} (task {task.name!r}'s train split), "
            f"got {examples}"
        )


def validate(store: ModelStore, spec: StudentSpec) -> Task:
    """Every check that can fail before work starts, each a one-line FactoryError."""
    if not (isinstance(spec.ratio, int | float) and 0 < spec.ratio <= 1):
        raise FactoryError(f"ratio must be in (0, 1], got {spec.ratio}")
    if spec.format not in FORMATS:
        raise FactoryError(f"format must be one of {', '.join(FORMATS)}, got {spec.format!r}")
    if spec.method not in METHODS:
        raise FactoryError(f"method must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if spec.pruning not in ("depth", "width"):
        raise FactoryError(f"pruning must be 'depth' or 'width', got {spec.pruning!r}")
    if spec.epochs <= 0 or spec.top_k < 1:
        raise FactoryError(f"need epochs > 0 and top_k >= 1, got {spec.epochs}, {spec.top_k}")
    try:
        parse_schedule(spec.schedule)
        store.path_for(spec.model_name())
    except (ValueError, StoreError) as exc:
        raise FactoryError(str(exc)) from None
    task = _task(spec.task)
    _check_examples(task, spec.examples)
    _check_teacher(store, spec.teacher)
    if store.path_for(spec.model_name()).exists():
        raise FactoryError(f"model {spec.model_name()!r} is already registered")
    return task


def _check_teacher(store: ModelStore, teacher: str) -> None:
    """The teacher must be registered (the embedded one is converted later, on use)."""
    try:
        known = teacher == TEACHER_NAME or store.has(teacher)
    except StoreError as exc:
        raise FactoryError(str(exc)) from None
    if not known:
        raise FactoryError(f"teacher {teacher!r} is not in the store at {store.root}")


@dataclass(frozen=True)
class TeacherAccuracy:
    """How often the teacher answers a task's validation items correctly, beside chance."""

    accuracy: float
    n: int
    chance: float


def teacher_accuracy(store: ModelStore, teacher: str, task_name: str, n: int) -> TeacherAccuracy:
    """The teacher's accuracy on the first `n` validation items of the task, answered
    greedily through the serving code path (models/evaluate.py), for a check before
    distilling: a teacher that cannot do the task teaches a student that cannot either."""
    import asyncio

    from models.evaluate import ANSWER_TOKENS, generate_answers

    task = _task(task_name)
    items = task.examples("validation", n)
    if not items:
        raise FactoryError(f"task {task.name!r} has no validation split to check the teacher on")
    chats = [e.messages() for e in items]
    answers = asyncio.run(generate_answers(store.resolve(teacher), chats, ANSWER_TOKENS))
    scores = [task.score(e, a) for e, a in zip(items, answers, strict=True)]
    return TeacherAccuracy(sum(scores) / len(scores), len(scores), task.chance)


def _load(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _phases(spec: StudentSpec, total_steps: int) -> list[int]:
    """Training steps per phase: an iterative schedule splits one budget over its k
    phases, so it costs what one-shot costs for the same number of examples."""
    k = parse_schedule(spec.schedule)
    share = max(1, total_steps // k)
    return [share] * (k - 1) + [max(1, total_steps - share * (k - 1))]


def make_student(
    store: ModelStore, spec: StudentSpec, *, progress: bool = True, evaluate: bool = False
) -> Manifest:
    """Prune the teacher to `spec.ratio`, distil it on `spec.examples` train examples of
    `spec.task` in `spec.format` with `spec.method`, and register it under its name."""
    task = validate(store, spec)
    name = spec.model_name()
    started = time.perf_counter()
    teacher_dir = store.resolve(spec.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = _load(teacher_dir)
    examples = task.examples("train", spec.examples)
    cache = TeacherCache(store.root / ".cache" / "teacher")
    items = cached_sequences(
        cache,
        teacher_dir,
        teacher,
        tokenizer,
        task.name,
        "train",
        examples,
        spec.format,
        top_k=spec.top_k,
    )
    teacher_seconds = time.perf_counter() - started
    config = TrainConfig(method=spec.method, epochs=spec.epochs, seed=spec.seed)
    budgets = _phases(spec, config.steps(len(items)))
    work = store.root / ".work" / name
    objective = OBJECTIVE[spec.format]
    pad = tokenizer.pad_token_id
    reports: list[dict[str, Any]] = []

    def between(model: PreTrainedModel, step: int) -> PreTrainedModel:
        done = work / f"phase{step}"
        if (done / "config.json").is_file():
            return _load(done)
        phase = replace(config, max_steps=budgets[step - 1])
        model, report = train(model, items, objective, phase, pad, done / "run", progress)
        reports.append(asdict(report))
        save_pruned(model, tokenizer, done)
        return model

    calibration = [tokenizer.decode(s.ids) for s in items[:CALIBRATION_SEQUENCES]]
    torch.manual_seed(spec.seed)
    student, prune_reports = prune_schedule(
        teacher, tokenizer, spec.ratio, spec.pruning, calibration, spec.schedule, between
    )
    del teacher
    final = replace(config, max_steps=budgets[-1])
    student, report = train(student, items, objective, final, pad, work / "final", progress)
    reports.append(asdict(report))
    training = {
        **asdict(config),
        "top_k": spec.top_k if spec.format != "answers" else None,
        "learning_rate": config.learning_rate(),
        "phases": reports,
        "teacher_seconds": round(teacher_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest = _student_manifest(spec, task.name, prune_reports, training)
    store.register(manifest, lambda out: save_pruned(student, tokenizer, out))
    shutil.rmtree(work, ignore_errors=True)
    if evaluate:
        from models.evaluate import evaluate_entry

        return evaluate_entry(store, name)
    return store.manifest(name)


def _student_manifest(
    spec: StudentSpec, task: str, prune_reports: list, training: dict[str, Any]
) -> Manifest:
    return Manifest(
        name=spec.model_name(),
        parent=spec.teacher,
        task=task,
        compression_ratio=prune_reports[-1].achieved_ratio,
        pruning={
            "method": spec.pruning,
            "schedule": spec.schedule,
            "target_ratio": spec.ratio,
            "steps": [_brief(r.to_dict()) for r in prune_reports],
        },
        examples=spec.examples,
        supervision=spec.format,
        method=spec.method,
        seed=spec.seed,
        training=training,
    )


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    """A pruning step's report without its per-neuron index lists (too long for a manifest)."""
    return {k: v for k, v in report.items() if k not in ("kept", "importances")}


def adapt_teacher(
    store: ModelStore,
    task_name: str,
    *,
    method: Method = "lora",
    examples: int = 2000,
    epochs: float = 1.0,
    seed: int = 0,
    teacher: str = TEACHER_NAME,
    name: str | None = None,
    progress: bool = True,
) -> Manifest:
    """Fine-tune the teacher on a task's reference answers (Minitron's "teacher
    correction"), LoRA merged or full, and register it with its lineage."""
    if method not in METHODS:
        raise FactoryError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if epochs <= 0:
        raise FactoryError(f"epochs must be > 0, got {epochs}")
    task = _task(task_name)
    _check_examples(task, examples)
    _check_teacher(store, teacher)
    name = name or f"{teacher}-{task.name}-{method}"
    try:
        store.path_for(name)
    except StoreError as exc:
        raise FactoryError(str(exc)) from None
    if store.path_for(name).exists():
        raise FactoryError(f"model {name!r} is already registered")
    teacher_dir = store.resolve(teacher)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    cache = TeacherCache(store.root / ".cache" / "teacher")
    items = cached_sequences(
        cache,
        teacher_dir,
        None,
        tokenizer,
        task.name,
        "train",
        task.examples("train", examples),
        "answers",
        targets="reference",
    )
    config = TrainConfig(method=method, epochs=epochs, seed=seed)
    work = store.root / ".work" / name
    model, report = train(
        _load(teacher_dir), items, "ce", config, tokenizer.pad_token_id, work, progress
    )
    manifest = Manifest(
        name=name,
        role="teacher",
        parent=teacher,
        task=task.name,
        compression_ratio=1.0,
        examples=examples,
        supervision="reference",
        method=method,
        seed=seed,
        training={
            **asdict(config),
            "learning_rate": config.learning_rate(),
            "phases": [asdict(report)],
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    store.register(manifest, lambda out: save_pruned(model, tokenizer, out))
    shutil.rmtree(work, ignore_errors=True)
    return store.manifest(name)
