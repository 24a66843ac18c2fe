"""Structural pruning of the real teacher (SmolLM2-135M-Instruct) to r = 0.5 and 0.25 by
depth and by width, before any distillation. Run by hand:

    .venv/bin/python -m bench.prune.run [--store var/test-store] [--ratios 0.5 0.25]

For each student: pruning time (calibration included), sizes, non-embedding parameters,
the achieved ratio, a save + reload round trip, held-out cross-entropy on a few
sentences unseen in calibration (a rough measure of what pruning destroyed before
distillation repairs it), greedy decode speed at batch 1, and a sample answer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CALIBRATION = (
    "Acme Corp shares jumped 8% after quarterly earnings beat analyst estimates.",
    "The central bank left interest rates unchanged and signalled patience.",
    "My order arrived damaged; I would like a refund or a replacement please.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War in Europe.",
    "To reset your password, open settings, choose security, then follow the link.",
    "A prime number has exactly two divisors: one and itself.",
    "Globex announced it will cut 1,200 jobs as part of a restructuring plan.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "Mount Everest is the highest mountain above sea level, on the Nepal-China border.",
    "Analysts upgraded Initech to buy, citing strong demand for its cloud products.",
    "Why is my internet connection dropping every few minutes since yesterday?",
)
HELD_OUT = (
    "Umbrella Inc. raised its full-year revenue guidance after a strong second quarter.",
    "The boiling point of water decreases as altitude increases.",
    "I was charged twice for the same subscription this month, can you help?",
    "Shakespeare wrote Hamlet around the year 1600.",
)
PROMPT = "What is the capital of France? Answer in one sentence."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/test-store"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--methods", nargs="+", default=["depth", "width"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def held_out_loss(model, tokenizer) -> float:
    import torch

    enc = tokenizer(list(HELD_OUT), return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.inference_mode():
        return float(model(**enc, labels=labels).loss)


def decode(model, tokenizer, new_tokens: int) -> tuple[float, str]:
    """(tokens per second at batch 1, greedy answer) for the chat PROMPT."""
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    started = time.perf_counter()
    out = model.generate(
        **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    seconds = time.perf_counter() - started
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return new_tokens / seconds, answer.strip()[:80]


def measure(model, tokenizer, label: str, new_tokens: int, extra: dict) -> dict:
    from models.prune import non_embedding_parameters

    speed, answer = decode(model, tokenizer, new_tokens)
    return {
        "model": label,
        "layers": model.config.num_hidden_layers,
        "heads/kv": f"{model.config.num_attention_heads}/{model.config.num_key_value_heads}",
        "mlp": model.config.intermediate_size,
        "non_embedding_params": non_embedding_parameters(model.config),
        "held_out_ce": round(held_out_loss(model, tokenizer), 3),
        "tokens_per_s": round(speed, 1),
        "answer": answer,
        **extra,
    }


def prune_one(teacher, tokenizer, method: str, ratio: float, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from models.prune import prune, save_pruned

    student, report = prune(teacher, tokenizer, ratio, method, list(CALIBRATION))
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(student, tokenizer, tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    extra = {
        "achieved_ratio": round(report.achieved_ratio, 4),
        "prune_s": round(report.seconds, 2),
        "removed_layers": report.removed_layers,
    }
    return measure(reloaded, tokenizer, f"{method} r={ratio}", new_tokens, extra)


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.store import ModelStore

    torch.set_num_threads(args.threads)
    teacher_dir = ModelStore(args.store).ensure_teacher()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    rows = [measure(teacher, tokenizer, "teacher", args.new_tokens, {"achieved_ratio": 1.0})]
    for method in args.methods:
        for ratio in args.ratios:
            rows.append(prune_one(teacher, tokenizer, method, ratio, args.new_tokens))
    columns = ["model", "achieved_ratio", "prune_s", "layers", "heads/kv", "mlp"]
    columns += ["non_embedding_params", "held_out_ce", "tokens_per_s", "answer"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in columns))
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
