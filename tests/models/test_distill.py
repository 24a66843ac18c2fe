"""Distillation losses, the training loop (what trains, resuming after a kill) and the
teacher cache, on a tiny random Llama with the real tokenizer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.distill.data import CacheKey, TeacherCache, content_hash, teacher_sequences
from models.distill.losses import cot_loss, masked_ce, topk_forward_kl
from models.distill.train import TrainConfig, _loss, prepare, train
from models.tasks.base import Example

VOCAB = 50
EXAMPLES = [
    Example(f"t/{i}", f"Classify: item number {i} is {'good' if i % 2 else 'bad'}.", None)
    for i in range(8)
]


def test_kl_is_zero_for_identical_distributions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    top = torch.log_softmax(logits, -1).topk(VOCAB, -1)
    for tau in (1.0, 2.0):
        kl = topk_forward_kl(logits, top.values, top.indices, tau)
        assert abs(float(kl)) < 1e-5


def test_kl_is_positive_otherwise_even_truncated() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, VOCAB), torch.randn(5, VOCAB)
    for k in (VOCAB, 8, 1):
        top = torch.log_softmax(teacher, -1).topk(k, -1)
        assert float(topk_forward_kl(student, top.values, top.indices)) > 0
    # truncation: a student matching the teacher still pays for mass outside the top-k
    top = torch.log_softmax(teacher, -1).topk(8, -1)
    assert float(topk_forward_kl(teacher, top.values, top.indices)) > 0


def test_cot_loss_blends_ce_and_kl() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(4, VOCAB), torch.randint(0, VOCAB, (4,))
    top = torch.log_softmax(torch.randn(4, VOCAB), -1).topk(10, -1)
    ce, kl = masked_ce(logits, targets), topk_forward_kl(logits, top.values, top.indices)
    assert torch.isclose(cot_loss(logits, targets, top.values, top.indices, alpha=1.0), ce)
    assert torch.isclose(cot_loss(logits, targets, top.values, top.indices, alpha=0.0), kl)
    mixed = cot_loss(logits, targets, top.values, top.indices, alpha=0.25)
    assert torch.isclose(mixed, 0.25 * ce + 0.75 * kl)
    with pytest.raises(ValueError, match="alpha"):
        cot_loss(logits, targets, top.values, top.indices, alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        topk_forward_kl(logits, top.values, top.indices, tau=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return (lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)), tokenizer


@pytest.fixture(scope="module")
def sequences(tiny):
    load, tokenizer = tiny
    return teacher_sequences(
        load(), tokenizer, EXAMPLES, "cot", top_k=16, max_answer_tokens=4, max_rationale_tokens=6
    )


def test_teacher_sequences_have_topk_at_every_target(sequences, tiny) -> None:
    _, tokenizer = tiny
    assert len(sequences) == 2 * len(EXAMPLES)  # answer + rationale sequence each
    for s in sequences:
        assert s.ids[-1] == tokenizer.eos_token_id
        assert s.teacher_logprobs.shape == (len(s.ids) - s.start, 16)
        assert s.teacher_ids.dtype == torch.int32
    assert "Explain briefly" in tokenizer.decode(sequences[-1].ids)


def _value(model, items, config, pad) -> float:
    with torch.no_grad():
        return _loss(model, items, "kl", config, pad)[0].item()


def _grads(model, items, objective, pad) -> set[str]:
    loss, _ = _loss(model, items, objective, TrainConfig(), pad)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_lora_trains_only_adapters_and_full_all_but_embeddings(tiny, sequences) -> None:
    load, tokenizer = tiny
    lora = prepare(load(), TrainConfig(method="lora", lora_rank=4))
    touched = _grads(lora, sequences[:4], "kl", tokenizer.pad_token_id)
    assert touched and all("lora_" in name for name in touched)
    full = prepare(load(), TrainConfig(method="full"))
    touched = _grads(full, sequences[:4], "cot", tokenizer.pad_token_id)
    names = {n for n, _ in full.named_parameters()}
    assert touched == names - {"model.embed_tokens.weight"}


def test_training_lowers_the_loss_and_merges_lora(tiny, sequences) -> None:
    load, tokenizer = tiny
    pad = tokenizer.pad_token_id
    config = TrainConfig(method="lora", lora_rank=8, epochs=20, batch_size=8, lr=3e-2)
    before = _value(load(), sequences[:8], config, pad)
    model, report = train(load(), sequences[:8], "kl", config, pad, progress=False)
    after = _value(model, sequences[:8], config, pad)
    # a random tiny model's near-uniform outputs under frozen tied embeddings move slowly;
    # a wrong sign or a detached graph would leave it flat or rising
    assert report.steps == 20 and after < before - 0.02, (before, after)
    assert not hasattr(model, "peft_config") and type(model).__name__ == "LlamaForCausalLM"


def test_a_killed_run_resumes_to_the_same_weights(tiny, sequences, tmp_path, monkeypatch) -> None:
    load, tokenizer = tiny
    pad, items = tokenizer.pad_token_id, sequences[:8]
    config = TrainConfig(epochs=3, batch_size=4, checkpoint_every=2, seed=3)
    straight, _ = train(load(), items, "cot", config, pad, progress=False)

    original, calls = torch.optim.AdamW.step, []

    def crash_on_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(load(), items, "cot", config, pad, tmp_path, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed, report = train(load(), items, "cot", config, pad, tmp_path, progress=False)
    assert report.resumed_from == 4 and report.steps == 2
    pairs = zip(straight.named_parameters(), resumed.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, msg=name)
    assert not (tmp_path / "checkpoint.pt").exists()
    # a checkpoint from another run is not used
    other = replace(config, seed=4)
    assert train(load(), items, "cot", other, pad, tmp_path, progress=False)[1].resumed_from == 0


def test_teacher_cache_round_trips(tmp_path, tiny_model_dir, sequences) -> None:
    cache = TeacherCache(tmp_path)
    ids = tuple(e.id for e in EXAMPLES)
    key = CacheKey(str(tiny_model_dir), "t", "train", ids, content_hash(EXAMPLES), "cot",
                   "teacher", 16)  # fmt: skip
    assert cache.load(key) is None
    cache.save(key, sequences)
    loaded = cache.load(key)
    assert [s.ids for s in loaded] == [s.ids for s in sequences]
    torch.testing.assert_close(loaded[3].teacher_logprobs, sequences[3].teacher_logprobs)
    assert cache.path(replace(key, top_k=8)) != cache.path(key)
    changed = [replace(EXAMPLES[0], prompt="another prompt"), *EXAMPLES[1:]]
    assert cache.path(replace(key, content=content_hash(changed))) != cache.path(key)


def test_a_shared_prefix_runs_once_with_the_same_result(tiny, sequences) -> None:
    from models.distill.data import _hidden, pad_batch, shared_prefix, target_positions

    load, tokenizer = tiny
    model, items, pad = load(), sequences[:6], tokenizer.pad_token_id
    assert 8 <= shared_prefix(items) < min(s.start for s in items)
    ids, mask = pad_batch(items, pad)
    rows, cols = target_positions(items)
    plain = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
    shared = _hidden(model, items, pad)[rows, cols]
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    shared.sum().backward()  # gradients reach the weights through the shared keys/values
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
