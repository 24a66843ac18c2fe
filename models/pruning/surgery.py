"""State-dict surgery: build a fresh model of the same class from a smaller config and
fill it with the kept layers (renumbered 0..n-1) and the kept rows and columns.

Building anew, rather than slicing modules in place, leaves nothing stale behind (each
attention's layer_idx, head counts, num_key_value_groups): the result is exactly what
`from_pretrained` would build from the new config.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

# select(old_layer, parameter name inside the layer, tensor) -> kept part of the tensor
Select = Callable[[int, str, torch.Tensor], torch.Tensor]


def _keep_all(layer: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _layer_prefix(model: PreTrainedModel) -> str:
    return f"{model.base_model_prefix}.layers."


def smaller_config(
    config: PretrainedConfig, kept_layers: Sequence[int], **sizes
) -> PretrainedConfig:
    """A copy of `config` with only `kept_layers` (per-layer fields sliced) and new sizes."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept_layers)
    if getattr(new, "layer_types", None) is not None:
        new.layer_types = [config.layer_types[i] for i in kept_layers]
    for name, value in sizes.items():
        setattr(new, name, value)
    return new


def _new_state(
    model: PreTrainedModel, kept_layers: Sequence[int], select: Select
) -> dict[str, torch.Tensor]:
    prefix, renumber = _layer_prefix(model), {old: new for new, old in enumerate(kept_layers)}
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, name = key[len(prefix) :].split(".", 1)
        if int(index) in renumber:
            kept = select(int(index), name, tensor)
            state[f"{prefix}{renumber[int(index)]}.{name}"] = kept
    return state


def rebuild(
    model: PreTrainedModel,
    config: PretrainedConfig,
    kept_layers: Sequence[int],
    select: Select = _keep_all,
) -> PreTrainedModel:
    """A new model of `type(model)` for `config`, holding `kept_layers` of `model` (in
    their order, renumbered) with each layer tensor passed through `select`."""
    state = _new_state(model, kept_layers, select)
    parameter = next(model.parameters())
    with no_init_weights():  # every weight is overwritten below; skip the random init
        student = type(model)(config)
    student.load_state_dict(state, strict=True)
    student.tie_weights()  # no_init_weights skipped the tying that init_weights does
    student.to(device=parameter.device, dtype=parameter.dtype)
    student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)
    return student


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of q/k/v (column indices of o_proj) that belong to `heads`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device)).clone()


def width_select(
    kv_groups: Sequence[torch.Tensor],
    neurons: Sequence[torch.Tensor],
    group_size: int,
    head_dim: int,
) -> Select:
    """A `select` keeping, in each layer, the given KV groups (each KV head with its
    `group_size` query heads) and MLP neurons. Indices are per old layer, sorted."""

    def select(layer: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        groups = kv_groups[layer]
        queries = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
        module = name.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            return _take(tensor, 0, head_rows(queries, head_dim))
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            return _take(tensor, 0, head_rows(groups, head_dim))
        if name == "self_attn.o_proj.weight":
            return _take(tensor, 1, head_rows(queries, head_dim))
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            return _take(tensor, 0, neurons[layer])
        if name == "mlp.down_proj.weight":
            return _take(tensor, 1, neurons[layer])
        return tensor  # norms, o_proj and down_proj biases (output side, unchanged)

    return select
