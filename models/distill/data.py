"""Training sequences and the teacher's outputs for them, computed once and cached on disk.

A sequence is a chat-templated prompt followed by its target (the teacher's answer, the
reference answer, or a short rationale ending in the answer) and the end-of-turn token.
For `logits` and `cot` supervision the cache also holds the teacher's top-k log-probabilities
at every target token, so every student of a sweep reuses one teacher pass.

`cot` (our design, after Hsieh et al. 2023, "Distilling step-by-step"): every example gives
two sequences, the plain prompt -> answer, and the prompt plus RATIONALE_ASK -> a one-sentence
rationale the teacher wrote for its own answer, then "Answer: <answer>". The served student
is asked the plain prompt, so it still answers with the label alone and pays no trace
latency; the rationale sequences keep it trained on the teacher's free text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.logging import tqdm  # follows its progress-bar switch (--no-progress)

from models.tasks.base import Example

Format = Literal["answers", "logits", "cot"]
Targets = Literal["teacher", "reference"]
FORMATS: tuple[Format, ...] = ("answers", "logits", "cot")
RATIONALE_ASK = "\nExplain briefly, then answer."
CACHE_VERSION = 1
log = logging.getLogger("distillgate")


@dataclass
class TrainingSequence:
    """Prompt + target token ids; the loss covers ids[start:]. Teacher top-k tensors are
    (len(ids) - start, k) when the format needs them."""

    example_id: str
    ids: list[int]
    start: int
    teacher_logprobs: torch.Tensor | None = None
    teacher_ids: torch.Tensor | None = None

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.start :]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sequence(
    tokenizer: PreTrainedTokenizerBase, example_id: str, messages: list[dict[str, str]], target: str
) -> TrainingSequence:
    head = prompt_ids(tokenizer, messages)
    tail = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TrainingSequence(example_id, head + tail, len(head))


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str = "teacher answers",
) -> list[str]:
    """Greedy replies to chats, batched with left padding."""
    model.eval()
    replies: list[str] = []
    bar = tqdm(total=len(chats), desc=desc, unit="ex", leave=False)
    for chunk in batches(chats, batch_size):
        heads = [prompt_ids(tokenizer, chat) for chat in chunk]
        width = max(map(len, heads))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads])
        mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    return [reply.strip() for reply in replies]


def pad_batch(items: Sequence[TrainingSequence], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    width = max(len(s.ids) for s in items)
    ids = torch.tensor([s.ids + [pad] * (width - len(s.ids)) for s in items])
    mask = torch.tensor([[1] * len(s.ids) + [0] * (width - len(s.ids)) for s in items])
    return ids, mask


def target_positions(items: Sequence[TrainingSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the positions whose next-token logits predict each target token."""
    rows, cols = [], []
    for row, s in enumerate(items):
        cols += range(s.start - 1, len(s.ids) - 1)
        rows += [row] * (len(s.ids) - s.start)
    return torch.tensor(rows), torch.tensor(cols)


def shared_prefix(items: Sequence[TrainingSequence]) -> int:
    """Length of the token prefix every sequence of a batch shares (the chat template and
    the task's instruction), stopping before the first position a loss needs."""
    first = items[0].ids
    limit = min(s.start for s in items) - 1
    length = 0
    while length < limit and all(s.ids[length] == first[length] for s in items):
        length += 1
    return length


def _hidden(base: PreTrainedModel, items: Sequence[TrainingSequence], pad: int) -> torch.Tensor:
    """Final hidden states (B, T, H) of a right-padded batch. A prefix shared by the whole
    batch is run once and its keys and values reused by every row (the prompts of a task
    share most of their tokens, so this removes most of the work); gradients flow through
    the shared part as through the rest."""
    ids, mask = pad_batch(items, pad)
    share = shared_prefix(items) if len(items) > 1 else 0
    if share < 8:
        return base.model(input_ids=ids, attention_mask=mask).last_hidden_state
    head = base.model(input_ids=ids[:1, :share], use_cache=True)
    cache = head.cache
    cache.reorder_cache(torch.zeros(len(items), dtype=torch.long))
    positions = torch.arange(share, ids.shape[1]).expand(len(items), -1)
    tail = base.model(
        input_ids=ids[:, share:], attention_mask=mask, position_ids=positions,
        cache=cache, use_cache=True,
    ).last_hidden_state  # fmt: skip
    return torch.cat([head.last_hidden_state.expand(len(items), -1, -1), tail], dim=1)


def target_logits(
    model: PreTrainedModel, items: Sequence[TrainingSequence], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N target positions of a batch, and the target ids (N,). The
    vocabulary projection runs only there: on short answers it is most of the saving."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = _hidden(base, items, pad)
    rows, cols = target_positions(items)
    targets = torch.tensor([t for s in items for t in s.target_ids])
    return base.lm_head(hidden[rows, cols]), targets


@torch.inference_mode()
def attach_topk(
    teacher: PreTrainedModel,
    items: list[TrainingSequence],
    pad: int,
    k: int,
    batch_size: int = 16,
) -> None:
    """Fill each sequence's teacher top-k log-probabilities (float16) and ids (int32)."""
    teacher.eval()
    bar = tqdm(total=len(items), desc="teacher logits", unit="seq", leave=False)
    for chunk in batches(items, batch_size):
        logits, _ = target_logits(teacher, chunk, pad)
        top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        offset = 0
        for s in chunk:
            n = len(s.ids) - s.start
            s.teacher_logprobs = top.values[offset : offset + n].to(torch.float16)
            s.teacher_ids = top.indices[offset : offset + n].to(torch.int32)
            offset += n
        bar.update(len(chunk))
    bar.close()


def _rationale_chat(example: Example, answer: str) -> list[dict[str, str]]:
    ask = f"{example.prompt}\nThe answer is: {answer}. In one sentence, explain why."
    return [{"role": "user", "content": ask}]


def _rationale_prompt(example: Example) -> list[dict[str, str]]:
    return [{"role": "user", "content": example.prompt + RATIONALE_ASK}]


def content_hash(examples: Sequence[Example]) -> str:
    text = json.dumps([[e.prompt, e.answer] for e in examples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # the teacher's directory, with a fingerprint of its weights
    task: str
    split: str
    ids: tuple[str, ...]
    content: str  # a hash of the examples' prompts and answers: a changed task misses
    format: Format
    targets: Targets
    top_k: int

    def digest(self) -> str:
        weights = Path(self.teacher) / "model.safetensors"
        stat = weights.stat()
        data = {**self.__dict__, "weights": [stat.st_size, stat.st_mtime_ns], "v": CACHE_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


class TeacherCache:
    """Teacher outputs on disk, one file per (teacher, task, examples, format, k)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: CacheKey) -> Path:
        return self.root / f"{key.task}-{key.split}-{key.format}-{key.digest()}.pt"

    def load(self, key: CacheKey) -> list[TrainingSequence] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        rows = torch.load(path, weights_only=True)
        return [TrainingSequence(**row) for row in rows]

    def save(self, key: CacheKey, items: list[TrainingSequence]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save([dict(s.__dict__) for s in items], tmp)
        os.replace(tmp, path)


def teacher_sequences(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    fmt: Format,
    *,
    targets: Targets = "teacher",
    top_k: int = 128,
    max_answer_tokens: int = 16,
    max_rationale_tokens: int = 40,
) -> list[TrainingSequence]:
    """Build the training sequences of `examples` for format `fmt` with the teacher."""
    if targets == "reference":
        missing = [e.id for e in examples if e.answer is None]
        if missing:
            raise ValueError(f"reference targets need answers; {missing[0]} has none")
        answers = [e.answer or "" for e in examples]
    else:
        chats = [e.messages() for e in examples]
        answers = generate(teacher, tokenizer, chats, max_answer_tokens)
    items = [
        sequence(tokenizer, e.id, e.messages(), a) for e, a in zip(examples, answers, strict=True)
    ]
    if fmt == "cot":
        asks = [_rationale_chat(e, a) for e, a in zip(examples, answers, strict=True)]
        reasons = generate(
            teacher, tokenizer, asks, max_rationale_tokens, desc="teacher rationales"
        )
        items += [
            sequence(tokenizer, e.id, _rationale_prompt(e), f"{r}\nAnswer: {a}")
            for e, r, a in zip(examples, reasons, answers, strict=True)
        ]
    if fmt != "answers":
        attach_topk(teacher, items, tokenizer.pad_token_id, top_k)
    return items


def cached_sequences(
    cache: TeacherCache,
    teacher_dir: Path,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    split: str,
    examples: Sequence[Example],
    fmt: Format,
    **options,
) -> list[TrainingSequence]:
    """`teacher_sequences`, read from the cache when this teacher already produced them.
    `teacher` may be None when the caller expects a hit (it is loaded on a miss)."""
    key = CacheKey(
        str(teacher_dir),
        task,
        split,
        tuple(e.id for e in examples),
        content_hash(examples),
        fmt,
        options.get("targets", "teacher"),
        options.get("top_k", 128) if fmt != "answers" else 0,
    )
    hit = cache.load(key)
    if hit is not None:
        log.info("teacher outputs from cache %s", cache.path(key).name)
        return hit
    if teacher is None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    items = teacher_sequences(teacher, tokenizer, examples, fmt, **options)
    cache.save(key, items)
    return items
