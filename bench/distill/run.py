"""The student factory's two performance figures, on the real teacher. Run by hand:

    .venv/bin/python -m bench.distill.run [--store var/bench-store] [--task finance-headlines]

1. Teacher adaptation (LoRA, merged) on the task's train split; in-domain accuracy of the
   teacher before and after.
2. The teacher's outputs for the distillation examples are cached (timed on its own), then
   students at each ratio are pruned and distilled from the adapted teacher with those
   outputs cached (timed: the 10-minute target is for this part), and evaluated: in-domain
   accuracy kept relative to the adapted teacher, general-knowledge retention.
Results go to stdout as a table and to --json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/bench-store"))
    parser.add_argument("--task", default="finance-headlines")
    parser.add_argument("--adapt-examples", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--format", default="logits")
    parser.add_argument("--method", default="full")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def accuracy(manifest, task: str) -> dict:
    domain = manifest.evaluation.model_dump()["in_domain"][task]
    return {"accuracy": domain["accuracy"], "retention": domain.get("retention")}


def adapted_teacher(store, args) -> tuple[str, dict]:
    from models.distill.factory import adapt_teacher
    from models.evaluate import evaluate_entry
    from models.store import TEACHER_NAME

    name = f"{TEACHER_NAME}-{args.task}-lora"
    result: dict = {}
    if not store.path_for(name).exists():
        started = time.perf_counter()
        adapt_teacher(store, args.task, method="lora", examples=args.adapt_examples)
        result["adapt_seconds"] = time.perf_counter() - started
    base = evaluate_entry(store, TEACHER_NAME, task=args.task,
                          test_examples=args.test_examples, latency=False)  # fmt: skip
    adapted = evaluate_entry(store, name, test_examples=args.test_examples, latency=True)
    result["before"] = accuracy(base, args.task)["accuracy"]
    result["after"] = accuracy(adapted, args.task)["accuracy"]
    result["general_knowledge_before"] = base.evaluation.general_knowledge.accuracy.model_dump()
    result["general_knowledge_after"] = adapted.evaluation.general_knowledge.accuracy.model_dump()
    result["latency"] = adapted.evaluation.model_dump()["latency"]
    return name, result


def student(store, args, teacher: str, ratio: float) -> dict:
    from models.distill.factory import StudentSpec, make_student
    from models.evaluate import evaluate_entry

    spec = StudentSpec(task=args.task, ratio=ratio, examples=args.examples, format=args.format,
                       method=args.method, teacher=teacher, epochs=args.epochs)  # fmt: skip
    name = spec.model_name()
    if store.path_for(name).exists():
        store.remove(name)
    started = time.perf_counter()
    made = make_student(store, spec)
    seconds = time.perf_counter() - started
    evaluated = evaluate_entry(store, name, test_examples=args.test_examples)
    phases = made.training["phases"]
    return {
        "name": name,
        "ratio": made.compression_ratio,
        "layers": made.pruning["steps"][-1]["num_hidden_layers"],
        "distill_seconds": seconds,
        "train_seconds": sum(p["seconds"] for p in phases),
        "prune_seconds": sum(s["seconds"] for s in made.pruning["steps"]),
        "teacher_seconds": made.training["teacher_seconds"],
        "steps": sum(p["steps"] for p in phases),
        "target_tokens": sum(p["target_tokens"] for p in phases),
        **accuracy(evaluated, args.task),
        "general_knowledge": evaluated.evaluation.model_dump()["general_knowledge"],
        "heldout": evaluated.evaluation.model_dump()["heldout"][args.task],
        "latency": evaluated.evaluation.model_dump()["latency"],
    }


def warm_cache(store, args, teacher: str) -> float:
    """The teacher pass over the distillation examples, so that students read it cached."""
    from transformers import AutoTokenizer

    from models.distill.data import TeacherCache, cached_sequences
    from models.tasks import get_task

    task = get_task(args.task)
    teacher_dir = store.resolve(teacher)
    started = time.perf_counter()
    cached_sequences(
        TeacherCache(store.root / ".cache" / "teacher"), teacher_dir, None,
        AutoTokenizer.from_pretrained(teacher_dir), task.name, "train",
        task.examples("train", args.examples), args.format,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    import torch

    from models.store import ModelStore

    torch.set_num_threads(args.threads)
    store = ModelStore(args.store)
    store.ensure_teacher()
    teacher, adaptation = adapted_teacher(store, args)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "adaptation": adaptation}
    results["teacher_pass_seconds"] = warm_cache(store, args, teacher)
    results["students"] = [student(store, args, teacher, r) for r in args.ratios]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
