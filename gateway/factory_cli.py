"""The factory's commands: `tasks list|show|export`, `teacher adapt`, `distill`, `eval`.

Heavy imports (torch, transformers) happen inside the handlers, so `--help` and argument
errors answer at once. Progress bars go to stderr; `--json` output alone goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FORMATS = ("answers", "logits", "cot")
METHODS = ("full", "lora")


class CliError(Exception):
    """Bad input: printed as one line, exit code 2."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    _tasks(sub)
    _teacher(sub)
    _distill(sub)
    _eval(sub)


def _common(cmd: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        cmd.add_argument("--store", type=Path, help="model store directory")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")


def _tasks(sub: argparse._SubParsersAction) -> None:
    tasks = sub.add_parser("tasks", help="the built-in tasks and user JSONL tasks")
    actions = tasks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the built-in tasks")
    _common(listing, store=False)
    show = actions.add_parser("show", help="a task: kind, labels, split sizes, examples")
    show.add_argument("task", help="built-in name or path to a .jsonl task")
    show.add_argument("--examples", type=int, default=3, help="how many to print per split")
    _common(show, store=False)
    export = actions.add_parser("export", help="write a split as JSONL (the loader's format)")
    export.add_argument("task", help="built-in name or path to a .jsonl task")
    export.add_argument("--split", default="test", choices=("train", "validation", "test"))
    export.add_argument("-n", type=int, default=None, help="how many examples (default all)")
    export.add_argument("-o", "--output", type=Path, help="file to write (default stdout)")
    _common(export, store=False)
    for cmd in (listing, show, export):
        cmd.set_defaults(func=_run_tasks)


def _teacher(sub: argparse._SubParsersAction) -> None:
    teacher = sub.add_parser("teacher", help="prepare the teacher")
    actions = teacher.add_subparsers(dest="action", required=True)
    adapt = actions.add_parser(
        "adapt", help="fine-tune the teacher on a task's train split and register it"
    )
    adapt.add_argument("--task", required=True)
    adapt.add_argument("--method", choices=METHODS, default="lora")
    adapt.add_argument("--examples", type=int, default=2000)
    adapt.add_argument("--epochs", type=float, default=1.0)
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--teacher", help="model to adapt (default: the embedded teacher)")
    adapt.add_argument("--name", help="registry name (default: <teacher>-<task>-<method>)")
    adapt.add_argument("--eval", action="store_true", help="evaluate before and after")
    adapt.add_argument("--no-progress", action="store_true")
    _common(adapt)
    adapt.set_defaults(func=_run_adapt)


def _distill(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser("distill", help="prune and distil a student and register it")
    distill.add_argument("--task", required=True)
    distill.add_argument("--ratio", type=float, required=True, help="in (0, 1]")
    distill.add_argument("--examples", type=int, default=1000)
    distill.add_argument("--format", choices=FORMATS, default="logits")
    distill.add_argument("--method", choices=METHODS, default="full")
    distill.add_argument("--schedule", default="one-shot", help="one-shot or iterative:k")
    distill.add_argument("--pruning", choices=("depth", "width"), default="depth")
    distill.add_argument("--epochs", type=float, default=2.0)
    distill.add_argument("--top-k", type=int, default=128, help="teacher logits kept per token")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--teacher", help="registry name of the teacher")
    distill.add_argument("--name", help="registry name (default: derived from the options)")
    distill.add_argument("--eval", action="store_true", help="evaluate once registered")
    distill.add_argument("--no-progress", action="store_true")
    _common(distill)
    distill.set_defaults(func=_run_distill)


def _eval(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("eval", help="evaluate a registry entry; results go in its manifest")
    cmd.add_argument("name")
    cmd.add_argument("--task", help="task to measure in-domain (default: the model's own)")
    cmd.add_argument("--test-examples", type=int, default=300)
    cmd.add_argument("--heldout-examples", type=int, default=200, help="for KL and CE")
    cmd.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _common(cmd)
    cmd.set_defaults(func=_run_eval)


def _store(path: Path | None):
    from gateway.settings import Settings
    from models.store import ModelStore

    return ModelStore(path or Settings().store)


def _emit(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _run_tasks(args: argparse.Namespace) -> int:
    from models.tasks import SPLITS, TaskError, export_jsonl, get_task, task_names

    try:
        if args.action == "list":
            rows = [_task_summary(get_task(name)) for name in task_names()]
            text = "\n".join(f"{r['name']:20} {r['kind']:16} {r['description']}" for r in rows)
            return _emit(args, rows, text)
        task = get_task(args.task)
        if args.action == "show":
            info = _task_summary(task)
            info["examples"] = {
                s: [e.to_json() for e in task.examples(s, args.examples)] for s in SPLITS
            }
            return _emit(args, info, _task_text(info))
        if args.n is not None and args.n < 1:
            raise CliError(f"-n must be at least 1, got {args.n}")
        if args.output is None:
            export_jsonl(task, args.split, args.n, sys.stdout)
            return 0
        with args.output.open("w") as stream:
            written = export_jsonl(task, args.split, args.n, stream)
        summary = {"written": written, "path": str(args.output)}
        return _emit(args, summary, f"wrote {written} examples to {args.output}")
    except TaskError as exc:
        raise CliError(str(exc)) from None


def _task_summary(task) -> dict[str, Any]:
    return {
        "name": task.name,
        "kind": task.kind,
        "description": task.description,
        "labels": list(task.labels),
        "chance": task.chance,
        "sizes": {s: task.size(s) for s in ("train", "validation", "test")},
    }


def _task_text(info: dict[str, Any]) -> str:
    lines = [f"{info['name']} ({info['kind']}): {info['description']}"]
    if info["labels"]:
        lines.append(f"labels ({len(info['labels'])}): {', '.join(info['labels'])}")
    sizes = ", ".join(
        f"{s} {n if n is not None else 'unlimited'}" for s, n in info["sizes"].items()
    )
    lines.append(f"splits: {sizes}")
    for split, rows in info["examples"].items():
        for row in rows:
            prompt = row["prompt"].replace("\n", " | ")
            lines.append(f"  [{split}] {prompt}  ->  {row['answer']}")
    return "\n".join(lines)


def _manifest_text(manifest) -> str:
    return manifest.model_dump_json(indent=2)


def _run_distill(args: argparse.Namespace) -> int:
    from models.distill.factory import FactoryError, StudentSpec, make_student, validate
    from models.store import TEACHER_NAME

    store = _store(args.store)
    spec = StudentSpec(
        task=args.task,
        ratio=args.ratio,
        examples=args.examples,
        format=args.format,
        method=args.method,
        schedule=args.schedule,
        pruning=args.pruning,
        seed=args.seed,
        teacher=args.teacher or TEACHER_NAME,
        epochs=args.epochs,
        top_k=args.top_k,
        name=args.name,
    )
    try:
        validate(store, spec)
        manifest = make_student(store, spec, progress=not args.no_progress, evaluate=args.eval)
    except FactoryError as exc:
        raise CliError(str(exc)) from None
    return _emit(args, manifest.model_dump(), _manifest_text(manifest))


def _run_adapt(args: argparse.Namespace) -> int:
    from models.distill.factory import FactoryError, adapt_teacher
    from models.store import TEACHER_NAME

    store = _store(args.store)
    teacher = args.teacher or TEACHER_NAME
    try:
        manifest = adapt_teacher(
            store,
            args.task,
            method=args.method,
            examples=args.examples,
            epochs=args.epochs,
            seed=args.seed,
            teacher=teacher,
            name=args.name,
            progress=not args.no_progress,
        )
    except FactoryError as exc:
        raise CliError(str(exc)) from None
    if args.eval:
        from models.evaluate import evaluate_entry

        evaluate_entry(store, teacher, task=args.task, latency=False)
        manifest = evaluate_entry(store, manifest.name, latency=False)
    return _emit(args, manifest.model_dump(), _manifest_text(manifest))


def _run_eval(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_entry
    from models.store import StoreError
    from models.tasks import TaskError

    for flag, value in (("--test-examples", args.test_examples),
                        ("--heldout-examples", args.heldout_examples)):  # fmt: skip
        if value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}")
    store = _store(args.store)
    try:
        manifest = evaluate_entry(
            store,
            args.name,
            task=args.task,
            test_examples=args.test_examples,
            heldout_examples=args.heldout_examples,
            latency=not args.no_latency,
        )
    except (StoreError, TaskError) as exc:
        raise CliError(str(exc)) from None
    return _emit(args, manifest.model_dump(), json.dumps(manifest.evaluation, indent=2))
