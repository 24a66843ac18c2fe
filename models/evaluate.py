"""Evaluation of a registry entry: in-domain accuracy (with a 95% bootstrap interval) and
agreement with the teacher, general-knowledge accuracy and its chance-normalised
retention, held-out KL to the teacher and cross-entropy, size, and measured latency.

Answers are generated through `LocalBackend`, the same code path the gateway serves
with (batched, greedy), so accuracy and latency describe the model as it is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig

from models.backends.base import GenerationRequest, SamplingParams
from models.backends.local import LocalBackend
from models.pruning.params import non_embedding_parameters
from models.store import (
    DomainScore,
    GeneralScore,
    Heldout,
    Interval,
    LatencyFigures,
    Manifest,
    ModelStore,
)
from models.tasks import get_task
from models.tasks.base import Example, Task, TaskError, match_label, normalise

ANSWER_TOKENS = 16


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
    return Interval(value=float(values.mean()), low=float(low), high=float(high))


def retention(student: float, teacher: float, chance: float) -> float:
    """Chance-normalised retention: (student - chance) / (teacher - chance); 1 keeps all of
    the teacher's margin over guessing, 0 is no better than guessing."""
    if teacher <= chance:
        raise ValueError(f"teacher accuracy {teacher:.3f} is not above chance {chance:.3f}")
    return (student - chance) / (teacher - chance)


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


async def measure_latency(
    model_dir: Path, max_tokens: int = 32, repeats: int = 3
) -> LatencyFigures:
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
        return LatencyFigures(
            ttft_ms=statistics.median(t for t, _, _ in solo),
            ms_per_token_b1=statistics.median(m for _, m, _ in solo),
            ms_per_token_b8=statistics.median(m for run in eights for _, m, _ in run),
        )
    finally:
        await backend.stop()


# -- a registry entry, evaluated and recorded in its manifest ------------------------------


def _answers(store: ModelStore, name: str, task: Task, examples: list[Example]) -> list[str]:
    """Greedy answers of model `name`, cached beside the registry (keyed by its weights)."""
    model_dir = store.resolve(name)
    stat = (model_dir / "model.safetensors").stat()
    key = json.dumps([name, stat.st_size, stat.st_mtime_ns, [[e.id, e.prompt] for e in examples]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = store.root / ".cache" / "answers" / f"{name}-{task.name}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    answers = asyncio.run(
        generate_answers(model_dir, [e.messages() for e in examples], ANSWER_TOKENS)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers))
    return answers


def _same_answer(task: Task, a: str, b: str) -> bool:
    if task.labels:
        return match_label(a, task.labels) == match_label(b, task.labels)
    return normalise(a) == normalise(b)


def in_domain(
    store: ModelStore, name: str, task: Task, n: int, reference: str | None
) -> DomainScore:
    """Test-split accuracy with its 95% interval, and agreement with `reference`'s answers."""
    examples = task.examples("test", n)
    answers = _answers(store, name, task, examples)
    scores = [task.score(e, a) for e, a in zip(examples, answers, strict=True)]
    result = DomainScore(n=len(scores), accuracy=bootstrap_ci(scores), chance=task.chance)
    if reference is None:
        return result
    theirs = _answers(store, reference, task, examples)
    same = [float(_same_answer(task, a, b)) for a, b in zip(answers, theirs, strict=True)]
    teacher = [task.score(e, a) for e, a in zip(examples, theirs, strict=True)]
    return result.model_copy(
        update={
            "agreement": bootstrap_ci(same),
            "reference_accuracy": float(np.mean(teacher)),
            "retention": float(np.mean(scores) / max(np.mean(teacher), 1e-9)),
        }
    )


def general_knowledge(model_dir: Path, n: int | None = None) -> GeneralScore:
    """Accuracy on the first `n` items of the general-knowledge probe (all when None)."""
    from models.tasks.knowledge import accuracy_by_loglik

    task = get_task("general-knowledge")
    examples = task.examples("test", n)
    model, tokenizer = _load(model_dir)
    scores = accuracy_by_loglik(model, tokenizer, examples)
    return GeneralScore(n=len(scores), accuracy=bootstrap_ci(scores), chance=task.chance)


def _load(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def heldout_divergence(store: ModelStore, name: str, reference: str, task: Task, n: int) -> Heldout:
    """Mean forward KL to `reference` (top-k, tau = 1) and cross-entropy on its answers,
    per token, over the validation split (never trained on)."""
    import torch

    from models.distill.data import TeacherCache, batches, cached_sequences, target_logits
    from models.distill.losses import masked_ce, topk_forward_kl

    reference_dir = store.resolve(reference)
    model, tokenizer = _load(store.resolve(name))
    cache = TeacherCache(store.root / ".cache" / "teacher")
    examples = task.examples("validation", n)
    items = cached_sequences(
        cache, reference_dir, None, tokenizer, task.name, "validation", examples, "logits"
    )
    kl = ce = tokens = 0.0
    with torch.inference_mode():
        for chunk in batches(items, 16):
            logits, targets = target_logits(model, chunk, tokenizer.pad_token_id)
            lp = torch.cat([s.teacher_logprobs for s in chunk])
            ids = torch.cat([s.teacher_ids for s in chunk])
            kl += float(topk_forward_kl(logits, lp, ids)) * len(targets)
            ce += float(masked_ce(logits, targets)) * len(targets)
            tokens += len(targets)
    return Heldout(kl=kl / tokens, cross_entropy=ce / tokens, tokens=int(tokens))


def _reference_gk(store: ModelStore, reference: str, n: int | None) -> float:
    """The reference model's general-knowledge accuracy on the same items as the student's:
    the whole probe is measured once and kept in its manifest; a subset is measured each
    time and not kept."""
    evaluation = store.manifest(reference).evaluation
    kept = evaluation.general_knowledge
    if n is not None and n < (get_task("general-knowledge").size("test") or 0):
        return general_knowledge(store.resolve(reference), n).accuracy.value
    if kept is None:
        kept = general_knowledge(store.resolve(reference))
        store.update(
            reference, evaluation=evaluation.model_copy(update={"general_knowledge": kept})
        )
    return kept.accuracy.value


def evaluate_entry(
    store: ModelStore,
    name: str,
    *,
    task: str | None = None,
    test_examples: int = 300,
    heldout_examples: int = 200,
    general_examples: int | None = None,
    latency: bool = True,
) -> Manifest:
    """Evaluate registry entry `name` on its task (or `task`) against its parent, and
    record the results in its manifest's `evaluation`."""
    manifest = store.manifest(name)
    task_name = task or manifest.task
    if task_name is None:
        raise TaskError(f"model {name!r} has no task in its manifest; name one with --task")
    the_task = get_task(task_name)
    model_dir = store.resolve(name)
    reference = manifest.parent
    previous = manifest.evaluation
    domain = in_domain(store, name, the_task, test_examples, reference)
    gk = general_knowledge(model_dir, general_examples)
    heldout = dict(previous.heldout)
    if reference is not None:
        reference_gk = _reference_gk(store, reference, general_examples)
        kept = retention(gk.accuracy.value, reference_gk, 0.25)
        gk = gk.model_copy(update={"retention": kept})
        heldout[the_task.name] = heldout_divergence(
            store, name, reference, the_task, heldout_examples
        )
    evaluation = previous.model_copy(
        update={
            "in_domain": {**previous.in_domain, the_task.name: domain},
            "heldout": heldout,
            "general_knowledge": gk,
            "non_embedding_parameters": int(
                non_embedding_parameters(AutoConfig.from_pretrained(model_dir))
            ),
            "reference": reference,
            "evaluated": int(time.time()),
        }
    )
    if latency:
        latency_figures = asyncio.run(measure_latency(model_dir))
        evaluation = evaluation.model_copy(update={"latency": latency_figures})
    return store.update(name, evaluation=evaluation)
