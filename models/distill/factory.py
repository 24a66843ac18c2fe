"""The student factory: teacher outputs (cached) -> structural pruning -> distillation ->
an atomic registry entry with its lineage; and task adaptation of the teacher itself.

`train_student` makes a student without registering it (the adaptation loop gates it
first); `register_student` adds it atomically; `make_student` does both. Work in progress
lives in `<store>/.work/<name>/`: each finished phase of an iterative schedule is saved
there as a plain model, the running phase checkpoints, and the finished student waits
there until registered, so rerunning the same spec after a kill resumes; the directory is
removed once the model is registered. Nothing appears in the registry until it is whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.distill.data import FORMATS, Format, Targets, TeacherCache, cached_sequences
from models.distill.train import METHODS, Method, TrainConfig, train
from models.prune import parse_schedule, prune_schedule, save_pruned
from models.store import TEACHER_NAME, Manifest, ModelStore, StoreError, read_manifest
from models.tasks import get_task
from models.tasks.base import Task, TaskError

MIN_EXAMPLES = 16
CALIBRATION_SEQUENCES = 64
OBJECTIVE = {"answers": "ce", "logits": "kl", "cot": "cot"}
TARGETS = ("teacher", "reference")
TRAINED = "trained"  # the finished student in the work dir, waiting to be registered
log = logging.getLogger("distillgate")


class FactoryError(ValueError):
    """A student or adaptation that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class StudentSpec:
    """What to make. `teacher` is a store name or a Hugging Face directory (a base model
    outside the store); `targets` "reference" trains on the task's own answers (for a task
    built from the traffic log, the teacher's logged answers) instead of generating them."""

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
    targets: Targets = "teacher"

    def model_name(self) -> str:
        if self.name:
            return self.name
        schedule = self.schedule.replace(":", "")
        task = Path(self.task).stem if self.task.endswith(".jsonl") else self.task
        return (
            f"{task}-{self.pruning}{self.ratio:g}-{self.format}-{self.method}-"
            f"{schedule}-d{self.examples}-s{self.seed}"
        )


@dataclass(frozen=True)
class Trained:
    """A finished student not yet registered: the model, its tokenizer, the manifest it
    would be registered with, and the work dir that `register_student` removes."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manifest: Manifest
    work: Path


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


def _check_answers(task: Task, examples: int) -> None:
    missing = next((e.id for e in task.examples("train", examples) if not e.answer), None)
    if missing is not None:
        raise FactoryError(
            f"targets 'reference' trains on the task's answers, but train example "
            f"{missing!r} of task {task.name!r} has none; use targets 'teacher'"
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
    if spec.targets not in TARGETS:
        raise FactoryError(f"targets must be one of {', '.join(TARGETS)}, got {spec.targets!r}")
    if spec.epochs <= 0 or spec.top_k < 1:
        raise FactoryError(f"need epochs > 0 and top_k >= 1, got {spec.epochs}, {spec.top_k}")
    try:
        parse_schedule(spec.schedule)
        store.path_for(spec.model_name())
    except (ValueError, StoreError) as exc:
        raise FactoryError(str(exc)) from None
    task = _task(spec.task)
    _check_examples(task, spec.examples)
    if spec.targets == "reference":
        _check_answers(task, spec.examples)
    _check_teacher(store, spec.teacher)
    if store.path_for(spec.model_name()).exists():
        raise FactoryError(f"model {spec.model_name()!r} is already registered")
    return task


def _directory(teacher: str) -> Path | None:
    """The directory a teacher names by path (a base model outside the store), or None
    for a store name (store names never hold a '/')."""
    if "/" in teacher or teacher.startswith((".", "~")):
        return Path(teacher).expanduser().resolve()
    return None


def _check_teacher(store: ModelStore, teacher: str) -> None:
    """The teacher must be registered (the embedded one is converted later, on use) or a
    Hugging Face directory with safetensors weights (the teacher cache keys on them)."""
    path = _directory(teacher)
    if path is not None:
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            raise FactoryError(
                f"teacher directory {teacher} is not a Hugging Face model directory: no "
                f"{' or '.join(missing)} (save it with save_pretrained)"
            )
        return
    try:
        known = teacher == TEACHER_NAME or store.has(teacher)
    except StoreError as exc:
        raise FactoryError(str(exc)) from None
    if not known:
        raise FactoryError(
            f"teacher {teacher!r} is not in the store at {store.root} (a directory must be "
            "given as a path: ./NAME)"
        )


def teacher_path(store: ModelStore, teacher: str) -> Path:
    """The teacher's directory: the path itself, or the store entry's (converted once)."""
    return _directory(teacher) or store.resolve(teacher)


def _parent(teacher: str) -> str:
    path = _directory(teacher)
    return path.name if path is not None else teacher


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
    answers = asyncio.run(generate_answers(teacher_path(store, teacher), chats, ANSWER_TOKENS))
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
    name = register_student(store, train_student(store, spec, progress=progress)).name
    if evaluate:
        from models.evaluate import evaluate_entry

        return evaluate_entry(store, name)
    return store.manifest(name)


def register_student(store: ModelStore, trained: Trained) -> Manifest:
    """Add a trained student to the registry atomically, then drop its work dir."""
    model, tokenizer = trained.model, trained.tokenizer
    store.register(trained.manifest, lambda out: save_pruned(model, tokenizer, out))
    shutil.rmtree(trained.work, ignore_errors=True)
    return store.manifest(trained.manifest.name)


def train_student(store: ModelStore, spec: StudentSpec, *, progress: bool = True) -> Trained:
    """Prune the teacher to `spec.ratio` and distil it on `spec.examples` train examples
    of `spec.task` in `spec.format` with `spec.method`; register nothing. The result
    also waits in the work dir, so a rerun after a kill before registering returns it."""
    task = validate(store, spec)
    work = store.root / ".work" / spec.model_name()
    finished = _finished(work / TRAINED, spec)
    if finished is not None:
        return finished
    started = time.perf_counter()
    source = teacher_path(store, spec.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = _load(source)
    items = _sequences(store, spec, task, source, teacher, tokenizer)
    teacher_seconds = time.perf_counter() - started
    config = TrainConfig(method=spec.method, epochs=spec.epochs, seed=spec.seed)
    budgets = _phases(spec, config.steps(len(items)))
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
        "targets": spec.targets,
        "top_k": spec.top_k if spec.format != "answers" else None,
        "learning_rate": config.learning_rate(),
        "phases": reports,
        "teacher_seconds": round(teacher_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest = _student_manifest(spec, task.name, prune_reports, training)
    _keep(work / TRAINED, spec, Trained(student, tokenizer, manifest, work))
    return Trained(student, tokenizer, manifest, work)


def _sequences(
    store: ModelStore,
    spec: StudentSpec,
    task: Task,
    source: Path,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> list:
    """The training sequences, from the teacher cache when this teacher made them before."""
    return cached_sequences(
        TeacherCache(store.root / ".cache" / "teacher"),
        source,
        teacher,
        tokenizer,
        task.name,
        "train",
        task.examples("train", spec.examples),
        spec.format,
        targets=spec.targets,
        top_k=spec.top_k,
    )


def _keep(out: Path, spec: StudentSpec, trained: Trained) -> None:
    """Save the finished student beside its spec, renamed into place so that `_finished`
    never finds half of one."""
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pruned(trained.model, trained.tokenizer, tmp)
    (tmp / "manifest.json").write_text(trained.manifest.model_dump_json(indent=2))
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _finished(out: Path, spec: StudentSpec) -> Trained | None:
    """The student a killed run finished for this same spec, or None."""
    try:
        same = json.loads((out / "spec.json").read_text()) == asdict(spec)
    except (OSError, ValueError):
        return None
    if not same:
        return None
    log.info("student %s already trained in %s; not training again", spec.model_name(), out)
    manifest = read_manifest(out / "manifest.json")
    return Trained(_load(out), AutoTokenizer.from_pretrained(out), manifest, out.parent)


def _student_manifest(
    spec: StudentSpec, task: str, prune_reports: list, training: dict[str, Any]
) -> Manifest:
    # A base outside the store is named by its directory; the full path says which one.
    path = _directory(spec.teacher)
    where = {"base": str(path)} if path is not None else {}
    return Manifest(
        name=spec.model_name(),
        parent=_parent(spec.teacher),
        task=task,
        compression_ratio=prune_reports[-1].achieved_ratio,
        pruning={
            "method": spec.pruning,
            "schedule": spec.schedule,
            "target_ratio": spec.ratio,
            **where,
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
    name = name or f"{_parent(teacher)}-{task.name}-{method}"
    try:
        store.path_for(name)
    except StoreError as exc:
        raise FactoryError(str(exc)) from None
    if store.path_for(name).exists():
        raise FactoryError(f"model {name!r} is already registered")
    teacher_dir = teacher_path(store, teacher)
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
        parent=_parent(teacher),
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
