"""The local backend's one contact with transformers' KV cache: a batch of sequences decoded
together over one shared, left-padded cache, which sequences join (after their prefill)
and leave (when they finish or are cancelled) between decode steps.

Only public transformers API is used (5.24+): `Cache(layers=...)` holding our own
`SlabLayer`s, built on the exported abstract `CacheLayerMixin`; `DynamicCache` and
`DynamicLayer` only to ask which layers a model needs; the `cache=` forward keyword.
Layout: row i of every layer holds sequence i's tokens right-aligned on the time axis;
`mask` marks the real (non-padding) columns and `positions` is the rotary position of
each row's next token, so padding never shifts a sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

# Spare cache columns allocated at a time: a decode step then writes its token in place,
# where DynamicLayer.update's torch.cat copies the whole cache (~9% of a batch-8 step).
_GROW = 64


class UnsupportedCache(RuntimeError):
    """The model needs a cache other than plain full attention (sliding window, linear
    attention, shared KV...), which this batch cannot manage."""


def check_model(model: Any) -> None:
    """Raise UnsupportedCache unless transformers would give every layer of `model` a plain
    full-attention DynamicLayer, the only kind SlabLayer stands in for."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise UnsupportedCache(
            f"the local backend batches full-attention caches only; this model's cache "
            f"has {sorted(kinds)} layers"
        )


class SlabLayer(CacheLayerMixin):
    """One layer's keys and values in a buffer with spare time columns; `keys` and `values`
    are views of its filled part, as transformers' readers of a cache layer expect."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self._used = 0
        if keys is not None and values is not None:
            self._fill(keys, values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._fill(key_states[:, :, :0], value_states[:, :, :0])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # the prefill: take its states with room to grow
            self._fill(key_states, value_states)
            return self.keys, self.values
        end = self._used + key_states.shape[2]
        if end > self._keys.shape[2]:
            self._keys = _with_room(self._keys[:, :, : self._used], end + _GROW)
            self._values = _with_room(self._values[:, :, : self._used], end + _GROW)
        self._keys[:, :, self._used : end] = key_states
        self._values[:, :, self._used : end] = value_states
        self._used = end
        self._expose()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._used + query_length, 0

    def get_seq_length(self) -> int:
        return self._used

    def get_max_length(self) -> int:
        return -1  # grows without bound, like DynamicLayer

    def _fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.device, self.dtype = keys.device, keys.dtype
        self._used = keys.shape[2]
        self._keys = _with_room(keys, self._used + _GROW)
        self._values = _with_room(values, self._used + _GROW)
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self._used]
        self.values = self._values[:, :, : self._used]


class KVBatch:
    """Sequences decoded together: their KV cache, padding mask and next positions."""

    def __init__(self, cache: Cache, mask: torch.Tensor, positions: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (batch, time) bool: True where a real token sits
        self.positions = positions  # (batch,) long: position id of each row's next token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def prefill(cls, model: Any, prompts: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
        """Run the prompts through the model together (left-padded); return the new batch
        and the logits of each prompt's last position, shape (n, vocab)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = True
        ids, mask = ids.to(model.device), mask.to(model.device)
        cache = Cache(layers=[SlabLayer() for _ in range(model.config.num_hidden_layers)])
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # Padding rows attend to nothing and may hold NaN; zero them so a masked-out
        # column can never poison a later step through 0 * NaN.
        pad = ~mask[:, None, :, None]
        for layer in cache.layers:
            layer.keys.masked_fill_(pad, 0.0)
            layer.values.masked_fill_(pad, 0.0)
        return cls(cache, mask, mask.sum(-1)), out.logits[:, -1, :]

    def decode(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: feed each row its next token (shape (batch,)); return the
        logits for the following one, shape (batch, vocab)."""
        ones = torch.ones((self.size, 1), dtype=torch.bool, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=tokens.to(self.mask.device)[:, None],
            attention_mask=mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.mask = mask
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and drop the padding columns nobody needs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        layers = [
            SlabLayer(
                layer.keys.index_select(0, index)[:, :, start:],
                layer.values.index_select(0, index)[:, :, start:],
            )
            for layer in self.cache.layers
        ]
        positions = self.positions.index_select(0, index)
        self.cache, self.mask, self.positions = Cache(layers=layers), mask[:, start:], positions

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever cache is shorter. Builds
        everything before changing anything, so a failure leaves this batch as it was."""
        width = max(self.length, other.length)
        layers = [
            SlabLayer(
                torch.cat([_pad_time(mine.keys, width), _pad_time(theirs.keys, width)]),
                torch.cat([_pad_time(mine.values, width), _pad_time(theirs.values, width)]),
            )
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        mask = torch.cat(
            [
                F.pad(self.mask, (width - self.length, 0)),
                F.pad(other.mask, (width - other.length, 0)),
            ]
        )
        positions = torch.cat([self.positions, other.positions])
        self.cache, self.mask, self.positions = Cache(layers=layers), mask, positions


def _with_room(states: torch.Tensor, capacity: int) -> torch.Tensor:
    """A (batch, heads, capacity, dim) buffer starting with `states`."""
    batch, heads, used, dim = states.shape
    buffer = states.new_empty((batch, heads, capacity, dim))
    buffer[:, :, :used] = states
    return buffer


def _pad_time(states: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad (batch, heads, time, dim) states with zeros to `width` time steps."""
    missing = width - states.shape[2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states
