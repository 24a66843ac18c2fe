"""Parameter counts of a Llama config, the unit in which compression ratios are measured:
r = student non-embedding parameters / teacher non-embedding parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig


def at_layer(value: Any, layer: int) -> Any:
    """A config size that is either one value for every layer or a per-layer sequence."""
    return value[layer] if isinstance(value, Sequence) and not isinstance(value, str) else value


def head_dim(config: PretrainedConfig) -> int:
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return config.hidden_size // int(at_layer(config.num_attention_heads, 0))


def kv_heads(config: PretrainedConfig, layer: int) -> int:
    value = getattr(config, "num_key_value_heads", None)
    return int(at_layer(value if value is not None else config.num_attention_heads, layer))


def layer_parameters(config: PretrainedConfig, layer: int) -> int:
    """Parameters of decoder layer `layer`: attention q/k/v/o, MLP gate/up/down, two norms."""
    hidden, dim = config.hidden_size, head_dim(config)
    heads = int(at_layer(config.num_attention_heads, layer))
    groups = kv_heads(config, layer)
    inner = int(at_layer(config.intermediate_size, layer))
    attention = hidden * dim * (2 * heads + 2 * groups)
    if getattr(config, "attention_bias", False):
        attention += dim * (heads + 2 * groups) + hidden
    mlp = 3 * hidden * inner
    if getattr(config, "mlp_bias", False):
        mlp += 2 * inner + hidden
    return attention + mlp + 2 * hidden


def non_embedding_parameters(config: PretrainedConfig) -> int:
    """Every parameter except embed_tokens and lm_head: the decoder layers and the final norm."""
    layers = sum(layer_parameters(config, i) for i in range(config.num_hidden_layers))
    return layers + config.hidden_size
