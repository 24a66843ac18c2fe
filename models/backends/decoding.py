"""Per-sequence decoding helpers for in-process backends: choosing one token from logits
(penalties, logit_bias, sampling, log-probabilities), turning a growing token list into
safe text deltas, and cutting text at stop strings.

Pure functions and small state holders with no threads and no model: the local backend's
worker calls them once per sequence per step. Modelled on TGI's `decode_token` and vLLM's
stop-string checker and logits processors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from models.backends.base import FinishReason, InvalidParams, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from models.backends.constrained import Constraint

# Below this a temperature is treated as 0: dividing logits by it would overflow.
_GREEDY_TEMPERATURE = 1e-5


def eos_token_ids(config: Any, generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a turn: the config's and generation config's EOS ids,
    the tokenizer's EOS token, and ChatML's `<|im_end|>` when the vocabulary has it."""
    ids: set[int] = set()
    for source in (config, generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when asked, otherwise from OS entropy, so
    a request never shares random state with the others in its batch."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a row of float32 CPU logits: greedy at temperature 0, otherwise
    temperature then nucleus (top_p) sampling with the request's own generator."""
    if params.temperature < _GREEDY_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidParams (param `logit_bias`) for a token id outside the vocabulary."""
    for token_id, _ in params.logit_bias:
        if not 0 <= token_id < vocab_size:
            raise InvalidParams(
                f"logit_bias names token id {token_id}, outside this model's vocabulary "
                f"(vocabulary size {vocab_size}: ids 0 to {vocab_size - 1})",
                param="logit_bias",
            )


@dataclass
class LogitsAdjuster:
    """OpenAI's presence and frequency penalties over the tokens one sequence has generated
    so far, and its logit_bias: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]."""

    presence: float
    frequency: float
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    counts: torch.Tensor | None  # (vocab,) float32 occurrences; None without penalties

    @classmethod
    def create(cls, params: SamplingParams, vocab_size: int) -> LogitsAdjuster | None:
        """The adjuster `params` ask for, or None when they ask for nothing (the common
        case, which then costs no tensor work at all)."""
        penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        if not penalised and not params.logit_bias:
            return None
        ids = [token_id for token_id, _ in params.logit_bias]
        values = [bias for _, bias in params.logit_bias]
        return cls(
            presence=params.presence_penalty,
            frequency=params.frequency_penalty,
            bias_ids=torch.tensor(ids, dtype=torch.long) if ids else None,
            bias_values=torch.tensor(values, dtype=torch.float32) if ids else None,
            counts=torch.zeros(vocab_size, dtype=torch.float32) if penalised else None,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted copy of a row of float32 logits (the input is left as it is)."""
        if self.counts is not None:
            seen = (self.counts > 0).to(logits.dtype)
            logits = logits - self.counts * self.frequency - seen * self.presence
        if self.bias_ids is not None and self.bias_values is not None:
            logits = logits.index_add(0, self.bias_ids, self.bias_values)
        return logits

    def observe(self, token_id: int) -> None:
        """Count a token the sequence has just generated."""
        if self.counts is not None:
            self.counts[token_id] += 1.0


def token_logprob(
    logits: torch.Tensor,
    token_id: int,
    top: int,
    texts: Callable[[list[int]], list[str]],
) -> TokenLogprob:
    """The chosen token's log-probability under the model's own distribution (the raw
    logits, before penalties and temperature, as OpenAI reports it) and the `top` most
    likely tokens at that position; `texts` turns token ids into their strings."""
    logp = torch.log_softmax(logits, dim=-1)
    alternatives: tuple[tuple[str, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        ranked = ids.tolist()
        alternatives = tuple(zip(texts(ranked), values.tolist(), strict=True))
    return TokenLogprob(texts([token_id])[0], float(logp[token_id]), alternatives)


def token_texts(tokenizer: Any) -> Callable[[list[int]], list[str]]:
    """Each id's own text, special tokens included (an EOS entry reads as itself)."""

    def texts(ids: list[int]) -> list[str]:
        return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    return texts


@dataclass
class TokenChooser:
    """Chooses one sequence's next tokens: adjust the logits, mask them to what a
    structured output's grammar allows (`constraint`), sample, and record each token's
    log-probabilities until the text they make is sent (`take_logprobs`)."""

    params: SamplingParams
    generator: torch.Generator
    adjuster: LogitsAdjuster | None = None
    texts: Callable[[list[int]], list[str]] | None = None  # set when logprobs are asked for
    pending: list[TokenLogprob] = field(default_factory=list)
    constraint: Constraint | None = None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token id from this sequence's row of float32 CPU logits."""
        adjusted = logits if self.adjuster is None else self.adjuster.apply(logits)
        if self.constraint is not None:  # last, so no bias can revive a masked token
            adjusted = self.constraint.apply(adjusted)
        token_id = sample_token(adjusted, self.params, self.generator)
        if self.adjuster is not None:
            self.adjuster.observe(token_id)
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if self.texts is not None:
            top = self.params.top_logprobs
            self.pending.append(token_logprob(logits, token_id, top, self.texts))
        return token_id

    def take_logprobs(self) -> tuple[TokenLogprob, ...] | None:
        """The entries of the tokens chosen since the last call; None when not asked for."""
        if self.texts is None:
            return None
        taken, self.pending = tuple(self.pending), []
        return taken


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in `text[start:]` (absolute), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper start of some stop string:
    that much must be held back because the next token may complete the stop."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


@dataclass
class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas, never splitting a UTF-8
    character: a byte-level token that ends mid-character yields nothing until the
    character is complete (TGI's prefix/read offsets)."""

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held (an incomplete character renders as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


@dataclass
class TextState:
    """The generated text of one sequence and how much of it has been sent, applying
    stop strings and max_tokens. `push` returns the delta that is safe to send now and
    the finish reason once the sequence is done."""

    detokenizer: IncrementalDetokenizer
    params: SamplingParams
    eos_ids: frozenset[int]
    text: str = ""
    sent: int = 0
    tokens: int = 0

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        self.tokens += 1
        if token_id in self.eos_ids:
            return self._finish(self.detokenizer.flush(), "stop")
        delta = self.detokenizer.push(token_id)
        if self.tokens >= self.params.max_tokens:
            return self._finish(delta + self.detokenizer.flush(), "length")
        return self._extend(delta)

    def _extend(self, delta: str) -> tuple[str, FinishReason | None]:
        stops = self.params.stop
        self.text += delta
        cut = find_stop(self.text, stops, self.sent) if stops else -1
        if cut >= 0:
            return self._cut(cut), "stop"
        safe = len(self.text) - partial_stop_length(self.text[self.sent :], stops)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out, None

    def _finish(self, delta: str, reason: FinishReason) -> tuple[str, FinishReason]:
        self.text += delta
        cut = find_stop(self.text, self.params.stop, self.sent) if self.params.stop else -1
        if cut >= 0:
            return self._cut(cut), "stop"
        out, self.sent = self.text[self.sent :], len(self.text)
        return out, reason

    def _cut(self, cut: int) -> str:
        self.text = self.text[:cut]
        out, self.sent = self.text[self.sent :], cut
        return out
