"""Structural pruning on tiny random Llamas (6 layers, 4 heads / 2 KV heads) with the real
tokenizer, plus one slow test on the real teacher.

Ratio tolerances: depth lands within half a layer's share of the target, width within
half a block of `mlp_multiple` neurons in every layer (the nearest achievable count)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.prune import (
    collect_activations,
    non_embedding_parameters,
    parse_schedule,
    prune,
    prune_schedule,
    save_pruned,
)
from models.pruning.params import layer_parameters
from models.pruning.surgery import smaller_config

TEXTS = [
    "Acme Corp beat analyst estimates for the third quarter and raised its guidance.",
    "The customer asked how to reset a password after the account was locked.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Hi",
]


def _config(tokenizer, **overrides) -> LlamaConfig:
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    sizes.update(overrides)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def _model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _counted(model) -> int:
    """Non-embedding parameters counted on the module itself, not from its config."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if "embed_tokens" not in n and "lm_head" not in n
    )


def _logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LlamaForCausalLM:
    return _model(_config(tokenizer))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "mlp_bias": True}, {"num_key_value_heads": 4, "head_dim": 32}],
)
def test_non_embedding_parameters_matches_the_module(tokenizer, overrides) -> None:
    config = _config(tokenizer, **overrides)
    assert non_embedding_parameters(config) == _counted(_model(config))


def test_per_layer_head_counts_are_counted_per_layer() -> None:
    # LlamaConfig itself only takes one count; other Llama-like configs vary it per layer
    config = SimpleNamespace(
        hidden_size=64,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=[4, 2],
        num_key_value_heads=[2, 1],
    )
    assert layer_parameters(config, 0) - layer_parameters(config, 1) == 64 * 16 * (2 * 2 + 2 * 1)
    assert non_embedding_parameters(config) == sum(layer_parameters(config, i) for i in (0, 1)) + 64


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan"), "0.5", True])
def test_ratio_outside_unit_interval_is_rejected(tiny, tokenizer, ratio) -> None:
    with pytest.raises(ValueError, match="ratio must be in"):
        prune(tiny, tokenizer, ratio, "depth", TEXTS)
    with pytest.raises(ValueError, match="ratio must be in"):
        prune_schedule(tiny, tokenizer, ratio, "width", TEXTS, "iterative:2")


def test_bad_method_schedule_calibration_and_unreachable_ratio(tiny, tokenizer) -> None:
    with pytest.raises(ValueError, match="method"):
        prune(tiny, tokenizer, 0.5, "diagonal", TEXTS)
    for bad in ("iterative:0", "iterative", "twice", "iterative:x"):
        with pytest.raises(ValueError, match="schedule"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="calibration"):
        prune(tiny, tokenizer, 0.5, "width", [])
    with pytest.raises(ValueError, match="not reachable by width"):
        prune(tiny, tokenizer, 0.02, "width", TEXTS)


@pytest.mark.parametrize("method", ["depth", "width"])
@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.5, 0.3])
def test_parameter_count_matches_the_target(tiny, tokenizer, method, ratio) -> None:
    student, report = prune(tiny, tokenizer, ratio, method, TEXTS)
    reference = non_embedding_parameters(tiny.config)
    if method == "depth":
        tolerance = layer_parameters(tiny.config, 0) / reference / 2
    else:
        tolerance = 6 * 3 * 64 * 8 / reference / 2  # 8 neurons in each of 6 layers
    assert _counted(student) == report.parameters
    assert report.achieved_ratio == pytest.approx(report.parameters / reference)
    assert abs(report.achieved_ratio - ratio) <= tolerance + 1e-9
    assert report.calibration_tokens > 0 and report.seconds > 0
    json.dumps(report.to_dict())  # fit for a registry manifest


@pytest.mark.parametrize("method", ["depth", "width"])
def test_pruned_model_saves_reloads_and_generates(tiny, tokenizer, tmp_path, method) -> None:
    student, report = prune(tiny, tokenizer, 0.5, method, TEXTS)
    save_pruned(student, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _counted(reloaded) == report.parameters
    saved = json.loads((tmp_path / "config.json").read_text())
    standard = set(LlamaConfig().to_dict()) | {"architectures", "dtype", "transformers_version"}
    assert set(saved) <= standard and saved["model_type"] == "llama"
    assert saved["head_dim"] == 16
    assert saved["num_attention_heads"] % saved["num_key_value_heads"] == 0
    ids = tokenizer("The market opened", return_tensors="pt")
    out = reloaded.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(student, tokenizer))
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


def _zero_neurons(model, keep: int, seed: int = 1) -> list[list[int]]:
    """Silence all but `keep` random neurons per layer (gate/up rows and down columns)."""
    generator, kept = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for layer in model.model.layers:
            order = torch.randperm(model.config.intermediate_size, generator=generator)
            dead, alive = order[keep:], order[:keep].sort().values
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
            kept.append(alive.tolist())
    return kept


def test_width_pruning_of_zeroed_neurons_keeps_the_logits(tokenizer) -> None:
    model = _model(_config(tokenizer))
    alive = _zero_neurons(model, keep=48)
    target = smaller_config(model.config, range(6), intermediate_size=48)
    ratio = non_embedding_parameters(target) / non_embedding_parameters(model.config)
    student, report = prune(model, tokenizer, ratio, "width", TEXTS)
    assert (report.intermediate_size, report.num_key_value_heads) == (48, 2)
    assert report.kept["neurons"] == alive
    torch.testing.assert_close(_logits(student, tokenizer), _logits(model, tokenizer))


def test_width_pruning_of_a_zeroed_kv_group_keeps_the_logits(tokenizer) -> None:
    model = _model(_config(tokenizer))
    dim, group_size, dead = 16, 2, [0, 1, 1, 0, 1, 0]
    with torch.no_grad():
        for layer, group in zip(model.model.layers, dead, strict=True):
            kv = slice(group * dim, (group + 1) * dim)
            queries = slice(group * group_size * dim, (group + 1) * group_size * dim)
            layer.self_attn.v_proj.weight[kv] = 0  # the group's heads output zero...
            layer.self_attn.o_proj.weight[:, queries] = 0  # ...and reach nothing
    target = smaller_config(model.config, range(6), num_attention_heads=2, num_key_value_heads=1)
    ratio = non_embedding_parameters(target) / non_embedding_parameters(model.config)
    # min_mlp_fraction=1 forbids touching the MLP, so the cut must come from attention
    student, report = prune(model, tokenizer, ratio, "width", TEXTS, min_mlp_fraction=1.0)
    assert (report.num_attention_heads, report.num_key_value_heads) == (2, 1)
    assert report.kept["kv_groups"] == [[1 - g] for g in dead]
    torch.testing.assert_close(_logits(student, tokenizer), _logits(model, tokenizer))


def _identity_layer(tokenizer, index: int) -> LlamaForCausalLM:
    model = _model(_config(tokenizer))
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def test_block_influence_ranks_an_identity_layer_least_important(tokenizer) -> None:
    model = _identity_layer(tokenizer, 3)
    acts = collect_activations(model, tokenizer, TEXTS)
    assert min(range(6), key=lambda i: acts.block_influence[i]) == 3
    assert acts.block_influence[3] == pytest.approx(0.0, abs=1e-5)
    assert len(acts.neuron_importance[0]) == 128 and len(acts.head_importance[0]) == 4


def test_depth_pruning_removes_the_identity_layer_and_renumbers(tokenizer, tmp_path) -> None:
    model = _identity_layer(tokenizer, 3)
    ratio = non_embedding_parameters(smaller_config(model.config, range(5))) / (
        non_embedding_parameters(model.config)
    )
    student, report = prune(model, tokenizer, ratio, "depth", TEXTS)
    assert report.removed_layers == [3] and report.kept["layers"] == [[0, 1, 2, 4, 5]]
    assert student.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(5))
    torch.testing.assert_close(_logits(student, tokenizer), _logits(model, tokenizer))
    ids = tokenizer("Shares of", return_tensors="pt")
    generated = [m.generate(**ids, max_new_tokens=6, do_sample=False) for m in (model, student)]
    assert torch.equal(*generated)  # the KV cache indexes the renumbered layers correctly
    save_pruned(student, tokenizer, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    indices = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    assert indices == set(range(5))


def test_layer_types_follow_the_kept_layers(tokenizer) -> None:
    config = _config(tokenizer)
    config.layer_types = [f"kind{i}" for i in range(6)]
    assert smaller_config(config, [0, 2, 5]).layer_types == ["kind0", "kind2", "kind5"]


def test_padding_does_not_change_the_importances(tiny, tokenizer) -> None:
    batched = collect_activations(tiny, tokenizer, TEXTS, batch_size=4)
    single = collect_activations(tiny, tokenizer, TEXTS, batch_size=1)
    assert batched.tokens == single.tokens
    assert batched.block_influence == pytest.approx(single.block_influence, rel=1e-4)
    for a, b in zip(batched.neuron_importance, single.neuron_importance, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(batched.head_importance, single.head_importance, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["depth", "width"])
def test_iterative_schedule_reaches_the_one_shot_target(tiny, tokenizer, method) -> None:
    calls = []

    def between_steps(model, step):
        calls.append((step, non_embedding_parameters(model.config)))
        return None

    ratio = 0.3
    student, reports = prune_schedule(
        tiny, tokenizer, ratio, method, TEXTS, "iterative:3", between_steps
    )
    _, one_shot = prune(tiny, tokenizer, ratio, method, TEXTS)
    assert [step for step, _ in calls] == [1, 2]  # k - 1 calls: between steps only
    assert [r.target_ratio for r in reports] == pytest.approx([ratio ** (s / 3) for s in (1, 2, 3)])
    reference = non_embedding_parameters(tiny.config)
    assert all(r.reference_parameters == reference for r in reports)
    step = layer_parameters(tiny.config, 0) if method == "depth" else 6 * 3 * 64 * 8
    assert abs(reports[-1].achieved_ratio - ratio) <= step / reference / 2 + 1e-9
    assert reports[-1].achieved_ratio == pytest.approx(one_shot.achieved_ratio)
    assert _counted(student) == reports[-1].parameters


def test_between_steps_may_return_a_replacement(tiny, tokenizer) -> None:
    replacements = []

    def distil(model, step):
        replacement = _model(model.config, seed=step)
        replacements.append(replacement)
        return replacement

    student, _ = prune_schedule(tiny, tokenizer, 0.5, "width", TEXTS, "iterative:2", distil)
    assert len(replacements) == 1
    assert student.config.intermediate_size < replacements[0].config.intermediate_size


@pytest.mark.slow
def test_real_teacher_depth_half(teacher_dir, tokenizer, tmp_path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student, report = prune(teacher, tokenizer, 0.5, "depth", TEXTS)
    assert report.num_hidden_layers == 15 and len(report.removed_layers) == 15
    assert math.isclose(report.achieved_ratio, 0.5, abs_tol=1 / 30 / 2)
    save_pruned(student, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _counted(reloaded) == report.parameters == non_embedding_parameters(reloaded.config)
    assert (
        _counted(teacher) == non_embedding_parameters(teacher.config) == report.reference_parameters
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = reloaded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
