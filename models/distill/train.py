"""The training loop shared by distillation and teacher adaptation: full-parameter or LoRA
(peft adapters, merged afterwards), seeded, with a progress bar and checkpoints that let a
killed run resume where it stopped.

Full-parameter training freezes the token embeddings: they are tied to the output head in
the Llama models we serve, pruning never touches them, and they are a quarter of the
teacher's weights; leaving them fixed keeps every student's vocabulary space the teacher's.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from models.distill.data import TrainingSequence, batches, target_logits
from models.distill.losses import cot_loss, masked_ce, topk_forward_kl

Objective = Literal["ce", "kl", "cot"]
Method = Literal["full", "lora"]
METHODS: tuple[Method, ...] = ("full", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT = "checkpoint.pt"
log = logging.getLogger("distillgate")


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "full"
    epochs: float = 2.0
    batch_size: int = 16
    lr: float | None = None  # default: 2e-4 full, 1e-3 LoRA
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    tau: float = 1.0
    alpha: float = 0.5
    lora_rank: int = 16
    seed: int = 0
    checkpoint_every: int = 25
    max_steps: int | None = None  # cap, e.g. for a short phase of an iterative schedule

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.method == "full" else 1e-3)

    def steps(self, n: int) -> int:
        total = math.ceil(self.epochs * math.ceil(n / self.batch_size))
        return min(total, self.max_steps) if self.max_steps else total


@dataclass(frozen=True)
class TrainReport:
    steps: int
    sequences: int
    target_tokens: int
    seconds: float
    resumed_from: int
    final_loss: float
    trainable_parameters: int


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare(model: PreTrainedModel, config: TrainConfig) -> PreTrainedModel:
    """Mark what trains: adapters only under LoRA, all but the embeddings otherwise."""
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    for param in model.parameters():
        param.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def finish(model: PreTrainedModel) -> PreTrainedModel:
    """A plain model again: LoRA adapters merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _loss(
    model: PreTrainedModel, chunk: list[TrainingSequence], objective: Objective, config, pad: int
) -> tuple[torch.Tensor, int]:
    logits, targets = target_logits(model, chunk, pad)
    if objective == "ce":
        return masked_ce(logits, targets), len(targets)
    top_lp = torch.cat([s.teacher_logprobs for s in chunk])
    top_ids = torch.cat([s.teacher_ids for s in chunk])
    if objective == "kl":
        return topk_forward_kl(logits, top_lp, top_ids, config.tau), len(targets)
    return cot_loss(logits, targets, top_lp, top_ids, config.alpha, config.tau), len(targets)


def _order(n: int, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """This epoch's batches: shuffled by (seed, epoch), so a resumed run replays them."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [list(b) for b in batches(order, batch_size)]


def _save(path: Path, model, optimizer, scheduler, step: int, fingerprint: dict) -> None:
    trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "model": {k: v.detach().clone() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path | None, model, optimizer, scheduler, fingerprint: dict) -> int:
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    if state["fingerprint"] != fingerprint:
        log.warning("ignoring checkpoint %s: it was made by a different run", path)
        return 0
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming from step %d of %s", state["step"], path)
    return int(state["step"])


def train(
    model: PreTrainedModel,
    items: list[TrainingSequence],
    objective: Objective,
    config: TrainConfig,
    pad: int,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, TrainReport]:
    """Train `model` on `items` and return it merged and frozen, with a report. With a
    `checkpoint_dir`, state is saved every `checkpoint_every` steps and a rerun of the same
    run (same config, same sequences) resumes from the last save."""
    if not items:
        raise ValueError("no training sequences")
    _seed(config.seed)
    model = prepare(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = config.steps(len(items))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=0.0)
    warmup = max(1, int(config.warmup * total))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    fingerprint = {
        **asdict(config),
        "objective": objective,
        "sequences": [s.example_id for s in items],
        "shapes": [len(s.ids) for s in items],
    }
    path = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(path, model, optimizer, scheduler, fingerprint)
    started, tokens, loss_value = time.perf_counter(), 0, float("nan")
    bar = tqdm(total=total, initial=done, desc=f"train ({objective})", disable=not progress)
    per_epoch = math.ceil(len(items) / config.batch_size)
    for step in range(done, total):
        epoch, index = divmod(step, per_epoch)
        chunk = [items[i] for i in _order(len(items), config.seed, epoch, config.batch_size)[index]]
        loss, n = _loss(model, chunk, objective, config, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens, loss_value = tokens + n, loss.detach().item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
        if path and (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
            _save(path, model, optimizer, scheduler, step + 1, fingerprint)
    bar.close()
    report = TrainReport(
        steps=total - done,
        sequences=len(items),
        target_tokens=tokens,
        seconds=time.perf_counter() - started,
        resumed_from=done,
        final_loss=loss_value,
        trainable_parameters=sum(p.numel() for p in params),
    )
    if path and path.exists():
        path.unlink()
    return finish(model), report
