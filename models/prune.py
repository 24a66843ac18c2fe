"""Structural pruning of a Llama teacher into a student at a target compression ratio
r = student non-embedding parameters / reference non-embedding parameters.

- depth: drop whole decoder layers with the lowest Block Influence (ShortGPT; Minitron);
- width: drop MLP neurons and whole KV groups (a KV head with its query heads, so GQA
  stays intact) with the lowest activation importance (Minitron), the same count in every
  layer; the share rule between MLP and attention is in `models.pruning.plans`.

The result is an ordinary `LlamaForCausalLM` (layers renumbered, config sizes updated,
head_dim explicit, only standard fields) that transformers and vLLM load unchanged.
Schedules: one-shot, or "iterative:k" (k steps of ratio r^(1/k) each, relative to the
original model, with a callback between steps where the caller distils).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from models.pruning.calibrate import Activations, collect_activations
from models.pruning.params import head_dim, kv_heads, non_embedding_parameters
from models.pruning.plans import plan_depth, plan_width, width_config, width_sizes
from models.pruning.surgery import rebuild, smaller_config, width_select

__all__ = [
    "Activations",
    "PruneReport",
    "collect_activations",
    "non_embedding_parameters",
    "parse_schedule",
    "prune",
    "prune_schedule",
    "save_pruned",
]

Method = Literal["depth", "width"]
BetweenSteps = Callable[[PreTrainedModel, int], PreTrainedModel | None]


@dataclass(frozen=True)
class PruneReport:
    """What one pruning step did. Ratios are relative to the reference model's
    non-embedding parameters; layer indices are those of the model that was pruned."""

    method: str
    target_ratio: float
    achieved_ratio: float
    reference_parameters: int
    parameters: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    removed_layers: list[int] = field(default_factory=list)
    kept: dict[str, list[list[int]]] = field(default_factory=dict)
    importances: dict[str, list[Any]] = field(default_factory=dict)
    calibration_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_ratio(ratio: float) -> None:
    number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
    if not number or math.isnan(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")


def _check_method(method: str) -> None:
    if method not in ("depth", "width"):
        raise ValueError(f"method must be 'depth' or 'width', got {method!r}")


def _report(
    method: str, ratio: float, reference: int, student: PreTrainedModel, **details: Any
) -> PruneReport:
    config = student.config
    params = non_embedding_parameters(config)
    return PruneReport(
        method=method,
        target_ratio=ratio,
        achieved_ratio=params / reference,
        reference_parameters=reference,
        parameters=params,
        num_hidden_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=kv_heads(config, 0),
        **details,
    )


def _prune_depth(
    model: PreTrainedModel, ratio: float, reference: int, acts: Activations
) -> tuple[PreTrainedModel, dict[str, Any]]:
    kept = plan_depth(model.config, reference, ratio, acts.block_influence)
    student = rebuild(model, smaller_config(model.config, kept), kept)
    removed = sorted(set(range(model.config.num_hidden_layers)) - set(kept))
    return student, {
        "removed_layers": removed,
        "kept": {"layers": [kept]},
        "importances": {"block_influence": list(acts.block_influence)},
    }


def _prune_width(
    model: PreTrainedModel,
    ratio: float,
    reference: PretrainedConfig,
    acts: Activations,
    options: dict[str, Any],
) -> tuple[PreTrainedModel, dict[str, Any]]:
    config = model.config
    groups, inner = width_sizes(config, reference, ratio, **options)
    plan = plan_width(config, groups, inner, acts.neuron_importance, acts.head_importance)
    group_size = config.num_attention_heads // kv_heads(config, 0)
    select = width_select(plan.kept_groups, plan.kept_neurons, group_size, head_dim(config))
    student = rebuild(model, width_config(config, plan), range(config.num_hidden_layers), select)
    group_scores = [h.reshape(-1, group_size).sum(dim=1).tolist() for h in acts.head_importance]
    return student, {
        "kept": {
            "kv_groups": [g.tolist() for g in plan.kept_groups],
            "neurons": [n.tolist() for n in plan.kept_neurons],
        },
        "importances": {
            "block_influence": list(acts.block_influence),
            "kv_groups": group_scores,
            "neuron_mass_kept": [
                float(n[k].sum() / n.sum())
                for n, k in zip(acts.neuron_importance, plan.kept_neurons, strict=True)
            ],
        },
    }


def prune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ratio: float,
    method: Method,
    calibration: list[str],
    *,
    reference: PretrainedConfig | None = None,
    max_tokens: int = 256,
    mlp_multiple: int = 8,
    min_mlp_fraction: float = 0.25,
) -> tuple[PreTrainedModel, PruneReport]:
    """Prune `model` to `ratio` of `reference`'s non-embedding parameters (default: the
    model's own config), ranking structures on `calibration` texts. Returns a new model;
    the input is left unchanged.

    Depth keeps the layer count nearest the target, width the MLP size nearest it in steps
    of `mlp_multiple` neurons (either may land above or below); a target that no layer or
    neuron-block count reaches within one step raises ValueError, as does a ratio outside
    (0, 1]. `min_mlp_fraction` is the width share rule's MLP floor (see plans.py).
    """
    _check_ratio(ratio)
    _check_method(method)
    if mlp_multiple < 1 or not 0 <= min_mlp_fraction <= 1:
        raise ValueError(
            f"need mlp_multiple >= 1 and min_mlp_fraction in [0, 1], "
            f"got {mlp_multiple} and {min_mlp_fraction}"
        )
    started = time.perf_counter()
    reference = reference or model.config
    reference_params = non_embedding_parameters(reference)
    acts = collect_activations(model, tokenizer, calibration, max_tokens)
    if method == "depth":
        student, details = _prune_depth(model, ratio, reference_params, acts)
    else:
        options = {"mlp_multiple": mlp_multiple, "min_mlp_fraction": min_mlp_fraction}
        student, details = _prune_width(model, ratio, reference, acts, options)
    seconds = time.perf_counter() - started
    report = _report(
        method,
        ratio,
        reference_params,
        student,
        calibration_tokens=acts.tokens,
        seconds=seconds,
        **details,
    )
    return student, report


def parse_schedule(schedule: str) -> int:
    """Number of steps of "one-shot" (1) or "iterative:k" (k >= 1)."""
    if schedule == "one-shot":
        return 1
    kind, _, steps = schedule.partition(":")
    if kind == "iterative" and steps.isdigit() and int(steps) >= 1:
        return int(steps)
    raise ValueError(f"schedule must be 'one-shot' or 'iterative:k' with k >= 1, got {schedule!r}")


def _no_op(model: PreTrainedModel, step: int) -> None:
    return None


def prune_schedule(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ratio: float,
    method: Method,
    calibration: list[str],
    schedule: str = "one-shot",
    between_steps: BetweenSteps = _no_op,
    **options: Any,
) -> tuple[PreTrainedModel, list[PruneReport]]:
    """Prune in k steps to ratios r^(s/k) of the original model (s = 1..k), recalibrating
    on the current model at every step. `between_steps(model, s)` runs after every step
    but the last (k - 1 calls: the final distillation is the caller's); it may train the
    model in place (return None) or return a replacement. `options` go to `prune`."""
    _check_ratio(ratio)
    _check_method(method)
    steps = parse_schedule(schedule)
    reference = model.config
    reports = []
    for step in range(1, steps + 1):
        model, report = prune(
            model,
            tokenizer,
            ratio ** (step / steps),
            method,
            calibration,
            reference=reference,
            **options,
        )
        reports.append(report)
        if step < steps:
            model = between_steps(model, step) or model
    return model, reports


def save_pruned(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """Write `model` and its tokenizer (chat template included) as a plain HF directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
