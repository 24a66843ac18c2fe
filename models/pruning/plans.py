"""Pure planning: from importances and a target parameter count, decide which layers,
KV groups and MLP neurons a pruned model keeps. No weights are touched here.

Targets are met as closely as the granularity allows, from above or below: depth picks the
number of layers whose count is nearest the target (ties keep the larger model); width
picks the MLP size nearest the target in steps of `mlp_multiple` neurons. A target that
cannot be met within one granularity step raises ValueError.

Width share rule (MLP first, as Minitron pruned MLP and embedding channels before heads):
with G KV groups kept, the MLP size k that meets the target is solved for exactly; the
plan keeps the most KV groups for which k is still at least `min_mlp_fraction` of the
reference's intermediate size. When no group count allows that, it keeps the fewest
groups that still reach the target (the largest MLP); so as r falls, the MLP shrinks to
its floor, then one KV group goes and the MLP grows back, and so on down to one group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from models.pruning.params import head_dim, kv_heads, layer_parameters, non_embedding_parameters
from models.pruning.surgery import smaller_config


@dataclass(frozen=True)
class WidthPlan:
    """Uniform sizes for every layer, and per layer the kept KV groups and neurons."""

    kv_groups: int
    intermediate_size: int
    kept_groups: list[torch.Tensor]
    kept_neurons: list[torch.Tensor]


def _check_reachable(method: str, target: float, achieved: float, step: float) -> None:
    if abs(achieved - target) > step + 1e-12:
        raise ValueError(
            f"ratio {target:.4g} is not reachable by {method} pruning of this model "
            f"(closest achievable: {achieved:.4g}, granularity {step:.4g})"
        )


def plan_depth(
    config: PretrainedConfig, reference: int, ratio: float, block_influence: Sequence[float]
) -> list[int]:
    """Indices of the layers to keep: drop lowest-Block-Influence layers first, stopping at
    the layer count whose non-embedding parameters are nearest `ratio * reference`."""
    layers = config.num_hidden_layers
    order = sorted(range(layers), key=lambda i: block_influence[i])  # stable on ties
    best, best_gap = list(range(layers)), math.inf
    for removed in range(layers):
        kept = sorted(set(range(layers)) - set(order[:removed]))
        achieved = non_embedding_parameters(smaller_config(config, kept)) / reference
        if abs(achieved - ratio) < best_gap:
            best, best_gap = kept, abs(achieved - ratio)
    step = max(layer_parameters(config, i) for i in range(layers)) / reference
    achieved = non_embedding_parameters(smaller_config(config, best)) / reference
    _check_reachable("depth", ratio, achieved, step)
    return best


def _width_config(config: PretrainedConfig, groups: int, inner: int) -> PretrainedConfig:
    group_size = config.num_attention_heads // kv_heads(config, 0)
    return smaller_config(
        config,
        range(config.num_hidden_layers),
        num_attention_heads=groups * group_size,
        num_key_value_heads=groups,
        intermediate_size=inner,
        head_dim=head_dim(config),
    )


def _mlp_size(config: PretrainedConfig, groups: int, target: float, multiple: int) -> int:
    """The MLP size (a multiple of `multiple`) nearest the target, with `groups` KV groups."""
    base = non_embedding_parameters(_width_config(config, groups, 0))
    slope = non_embedding_parameters(_width_config(config, groups, 1)) - base
    return round((target - base) / slope / multiple) * multiple


def width_sizes(
    config: PretrainedConfig,
    reference: PretrainedConfig,
    ratio: float,
    mlp_multiple: int,
    min_mlp_fraction: float,
) -> tuple[int, int]:
    """(KV groups, intermediate size) per the share rule in the module docstring."""
    groups, inner = kv_heads(config, 0), config.intermediate_size
    ref_params = non_embedding_parameters(reference)
    target = ratio * ref_params
    if _mlp_size(config, groups, target, mlp_multiple) >= inner:
        sizes = (groups, inner)  # no pruning needed
    else:
        floor = min(math.ceil(min_mlp_fraction * reference.intermediate_size), inner)
        options = [(g, _mlp_size(config, g, target, mlp_multiple)) for g in range(groups, 0, -1)]
        options = [(g, k) for g, k in options if mlp_multiple <= k <= inner]
        if not options:
            options = [(1, min(mlp_multiple, inner))]  # below reach: fails the check below
        roomy = [(g, k) for g, k in options if k >= floor]
        sizes = roomy[0] if roomy else options[-1]
    achieved = non_embedding_parameters(_width_config(config, *sizes)) / ref_params
    step = config.num_hidden_layers * 3 * config.hidden_size * mlp_multiple / ref_params
    _check_reachable("width", ratio, achieved, step)
    return sizes


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def plan_width(
    config: PretrainedConfig,
    groups: int,
    inner: int,
    neuron_importance: Sequence[torch.Tensor],
    head_importance: Sequence[torch.Tensor],
) -> WidthPlan:
    """Per layer, the `groups` KV groups with the largest summed head importance and the
    `inner` neurons with the largest activation importance (indices sorted)."""
    group_size = config.num_attention_heads // kv_heads(config, 0)
    group_scores = [h.reshape(-1, group_size).sum(dim=1) for h in head_importance]
    return WidthPlan(
        kv_groups=groups,
        intermediate_size=inner,
        kept_groups=[_top(s, groups) for s in group_scores],
        kept_neurons=[_top(n, inner) for n in neuron_importance],
    )


def width_config(config: PretrainedConfig, plan: WidthPlan) -> PretrainedConfig:
    """The plain Llama config of a width-pruned model (head_dim set explicitly)."""
    return _width_config(config, plan.kv_groups, plan.intermediate_size)
