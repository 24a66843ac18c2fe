"""The local backend's per-token decoding helpers on constructed logits: OpenAI's presence
and frequency penalties, logit_bias, its range check, and log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from models.backends.base import InvalidParams, SamplingParams
from models.backends.decoding import (
    LogitsAdjuster,
    TokenChooser,
    check_logit_bias,
    make_generator,
    token_logprob,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def texts(ids: list[int]) -> list[str]:
    return [f"t{i}" for i in ids]


def greedy(**params: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **params)  # type: ignore[arg-type]


def test_nothing_asked_means_no_adjuster() -> None:
    assert LogitsAdjuster.create(SamplingParams(), vocab_size=5) is None
    chooser = TokenChooser(greedy(), make_generator(0))
    assert chooser.choose(LOGITS) == 1
    assert chooser.take_logprobs() is None


def test_penalties_follow_openai_definition() -> None:
    adjuster = LogitsAdjuster.create(greedy(presence_penalty=0.5, frequency_penalty=0.25), 5)
    assert adjuster is not None
    for token in (1, 1, 1, 2):
        adjuster.observe(token)
    out = adjuster.apply(LOGITS)
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence
    expected = LOGITS - torch.tensor([0.0, 3 * 0.25 + 0.5, 0.25 + 0.5, 0.0, 0.0])
    assert torch.allclose(out, expected)
    assert torch.equal(LOGITS, torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0]))  # input untouched


def test_negative_penalties_encourage_repetition() -> None:
    adjuster = LogitsAdjuster.create(greedy(presence_penalty=-2.0), 5)
    assert adjuster is not None
    adjuster.observe(4)
    assert float(adjuster.apply(LOGITS)[4]) == pytest.approx(1.0)


def test_logit_bias_is_added_to_its_ids_only() -> None:
    adjuster = LogitsAdjuster.create(greedy(logit_bias=((1, -100.0), (3, 5.0))), 5)
    assert adjuster is not None
    out = adjuster.apply(LOGITS)
    assert out.tolist() == [1.0, -97.0, 2.0, 5.5, -1.0]
    assert adjuster.counts is None  # no penalties: nothing is counted


def test_chooser_bans_and_penalises() -> None:
    banned = TokenChooser(greedy(), make_generator(0))
    banned.adjuster = LogitsAdjuster.create(greedy(logit_bias=((1, -100.0),)), 5)
    assert banned.choose(LOGITS) == 2

    params = greedy(frequency_penalty=1.5)
    repeat = TokenChooser(params, make_generator(0), LogitsAdjuster.create(params, 5))
    # 1 wins (3.0), then pays 1.5 and loses to 2 (2.0), which then pays 1.5: 1 again.
    assert [repeat.choose(LOGITS) for _ in range(3)] == [1, 2, 1]


def test_logit_bias_outside_the_vocabulary_names_id_and_size() -> None:
    check_logit_bias(greedy(logit_bias=((0, 1.0), (4, -1.0))), vocab_size=5)
    for bad in (5, -1):
        with pytest.raises(InvalidParams) as info:
            check_logit_bias(greedy(logit_bias=((0, 1.0), (bad, 2.0))), vocab_size=5)
        assert info.value.param == "logit_bias"
        assert str(bad) in str(info.value) and "vocabulary size 5" in str(info.value)


def test_token_logprob_is_log_softmax_of_raw_logits() -> None:
    entry = token_logprob(LOGITS, 2, top=3, texts=texts)
    logp = torch.log_softmax(LOGITS, dim=-1)
    assert entry.token == "t2"
    assert entry.logprob == pytest.approx(float(logp[2]))
    assert [t for t, _ in entry.top] == ["t1", "t2", "t0"]
    assert [v for _, v in entry.top] == pytest.approx([float(logp[i]) for i in (1, 2, 0)])
    assert sum(math.exp(v) for v in logp.tolist()) == pytest.approx(1.0)
    assert token_logprob(LOGITS, 0, top=0, texts=texts).top == ()
    assert len(token_logprob(LOGITS, 0, top=20, texts=texts).top) == 5  # at most the vocab


def test_logprobs_ignore_penalties_and_temperature() -> None:
    params = SamplingParams(
        temperature=0.3, logprobs=True, top_logprobs=1, logit_bias=((1, -100.0),)
    )
    chooser = TokenChooser(params, make_generator(1), LogitsAdjuster.create(params, 5), texts)
    token = chooser.choose(LOGITS)
    assert token != 1
    (entry,) = chooser.take_logprobs() or ()
    logp = torch.log_softmax(LOGITS, dim=-1)
    assert entry.logprob == pytest.approx(float(logp[token]))
    assert entry.top == (("t1", pytest.approx(float(logp[1]))),)  # the model's favourite


def test_chooser_hands_out_pending_logprobs_once() -> None:
    chooser = TokenChooser(greedy(logprobs=True), make_generator(0), texts=texts)
    chooser.choose(LOGITS)
    chooser.choose(LOGITS)
    taken = chooser.take_logprobs()
    assert taken is not None and [e.token for e in taken] == ["t1", "t1"]
    assert all(e.top == () for e in taken)
    assert chooser.take_logprobs() == ()
