"""Structured outputs on the real teacher (LocalBackend, in process): how many answers to a
JSON-schema classification task are schema-valid with constrained decoding and without it,
and what the constraint costs per token. Run by hand:

    .venv/bin/python -m bench.structured.run [--store var/test-store] [-n 100] [--repeats 3]

The task: `finance-headlines` test headlines, each asked as `{"label": <one of 13 event
types>}`. Validity: N requests per arm, greedy, all sent at once (batches of 8). The
baseline asks for the same JSON in words only; the constrained arm also sends the schema as
`response_format`. Both arms report schema-valid %, label accuracy and finish reasons.

Overhead per token: (1) decoding time per token (after the first, so prefill is left out)
of both arms, batch 1, on the same `--speed-n` prompts, arms alternating, median over the
prompts per run and over `--repeats` runs; (2) the mask alone: the constrained answers'
tokens replayed through fresh constraints, `apply` + `accept` timed per token (median).
Results: stdout and, with --json, a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

INSTRUCTION = 'Reply with JSON only, exactly like {"label": "<event type>"}.'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/test-store"))
    parser.add_argument("-n", type=int, default=100, help="requests per validity arm")
    parser.add_argument("--speed-n", type=int, default=16, help="requests per speed run")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def schema(labels: tuple[str, ...]) -> dict:
    return {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }


def check(text: str, labels: tuple[str, ...]) -> str | None:
    """The label when `text` is valid against the schema, else None."""
    import jsonschema

    try:
        value = json.loads(text)
        jsonschema.validate(value, schema(labels))
    except (ValueError, jsonschema.ValidationError):
        return None
    return value["label"]


async def ask_all(backend, prompts: list[str], fmt, max_tokens: int) -> tuple[list, float]:
    """Every prompt at once: (final chunks with their texts, wall seconds)."""
    from models.backends.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, response_format=fmt)

    async def one(prompt: str):
        message = {"role": "user", "content": f"{prompt}\n{INSTRUCTION}"}
        request = GenerationRequest("bench", params, (message,), stream=False)
        return [c async for c in backend.generate(request)][-1]

    start = time.perf_counter()
    finals = await asyncio.gather(*(one(p) for p in prompts))
    return finals, time.perf_counter() - start


def validity(finals, answers: list[str], labels: tuple[str, ...]) -> dict:
    got = [check(f.text, labels) for f in finals]
    valid = sum(g is not None for g in got)
    right = sum(g == a for g, a in zip(got, answers, strict=True))
    return {
        "n": len(finals),
        "schema_valid": valid,
        "schema_valid_pct": round(100 * valid / len(finals), 1),
        "accuracy_pct": round(100 * right / len(finals), 1),
        "finish_reasons": dict(Counter(f.finish_reason for f in finals)),
        "examples": [f.text for f in finals[:3]],
    }


def mask_cost_us(backend, finals, fmt) -> float:
    """Median microseconds of one `apply` + `accept` per token, replaying the answers."""
    import torch

    loaded = backend._loaded
    constraints, tokenizer = loaded.constraints, loaded.tokenizer
    logits = torch.zeros(loaded.vocab_size)
    times = []
    for f in finals:
        c = constraints.create(fmt)
        ids = tokenizer(f.text, add_special_tokens=False)["input_ids"] + [min(c.eos_ids)]
        for token in ids:
            start = time.perf_counter()
            c.apply(logits)
            c.accept(token)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def inter_token_ms(backend, prompt: str, fmt, max_tokens: int) -> float:
    """One streamed request alone: ms per token after the first (prefill excluded)."""
    from models.backends.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, response_format=fmt)
    message = {"role": "user", "content": f"{prompt}\n{INSTRUCTION}"}
    first = last = final = None
    async for final in backend.generate(GenerationRequest("bench", params, (message,))):  # noqa: B007
        last = time.perf_counter()
        first = first or last
    return 1000 * (last - first) / max(final.completion_tokens - 1, 1)


async def speed(backend, prompts, fmt, args) -> dict:
    """Decoding ms/token of both arms, one request at a time on the same prompts, the arms
    alternating per prompt; the median over prompts per repeat, then over repeats."""
    runs: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(args.repeats):
        per: dict[str, list[float]] = {"free": [], "constrained": []}
        for prompt in prompts:
            for arm, f in (("free", None), ("constrained", fmt)):
                per[arm].append(await inter_token_ms(backend, prompt, f, args.max_tokens))
        for arm in runs:
            runs[arm].append(statistics.median(per[arm]))
    medians = {arm: statistics.median(r) for arm, r in runs.items()}
    return {
        "runs_ms_per_token": {a: [round(r, 2) for r in rs] for a, rs in runs.items()},
        "median_ms_per_token": {a: round(m, 2) for a, m in medians.items()},
        "median_tokens_per_s": {a: round(1000 / m, 2) for a, m in medians.items()},
        "overhead_pct": round(100 * (medians["constrained"] / medians["free"] - 1), 1),
    }


async def main_async(args: argparse.Namespace) -> dict:
    from models.backends.base import OutputFormat
    from models.backends.local import LocalBackend, set_threads
    from models.store import ModelStore
    from models.tasks import get_task

    set_threads(args.threads)
    task = get_task("finance-headlines")
    examples = task.examples("test", args.n)
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    fmt = OutputFormat("json_schema", json.dumps(schema(task.labels)), "event", strict=True)
    backend = LocalBackend("teacher", ModelStore(args.store).ensure_teacher(),
                           max_batch_size=8, queue_size=max(64, args.n))  # fmt: skip
    await backend.start()
    try:
        await ask_all(backend, prompts[:1], fmt, 4)  # builds the llguidance tokenizer
        results = {}
        for arm, f in (("baseline", None), ("constrained", fmt)):
            finals, wall = await ask_all(backend, prompts, f, args.max_tokens)
            results[arm] = validity(finals, answers, task.labels) | {"wall_s": round(wall, 1)}
            if f is not None:
                results["mask_us_per_token"] = round(mask_cost_us(backend, finals, f), 1)
                tokens = sum(x.completion_tokens for x in finals)
                results["decode_ms_per_token_batched"] = round(1000 * wall / tokens, 1)
        results["speed"] = await speed(backend, prompts[: args.speed_n], fmt, args)
    finally:
        await backend.stop()
    return results


def main() -> None:
    args = parse_args()
    results = {"args": {k: str(v) for k, v in vars(args).items()}, **asyncio.run(main_async(args))}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
