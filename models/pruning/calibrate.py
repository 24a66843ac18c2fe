"""Calibration: one forward pass over some texts, with hooks, gathering everything the
pruning importances need, averaged over non-padding tokens.

- Block Influence of each decoder layer (ShortGPT; Minitron): BI_i = 1 - mean cos(x_i, x_{i+1}),
  x_i the hidden state entering layer i and x_{i+1} the one leaving it;
- MLP neuron importance (Minitron): mean |a_j| of the input to down_proj;
- attention head importance (Minitron): mean L2 norm of each head's output before o_proj.

Cosines are accumulated on the fly, so no hidden states are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Activations:
    """Per-layer importances measured on calibration text (index = decoder layer)."""

    block_influence: list[float]
    neuron_importance: list[torch.Tensor]  # (intermediate_size,) per layer
    head_importance: list[torch.Tensor]  # (num_attention_heads,) per layer
    tokens: int


@dataclass
class _Sums:
    """Running sums filled by the hooks; `mask` is the current batch's (B, T) token mask."""

    layers: int
    mask: torch.Tensor | None = None
    cosine: list[float] = field(default_factory=list)
    neurons: list[torch.Tensor | None] = field(default_factory=list)
    heads: list[torch.Tensor | None] = field(default_factory=list)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cosine = [0.0] * self.layers
        self.neurons = [None] * self.layers
        self.heads = [None] * self.layers


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over batch and time of (B, T, ...) values where mask (B, T) is 1."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * weights).sum(dim=(0, 1))


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _install(layers: nn.ModuleList, sums: _Sums, head_dim: int) -> list:
    """Hooks on every layer boundary, down_proj input and o_proj input."""
    handles = []
    for i, layer in enumerate(layers):

        def layer_in(module, args, kwargs, i=i):
            sums.inputs[i] = _hidden(args, kwargs)

        def layer_out(module, args, kwargs, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(sums.inputs.pop(i).float(), out.float(), dim=-1)
            sums.cosine[i] += float(_masked_sum(cos, sums.mask))

        def down_in(module, args, i=i):
            sums.neurons[i] = _add(sums.neurons[i], _masked_sum(args[0].float().abs(), sums.mask))

        def o_in(module, args, i=i):
            x = args[0].float()
            norms = x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1)
            sums.heads[i] = _add(sums.heads[i], _masked_sum(norms, sums.mask))

        handles.append(layer.register_forward_pre_hook(layer_in, with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_out, with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_in))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_in))
    return handles


def _batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int, batch_size: int
):
    """Tokenised batches (input_ids, attention_mask), each text truncated to max_tokens."""
    if tokenizer.pad_token is None:
        batch_size = 1  # nothing to pad with: one text at a time needs no padding
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=batch_size > 1,
            truncation=True,
            max_length=max_tokens,
        )
        yield enc["input_ids"], enc["attention_mask"]


def collect_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_tokens: int = 256,
    *,
    batch_size: int = 8,
) -> Activations:
    """Run `texts` (each truncated to `max_tokens` tokens) through a Llama-style model and
    return its per-layer importances, averaged over the non-padding tokens."""
    if not texts:
        raise ValueError("calibration needs at least one text, got an empty list")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    layers = model.get_decoder().layers
    sums = _Sums(len(layers))
    handles = _install(layers, sums, layers[0].self_attn.head_dim)
    was_training, tokens = model.training, 0
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids, mask in _batches(tokenizer, texts, max_tokens, batch_size):
                sums.mask = mask.to(device)
                model(input_ids=ids.to(device), attention_mask=sums.mask, use_cache=False)
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("calibration texts produced no tokens")
    return Activations(
        block_influence=[1.0 - c / tokens for c in sums.cosine],
        neuron_importance=[n.cpu() / tokens for n in sums.neurons],
        head_importance=[h.cpu() / tokens for h in sums.heads],
        tokens=tokens,
    )
