"""The factory's commands: `tasks list|show|export`, `teacher prepare|adapt`, `distill`, `eval`,
`sweep` and `students list|show|remove`; gateway/cli.py composes them into `distillgate`.

Heavy imports (torch, transformers) happen inside the handlers, so `--help` and argument
errors answer at once. Progress bars go to stderr (`--no-progress` silences all of them);
`--json` output alone goes to stdout. Bad input is a `CliError`: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from law.cli import FORMATS, METHODS, CliError, emit, json_flag

STORE_ENV = "DISTILLGATE_STORE"  # the store when --store is not given (as for `serve`)
TEACHER_CHECK_EXAMPLES = 100


def add_commands(sub: argparse._SubParsersAction) -> None:
    _tasks(sub)
    _teacher(sub)
    _distill(sub)
    _eval(sub)
    _sweep(sub)
    _students(sub)


def _store_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--store",
        type=Path,
        help=f"model store directory (default ${STORE_ENV} or ~/.cache/distillgate/models)",
    )


def _progress_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (ours, model loading, teacher answers)",
    )


def _tasks(sub: argparse._SubParsersAction) -> None:
    tasks = sub.add_parser("tasks", help="the built-in tasks and user JSONL tasks")
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    listing = actions.add_parser("list", help="the built-in tasks")
    show = actions.add_parser("show", help="a task: kind, labels, split sizes, examples")
    show.add_argument("task", help="built-in name or path to a .jsonl task")
    show.add_argument("--examples", type=int, default=3, help="how many to print per split")
    export = actions.add_parser("export", help="write a split as JSONL (the loader's format)")
    export.add_argument("task", help="built-in name or path to a .jsonl task")
    export.add_argument(
        "--split",
        default="test",
        choices=("train", "validation", "test"),
        help="which split (default test)",
    )
    export.add_argument("-n", type=int, default=None, help="how many examples (default all)")
    export.add_argument("-o", "--output", type=Path, help="file to write (default stdout)")
    for cmd in (listing, show, export):
        json_flag(cmd)
        cmd.set_defaults(func=_run_tasks)


def _teacher(sub: argparse._SubParsersAction) -> None:
    teacher = sub.add_parser("teacher", help="prepare the teacher")
    actions = teacher.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    prepare = actions.add_parser(
        "prepare",
        help="convert the embedded teacher into the store once and print its directory "
        "(an init step for servers that read it from there, e.g. vLLM)",
    )
    _store_flag(prepare)
    json_flag(prepare)
    prepare.set_defaults(func=_run_prepare)
    adapt = actions.add_parser(
        "adapt", help="fine-tune the teacher on a task's train split and register it"
    )
    adapt.add_argument("--task", required=True, help="built-in task or path to a .jsonl task")
    adapt.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="lora (merged into the weights) or full (default lora)",
    )
    adapt.add_argument(
        "--examples", type=int, default=2000, help="train examples to fine-tune on (default 2000)"
    )
    adapt.add_argument("--epochs", type=float, default=1.0, help="passes over them (default 1)")
    adapt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    adapt.add_argument("--teacher", help="model to adapt (default: the embedded teacher)")
    adapt.add_argument("--name", help="registry name (default: <teacher>-<task>-<method>)")
    adapt.add_argument("--eval", action="store_true", help="evaluate before and after")
    _progress_flag(adapt)
    _store_flag(adapt)
    json_flag(adapt)
    adapt.set_defaults(func=_run_adapt)


def _distill(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser("distill", help="prune and distil a student and register it")
    distill.add_argument("--task", required=True, help="built-in task or path to a .jsonl task")
    distill.add_argument(
        "--ratio",
        type=float,
        required=True,
        help="compression ratio in (0, 1]: student / teacher parameters",
    )
    distill.add_argument(
        "--examples", type=int, default=1000, help="train examples to distil on (default 1000)"
    )
    distill.add_argument(
        "--format",
        choices=FORMATS,
        default="logits",
        help="supervision: answers, logits (top-k KL) or cot (default logits)",
    )
    distill.add_argument(
        "--method",
        choices=METHODS,
        default="full",
        help="full fine-tuning or lora adapters, merged (default full)",
    )
    distill.add_argument("--schedule", default="one-shot", help="one-shot or iterative:k")
    distill.add_argument(
        "--pruning",
        choices=("depth", "width"),
        default="depth",
        help="remove whole layers or heads and neurons (default depth)",
    )
    distill.add_argument(
        "--epochs", type=float, default=2.0, help="passes over the examples (default 2)"
    )
    distill.add_argument("--top-k", type=int, default=128, help="teacher logits kept per token")
    distill.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    distill.add_argument(
        "--targets",
        choices=("teacher", "reference"),
        default="teacher",
        help="learn the teacher's generated answers, or the task's own answers (e.g. a task "
        "exported from the traffic log, whose answers are the teacher's; default teacher)",
    )
    distill.add_argument(
        "--teacher",
        help="registry name of the teacher, or a path to a Hugging Face directory "
        "(default: embedded)",
    )
    distill.add_argument("--name", help="registry name (default: derived from the options)")
    distill.add_argument("--eval", action="store_true", help="evaluate once registered")
    _teacher_check_flags(distill)
    _progress_flag(distill)
    _store_flag(distill)
    json_flag(distill)
    distill.set_defaults(func=_run_distill)


def _teacher_check_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--teacher-check-examples",
        type=int,
        default=TEACHER_CHECK_EXAMPLES,
        help="validation items the teacher answers before distilling "
        f"(default {TEACHER_CHECK_EXAMPLES})",
    )
    cmd.add_argument("--min-teacher-accuracy", type=float,
                     help="stop when the teacher's accuracy is below this (default: twice "
                     "the task's chance level)")  # fmt: skip
    cmd.add_argument(
        "--force", action="store_true", help="distil without checking the teacher's accuracy"
    )


def _eval(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("eval", help="evaluate a registry entry; results go in its manifest")
    cmd.add_argument("name", help="registry name of the model")
    cmd.add_argument("--task", help="task to measure in-domain (default: the model's own)")
    cmd.add_argument(
        "--test-examples", type=int, default=300, help="test items for accuracy (default 300)"
    )
    cmd.add_argument(
        "--heldout-examples",
        type=int,
        default=200,
        help="validation items for KL and cross-entropy (default 200)",
    )
    cmd.add_argument(
        "--general-examples",
        type=int,
        default=None,
        help="general-knowledge probe items, student and parent alike (default: all)",
    )
    cmd.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _progress_flag(cmd)
    _store_flag(cmd)
    json_flag(cmd)
    cmd.set_defaults(func=_run_eval)


def _sweep(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="make and measure a grid of students (resumable)")
    sweep.add_argument(
        "--grid", type=Path, help="grid YAML (default: the shipped deploy/sweeps/default.yaml)"
    )
    sweep.add_argument("--out", type=Path, required=True, help="results JSONL (appended)")
    sweep.add_argument("--keep", action="store_true", help="keep the students in the store")
    _progress_flag(sweep)
    _store_flag(sweep)
    json_flag(sweep)
    sweep.set_defaults(func=_run_sweep)


def _students(sub: argparse._SubParsersAction) -> None:
    students = sub.add_parser("students", help="list, show or remove registered models")
    actions = students.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="one of:"
    )
    for action, helptext in (
        ("list", "every registered model"),
        ("show", "one model's manifest: lineage and evaluation"),
        ("remove", "delete a model (refused while a running gateway serves it)"),
    ):
        cmd = actions.add_parser(action, help=helptext)
        if action != "list":
            cmd.add_argument("name", help="registry name of the model")
        _store_flag(cmd)
        json_flag(cmd)
        cmd.set_defaults(func=_run_students)


def _store(path: Path | None):
    from models.store import ModelStore

    return ModelStore(path or os.environ.get(STORE_ENV) or None)


@contextlib.contextmanager
def _bars(shown: bool) -> Iterator[None]:
    """Every progress bar on (as tqdm and transformers default) or off for one command.

    Our bars follow transformers' switch (models/distill/data.py uses its tqdm; training's
    bar takes `progress`), which also governs its loading bars and huggingface_hub's. The
    one bar outside it, the GGUF conversion's, gateway/cli.py's `main` silences.
    """
    if shown:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _run_tasks(args: argparse.Namespace) -> int:
    from models.tasks import SPLITS, TaskError, export_jsonl, get_task, task_names

    try:
        if args.action == "list":
            rows = [_task_summary(get_task(name)) for name in task_names()]
            text = "\n".join(f"{r['name']:20} {r['kind']:16} {r['description']}" for r in rows)
            return emit(args.json, rows, text)
        task = get_task(args.task)
        if args.action == "show":
            info = _task_summary(task)
            info["examples"] = {
                s: [e.to_json() for e in task.examples(s, args.examples)] for s in SPLITS
            }
            return emit(args.json, info, _task_text(info))
        if args.n is not None and args.n < 1:
            raise CliError(f"-n must be at least 1, got {args.n}")
        if args.output is None:
            export_jsonl(task, args.split, args.n, sys.stdout)
            return 0
        with args.output.open("w") as stream:
            written = export_jsonl(task, args.split, args.n, stream)
        summary = {"written": written, "path": str(args.output)}
        return emit(args.json, summary, f"wrote {written} examples to {args.output}")
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


def _manifest_out(args: argparse.Namespace, manifest) -> int:
    return emit(args.json, manifest.model_dump(mode="json"), manifest.model_dump_json(indent=2))


def _run_distill(args: argparse.Namespace) -> int:
    from models.distill.factory import FactoryError, StudentSpec, make_student, validate
    from models.store import TEACHER_NAME

    store = _store(args.store)
    spec = StudentSpec(
        task=args.task, ratio=args.ratio, examples=args.examples, format=args.format,
        method=args.method, schedule=args.schedule, pruning=args.pruning, seed=args.seed,
        teacher=args.teacher or TEACHER_NAME, epochs=args.epochs, top_k=args.top_k,
        name=args.name, targets=args.targets,
    )  # fmt: skip
    with _bars(not args.no_progress):
        try:
            validate(store, spec)
            if not args.force:
                _check_teacher(store, spec, args)
            manifest = make_student(store, spec, progress=not args.no_progress, evaluate=args.eval)
        except FactoryError as exc:
            raise CliError(str(exc)) from None
    return _manifest_out(args, manifest)


def _check_teacher(store, spec, args: argparse.Namespace) -> None:
    """Stop before minutes of distillation when the teacher cannot do the task (below
    twice chance, or --min-teacher-accuracy), and say how to fix it."""
    from models.distill.factory import teacher_accuracy

    if args.teacher_check_examples < 1:
        raise CliError(f"--teacher-check-examples must be at least 1, got "
                       f"{args.teacher_check_examples}")  # fmt: skip
    minimum = args.min_teacher_accuracy
    if minimum is not None and not 0 <= minimum <= 1:
        raise CliError(f"--min-teacher-accuracy must be in [0, 1], got {minimum}")
    check = teacher_accuracy(store, spec.teacher, spec.task, args.teacher_check_examples)
    bound = min(1.0, 2 * check.chance) if minimum is None else minimum
    if check.accuracy < bound:
        what = "twice chance" if minimum is None else "--min-teacher-accuracy"
        raise CliError(
            f"teacher {spec.teacher!r} answers {check.accuracy:.1%} of {check.n} {spec.task} "
            f"validation items correctly; chance is {check.chance:.1%} and the minimum "
            f"{bound:.1%} ({what}). Adapt it first: `distillgate teacher adapt --task "
            f"{spec.task} --teacher {spec.teacher}`, then distil from the model it registers "
            f"(--teacher NAME); or pass --force"
        )


def _run_prepare(args: argparse.Namespace) -> int:
    from models.store import TEACHER_NAME

    path = _store(args.store).ensure_teacher()
    return emit(args.json, {"name": TEACHER_NAME, "path": str(path)}, str(path))


def _run_adapt(args: argparse.Namespace) -> int:
    from models.distill.factory import FactoryError, adapt_teacher
    from models.store import TEACHER_NAME

    store = _store(args.store)
    teacher = args.teacher or TEACHER_NAME
    with _bars(not args.no_progress):
        try:
            manifest = adapt_teacher(
                store, args.task, method=args.method, examples=args.examples,
                epochs=args.epochs, seed=args.seed, teacher=teacher, name=args.name,
                progress=not args.no_progress,
            )  # fmt: skip
        except FactoryError as exc:
            raise CliError(str(exc)) from None
        if args.eval:
            from models.evaluate import evaluate_entry

            evaluate_entry(store, teacher, task=args.task, latency=False)
            manifest = evaluate_entry(store, manifest.name, latency=False)
    return _manifest_out(args, manifest)


def _run_eval(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_entry
    from models.store import StoreError
    from models.tasks import TaskError

    for flag, value in (("--test-examples", args.test_examples),
                        ("--heldout-examples", args.heldout_examples),
                        ("--general-examples", args.general_examples)):  # fmt: skip
        if value is not None and value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}")
    store = _store(args.store)
    with _bars(not args.no_progress):
        try:
            manifest = evaluate_entry(
                store, args.name, task=args.task, test_examples=args.test_examples,
                heldout_examples=args.heldout_examples, general_examples=args.general_examples,
                latency=not args.no_latency,
            )  # fmt: skip
        except (StoreError, TaskError) as exc:
            raise CliError(str(exc)) from None
    data = manifest.model_dump(mode="json")
    return emit(args.json, data, json.dumps(data["evaluation"], indent=2))


def _run_sweep(args: argparse.Namespace) -> int:
    from distillgate_deploy import shipped
    from models.distill.factory import FactoryError
    from models.store import StoreError
    from models.sweep import SweepError, load_grid, run_sweep

    with _bars(not args.no_progress):
        try:
            grid = load_grid(args.grid or shipped("sweeps/default.yaml"))
            store = _store(args.store)
            store.resolve(grid.teacher)
            made = run_sweep(store, grid, args.out, keep=args.keep, progress=not args.no_progress)
        except (SweepError, FactoryError, StoreError) as exc:
            raise CliError(str(exc)) from None
    summary = {"measured": made, "results": str(args.out)}
    return emit(args.json, summary, f"{made} students measured; results in {args.out}")


def _run_students(args: argparse.Namespace) -> int:
    from models.store import StoreError

    store = _store(args.store)
    try:
        if args.action == "list":
            entries = store.entries()
            lines = [f"{m.name:32} {m.role:8} r={_ratio(m):5} parent={m.parent or '-'}"
                     for m in entries] or [f"no models in {store.root}"]  # fmt: skip
            return emit(args.json, [m.model_dump(mode="json") for m in entries], "\n".join(lines))
        if args.action == "show":
            return _manifest_out(args, store.manifest(args.name))
        store.remove(args.name)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    return emit(args.json, {"removed": args.name}, f"removed {args.name}")


def _ratio(manifest) -> str:
    return "-" if manifest.compression_ratio is None else f"{manifest.compression_ratio:.2f}"
