"""Throughput of LocalBackend (continuous batching) against naive per-request
`model.generate` on the real teacher, at 1 and 8 concurrent requests. Run by hand:

    .venv/bin/python -m bench.local_backend.run [--store var/test-store] [--repeats 3]

Every run decodes greedily with the same chat prompts and max_tokens; throughput is the
completion tokens actually generated (EOS ends a request early) over the wall time from
the first request sent to the last one finished. Naive 8-way is measured two ways: one
`generate` at a time behind a lock, and eight threads each running its own `generate`;
the faster of the two is the baseline. Results go to stdout as a table and as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = (
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe the history of the Roman Empire in several paragraphs.",
    "Write a detailed guide to planting a vegetable garden.",
    "Explain step by step how the internet delivers a web page.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Describe in detail the water cycle and why it matters.",
    "Write an essay about the importance of reading books.",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/test-store"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


# -- LocalBackend -----------------------------------------------------------------------


async def local_run(backend, prompts: list[str], max_tokens: int) -> tuple[int, float, int]:
    """(completion tokens, wall seconds, largest batch) for all prompts sent at once."""
    from models.backends.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(prompt: str):
        request = GenerationRequest("bench", params, ({"role": "user", "content": prompt},))
        last = None
        async for chunk in backend.generate(request):
            last = chunk
        return last

    start = time.perf_counter()
    finals = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    tokens = sum(f.completion_tokens for f in finals)
    return tokens, wall, max(f.batch_size for f in finals)


# -- naive model.generate ---------------------------------------------------------------


class Naive:
    """One `model.generate` call per request, the way a simple server would do it."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.lock = threading.Lock()

    def generate(self, prompt: str, max_tokens: int, lock: bool) -> int:
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with self.lock if lock else _nothing(), self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    def run(self, prompts: list[str], max_tokens: int, lock: bool) -> tuple[int, float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            counts = list(pool.map(lambda p: self.generate(p, max_tokens, lock), prompts))
        return sum(counts), time.perf_counter() - start


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- driver -----------------------------------------------------------------------------


def median_rate(samples: list[tuple[int, float]]) -> dict[str, float]:
    rates = [tokens / wall for tokens, wall in samples]
    return {
        "tokens_per_s": round(statistics.median(rates), 2),
        "tokens": statistics.median(t for t, _ in samples),
        "wall_s": round(statistics.median(w for _, w in samples), 2),
        "runs": [round(r, 2) for r in rates],
    }


async def bench(model_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Every case once per repeat, interleaved, so load from other processes on the
    machine falls on both sides alike; medians over the repeats."""
    from models.backends.local import LocalBackend

    backend = LocalBackend("teacher", model_dir, max_batch_size=8)
    await backend.start()
    naive = await asyncio.to_thread(Naive, model_dir)
    batches: list[int] = []

    async def local(n: int) -> tuple[int, float]:
        tokens, wall, batch = await local_run(backend, list(PROMPTS[:n]), args.max_tokens)
        if n == 8:
            batches.append(batch)
        return tokens, wall

    def naive_case(n: int, lock: bool):
        return lambda: asyncio.to_thread(naive.run, list(PROMPTS[:n]), args.max_tokens, lock)

    cases = {
        "local_c1": lambda: local(1),
        "naive_c1": naive_case(1, True),
        "local_c8": lambda: local(8),
        "naive_c8_lock": naive_case(8, True),
        "naive_c8_threads": naive_case(8, False),
    }
    samples: dict[str, list[tuple[int, float]]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    try:
        await local_run(backend, list(PROMPTS[:2]), 8)  # warm-up
        await asyncio.to_thread(naive.run, list(PROMPTS[:2]), 8, True)
        for _ in range(args.repeats):
            for name, case in cases.items():
                before = time.process_time()
                tokens, wall = await case()
                samples[name].append((tokens, wall))
                # Cores this process got: ~2 on a quiet machine, less when others compete.
                cpu[name].append((time.process_time() - before) / wall)
    finally:
        await backend.stop()
    results = {name: median_rate(runs) for name, runs in samples.items()}
    for name, shares in cpu.items():
        results[name]["cpu_cores_used"] = round(statistics.median(shares), 2)
    results["local_c8"]["max_batch"] = max(batches)
    return results


def main() -> None:
    args = parse_args()
    import torch

    from models.store import ModelStore

    torch.set_num_threads(args.threads)
    model_dir = ModelStore(args.store).ensure_teacher()
    load_before = os.getloadavg()[0]
    results = asyncio.run(bench(model_dir, args))
    naive8 = max(
        results["naive_c8_lock"]["tokens_per_s"], results["naive_c8_threads"]["tokens_per_s"]
    )
    summary = {
        "speedup_c8": round(results["local_c8"]["tokens_per_s"] / naive8, 2),
        "speedup_c1": round(
            results["local_c1"]["tokens_per_s"] / results["naive_c1"]["tokens_per_s"], 2
        ),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "loadavg_1min_before": round(load_before, 2),
    }
    for name, r in results.items():
        print(
            f"{name:18s} {r['tokens_per_s']:7.2f} tok/s  ({r['tokens']} tokens, {r['wall_s']} s, "
            f"{r['cpu_cores_used']} cores used)"
        )
    print(json.dumps({"results": results, "summary": summary}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
