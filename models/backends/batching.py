"""The running batch of the local backend: one shared, left-padded KV cache for every
sequence decoded together, which sequences can join (after their prefill) and leave
(when they finish or are cancelled) between decode steps.

Layout: row i of every layer's keys/values holds sequence i's tokens right-aligned in
the cache's time axis; `mask` marks the real (non-padding) columns and `positions` is
the rotary position of each row's next token, so padding never shifts a sequence.
Only full-attention caches (transformers' `DynamicLayer`) are supported; their layers are
swapped for `SlabLayer`s, which append a token in place instead of copying the cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Spare cache columns allocated at a time: a decode step then writes its token in place,
# where DynamicLayer.update's torch.cat copies the whole cache (~9% of a batch-8 step).
_GROW = 64


class BatchError(RuntimeError):
    """The model's cache is not a plain full-attention cache this batch can manage."""


class KVBatch:
    """Sequences decoded together: their KV cache, padding mask and next positions."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor):
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
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = True
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = cls(cache, mask, mask.sum(-1))
        batch._check_layers()
        # Padding rows attend to nothing and may hold NaN; zero them so a masked-out
        # column can never poison a later step through 0 * NaN.
        pad = ~mask[:, None, :, None]
        cache.layers = [
            SlabLayer(layer.keys.masked_fill(pad, 0.0), layer.values.masked_fill(pad, 0.0))
            for layer in cache.layers
        ]
        return batch, out.logits[:, -1, :]

    def decode(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: feed each row its next token (shape (batch,)); return the
        logits for the following one, shape (batch, vocab)."""
        ones = torch.ones((self.size, 1), dtype=torch.bool, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=tokens.to(self.mask.device)[:, None],
            attention_mask=mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
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
        self.cache.layers = [
            SlabLayer(
                layer.keys.index_select(0, index)[:, :, start:],
                layer.values.index_select(0, index)[:, :, start:],
            )
            for layer in self.cache.layers
        ]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever cache is shorter."""
        width = max(self.length, other.length)
        self.cache.layers = [
            SlabLayer(
                torch.cat([_pad_time(mine.keys, width), _pad_time(theirs.keys, width)]),
                torch.cat([_pad_time(mine.values, width), _pad_time(theirs.values, width)]),
            )
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        self.mask = torch.cat(
            [
                F.pad(self.mask, (width - self.length, 0)),
                F.pad(other.mask, (width - other.length, 0)),
            ]
        )
        self.positions = torch.cat([self.positions, other.positions])

    def _check_layers(self) -> None:
        for layer in self.cache.layers:
            if type(layer) not in (DynamicLayer, SlabLayer):
                name = type(layer).__name__
                raise BatchError(f"the local backend batches full-attention caches, not {name}")


class SlabLayer(DynamicLayer):
    """A full-attention cache layer kept in a buffer with spare time columns; `keys` and
    `values` are views of its filled part, so every reader of DynamicLayer still works."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._used = keys.shape[2]
        self._keys = _with_room(keys, self._used + _GROW)
        self._values = _with_room(values, self._used + _GROW)
        self._expose()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._used + key_states.shape[2]
        if end > self._keys.shape[2]:
            self._keys = _with_room(self._keys[:, :, : self._used], end + _GROW)
            self._values = _with_room(self._values[:, :, : self._used], end + _GROW)
        self._keys[:, :, self._used : end] = key_states
        self._values[:, :, self._used : end] = value_states
        self._used = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self._used]
        self.values = self._values[:, :, : self._used]


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
