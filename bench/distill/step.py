"""One training step (forward + backward, batch 16, finance-headlines prompts) of the
teacher depth-pruned to 15 layers, with and without running the batch's shared prompt
prefix once. Run by hand:

    .venv/bin/python -m bench.distill.step [--store var/bench-store] [--repeats 5]

Prints the largest difference between the two paths' hidden states and the median
seconds per step of each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/bench-store"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.distill.data import _hidden, pad_batch, sequence, target_positions
    from models.store import ModelStore
    from models.tasks import get_task

    torch.set_num_threads(2)
    path = ModelStore(args.store).ensure_teacher()
    tokenizer, model = (
        AutoTokenizer.from_pretrained(path),
        AutoModelForCausalLM.from_pretrained(path),
    )
    model.model.layers = model.model.layers[:15]
    model.config.num_hidden_layers = 15
    examples = get_task("finance-headlines").examples("train", 16)
    items = [sequence(tokenizer, e.id, e.messages(), e.answer) for e in examples]
    ids, mask = pad_batch(items, tokenizer.pad_token_id)
    rows, cols = target_positions(items)

    def plain():
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def shared():
        return _hidden(model, items, tokenizer.pad_token_id)

    with torch.no_grad():
        diff = (plain()[rows, cols] - shared()[rows, cols]).abs().max().item()
    print(f"max |difference| of hidden states: {diff:.2e}")
    for name, run in (("whole sequences", plain), ("shared prefix once", shared)):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            model.lm_head(run()[rows, cols]).logsumexp(-1).mean().backward()
            model.zero_grad()
            times.append(time.perf_counter() - started)
        each = [round(t, 2) for t in times]
        print(f"{name:20} median {statistics.median(times):.2f} s/step  {each}")


if __name__ == "__main__":
    main()
