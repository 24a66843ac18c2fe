"""The KV-cache adapter on a tiny random Llama: a shared left-padded batch whose rows join
and leave gives each sequence the logits it would get alone, through transformers'
public cache API without a single warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Cache, MistralConfig, MistralForCausalLM

from models.backends.kvcache import KVBatch, SlabLayer, UnsupportedCache, check_model

PROMPTS = [[5, 17, 300, 41], [900, 12], [7, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def alone(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one sequence run whole, with no cache and no padding."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]


def step(model, batch: KVBatch, seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """Append each row's greedy token to its sequence, decode one step, check every row."""
    for row, seq in enumerate(seqs):
        seq.append(int(logits[row].argmax()))
    with torch.inference_mode():
        logits = batch.decode(model, torch.tensor([s[-1] for s in seqs]))
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], alone(model, seq), atol=1e-4, rtol=1e-4)
    return logits


def test_rows_that_join_and_leave_get_their_own_logits(model) -> None:
    seqs = [list(p) for p in PROMPTS]
    with torch.inference_mode():
        batch, logits = KVBatch.prefill(model, seqs)
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row], alone(model, seq), atol=1e-4, rtol=1e-4)
    for _ in range(3):
        logits = step(model, batch, seqs, logits)

    batch.keep([2, 0])  # row 1 leaves; the order changes
    seqs, logits = [seqs[2], seqs[0]], logits[[2, 0]]
    logits = step(model, batch, seqs, logits)

    newcomer = [[42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]  # longer than the cache
    with torch.inference_mode():
        other, first = KVBatch.prefill(model, newcomer)
    batch.extend(other)
    seqs, logits = seqs + newcomer, torch.cat([logits, first])
    assert (batch.size, len(batch.cache.layers)) == (3, model.config.num_hidden_layers)
    for _ in range(2):
        logits = step(model, batch, seqs, logits)


def test_transformers_warns_about_nothing_we_call(model) -> None:
    # pyproject ignores FutureWarnings raised inside transformers (a deprecated keyword's
    # warning is one), so turn every warning into an error here, whatever its origin.
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")
        check_model(model)
        batch, logits = KVBatch.prefill(model, PROMPTS)
        logits = batch.decode(model, logits.argmax(-1))
        batch.keep([1, 2])
        other, _ = KVBatch.prefill(model, PROMPTS[:1])
        batch.extend(other)
        batch.decode(model, torch.tensor([1, 2, 3]))


def test_slab_layer_grows_past_its_spare_room() -> None:
    cache = Cache(layers=[SlabLayer()])
    first = torch.randn(2, 3, 5, 4)
    keys, _ = cache.update(first, first + 1, layer_idx=0)
    assert torch.equal(keys, first) and cache.get_seq_length() == 5
    steps = [torch.randn(2, 3, 1, 4) for _ in range(150)]  # past two rounds of spare room
    for s in steps:
        keys, values = cache.update(s, s + 1, layer_idx=0)
    expected = torch.cat([first, *steps], dim=2)
    assert torch.equal(keys, expected) and torch.equal(values, expected + 1)
    assert cache.get_seq_length() == 155
    assert cache.get_mask_sizes(query_length=1, layer_idx=0) == (156, 0)


def test_models_needing_other_caches_are_refused() -> None:
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    with pytest.raises(UnsupportedCache, match="full-attention"):
        check_model(MistralForCausalLM(config))


def test_full_attention_llama_is_accepted(model) -> None:
    check_model(model)
