"""ACIPModel on tiny Llama / Qwen2 / Mistral models: pruning, compression, quantization, saving, loading, peft."""

import copy
import json
import math
import re
import warnings

import pytest
import torch
from conftest import original_prune, tiny_acip_model, tiny_base_model, tiny_tokenizer, token_ids
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, pipeline

from acip import ACIPModel, AlignedLowRankLinear, LowRankLinear, SVDLinear
from acip.hub.modeling_acip import find_target_modules


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def kept_sets(model):
    return {name: layer.kept.clone() for name, layer in model.acip_layers().items()}


def masks(model):
    return {name: layer.mask.detach().clone() for name, layer in model.acip_layers().items()}


def state(model):
    """A copy of every tensor of the model's state dict, and the module objects by name."""
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())


def assert_unchanged(model, before):
    """The same modules (the very objects) holding the same tensors (bit for bit, NaN included)."""
    tensors, modules = before
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    assert list(after) == list(tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)


def folder_files(folder):
    """Every file of a folder with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------------
# Exactness, revertibility, nestedness, target accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_ratio_one_reproduces_the_base_model(kind):
    base = tiny_base_model(kind)
    expected = logits(base)
    model = tiny_acip_model(kind)
    assert all(isinstance(layer, SVDLinear) for layer in model.acip_layers().values())
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    model.prune_model_by_score(0.5)
    assert (logits(model) - expected).abs().max() > 1e-3  # pruning really changed something
    model.prune_model_by_score(1.0)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    assert model.get_size_ratio() == 1.0


def test_targets_every_linear_layer_but_the_head(kind):
    model = tiny_acip_model(kind)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(model.config.target_modules) == 7 * n_layers
    assert "lm_head" not in " ".join(model.config.target_modules)


def test_pruning_is_nested(kind):
    model = tiny_acip_model(kind)
    sets = [kept_sets(model.prune_model_by_score(r)) for r in (0.4, 0.6, 0.8)]
    for smaller, larger in zip(sets, sets[1:]):
        for name in smaller:
            assert not (smaller[name] & ~larger[name]).any(), name
        assert sum(int(s.sum()) for s in smaller.values()) < sum(int(s.sum()) for s in larger.values())


@pytest.mark.parametrize("full", [False, True])
def test_pruning_hits_the_target_from_above(kind, full):
    model = tiny_acip_model(kind)
    widths = [layer.in_features + layer.out_features for layer in model.acip_layers().values()]
    total = model.get_num_params(full=full)  # unpruned: the original size
    for ratio in (0.35, 0.5, 0.65, 0.8, 0.95):
        achieved = model.prune_model_by_score(ratio, full=full).get_size_ratio(full=full)
        assert achieved >= ratio
        assert (achieved - ratio) * total < max(widths)  # within one rank of the target


def test_size_ratio_alias_and_return_value(kind):
    model = tiny_acip_model(kind)
    assert model.prune_model_by_score(size_ratio=0.6) is model
    by_alias = kept_sets(model)
    model.prune_model_by_score(compression_ratio=0.6, size_ratio=0.6)
    assert all(torch.equal(by_alias[n], s) for n, s in kept_sets(model).items())


def test_untrained_scores_truncate_every_layer_alike():
    model = tiny_acip_model("llama", random_scores=False)
    model.prune_model_by_score(0.5)
    fractions = [float(layer.kept.float().mean()) for layer in model.acip_layers().values()]
    assert max(fractions) - min(fractions) < 0.15


def test_score_map_assignment_is_checked_before_writing():
    model = tiny_acip_model("llama")
    before = {n: s.clone() for n, s in model.score_map.items()}
    name = next(iter(before))
    good = torch.zeros_like(before[name])
    with pytest.raises(ValueError, match="shape"):
        model.score_map = {name: good, list(before)[1]: torch.zeros(3)}
    with pytest.raises(KeyError):
        model.score_map = {name: good, "no.such.layer": good}
    with pytest.raises(ValueError, match="NaN"):
        model.score_map = {name: torch.full_like(good, math.nan)}
    assert all(torch.equal(before[n], s) for n, s in model.score_map.items())
    model.score_map = {name: good}
    assert torch.equal(model.score_map[name], good)


# ---------------------------------------------------------------------------------------------------------------------
# Compress, save, load
# ---------------------------------------------------------------------------------------------------------------------


def test_compress_matches_pruned_model_and_reloads_at_compressed_size(kind, rank_cost, tmp_path):
    model = tiny_acip_model(kind, rank_cost=rank_cost)
    model.prune_model_by_score(0.5)
    pruned = logits(model)
    predicted = model.get_num_params(full=True)
    ratio = model.get_size_ratio()
    assert model.compress() is model
    torch.testing.assert_close(logits(model), pruned, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == predicted
    assert model.get_size_ratio() == pytest.approx(ratio)
    assert not any(isinstance(m, SVDLinear) for m in model.modules())

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["compressed"] is True and config["rank_cost"] == rank_cost
    assert set(config["layer_ranks"]) | set(config["dense_modules"]) == set(config["target_modules"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == predicted
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)


def test_aligned_form_computes_what_the_plain_factors_compute(kind):
    # One pruning state, compressed in each form: the aligned pair is the plain pair in another gauge.
    model = tiny_acip_model(kind).prune_model_by_score(0.5)
    pruned = logits(model)
    aligned = copy.deepcopy(model).compress()
    plain = copy.deepcopy(model)
    plain.config.rank_cost = "factors"
    plain.compress()
    assert any(type(m) is AlignedLowRankLinear for m in aligned.acip_layers().values())
    assert not any(type(m) is AlignedLowRankLinear for m in plain.acip_layers().values())
    torch.testing.assert_close(logits(aligned), logits(plain), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(aligned), pruned, atol=1e-4, rtol=0)
    assert aligned.get_num_params() < plain.get_num_params()


def test_the_cost_rule_decides_what_a_ratio_keeps():
    aligned, factors = tiny_acip_model("llama"), tiny_acip_model("llama", rank_cost="factors")
    kept = {}
    for model in (aligned, factors):
        model.prune_model_by_score(0.6)
        kept[model.config.rank_cost] = sum(int(m.kept.sum()) for m in model.acip_layers().values())
        assert model.get_size_ratio() == pytest.approx(0.6, abs=0.02)
    assert kept["aligned"] > kept["factors"]
    with pytest.raises(ValueError, match="rank_cost must be one of"):
        ACIPModel.config_class(rank_cost="dense")
    with pytest.raises(ValueError, match="rank_cost must be one of"):
        ACIPModel.from_base_model(tiny_base_model("llama"), rank_cost="r*(in+out)")


def test_compressed_folder_is_smaller_on_disk(tmp_path):
    model = tiny_acip_model("qwen2")
    model.save_pretrained(tmp_path / "full")
    model.prune_model_by_score(0.4).compress().save_pretrained(tmp_path / "small")
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    small = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert small < 0.75 * full


def test_full_model_round_trip_keeps_scores_and_prunes_alike(tmp_path):
    model = tiny_acip_model("mistral")
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, ACIPModel)
    for name, score in model.score_map.items():
        assert torch.equal(reloaded.score_map[name], score)
    for ratio in (0.45, 0.7):
        torch.testing.assert_close(
            logits(reloaded.prune_model_by_score(ratio)), logits(model.prune_model_by_score(ratio)), atol=0, rtol=0
        )


def test_save_writes_the_hub_files_and_auto_map(tmp_path):
    tiny_acip_model("llama").save_pretrained(tmp_path)
    hub_files = ("configuration_acip.py", "modeling_acip.py", "parametrization.py", "pruning.py", "fusing.py")
    for name in (*hub_files, "config.json", "model.safetensors"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_acip.ACIPConfig",
        "AutoModel": "modeling_acip.ACIPModel",
        "AutoModelForCausalLM": "modeling_acip.ACIPModel",
    }
    assert config["model_type"] == "acip" and config["text_config"]["model_type"] == "llama"


def test_bf16_load_keeps_masks_and_scores_float32(tmp_path):
    model = tiny_acip_model("llama")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = next(iter(reloaded.acip_layers().values()))
    assert layer.sv.weight.dtype == torch.bfloat16
    assert layer.mask.dtype == layer.score.dtype == torch.float32
    assert torch.equal(layer.score, next(iter(model.acip_layers().values())).score)


def test_text_generation_pipeline():
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model = tiny_acip_model("llama").prune_model_by_score(0.6)
    with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
        generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    assert "is not supported" not in captured.out  # no error listing every supported class
    out = generator("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w6 w7")
    assert generator("w5 w6 w7", max_new_tokens=4, do_sample=False) == out


def test_rank_multiple_rounds_every_kept_rank(kind):
    model = tiny_acip_model(kind)
    model.prune_model_by_score(0.5, rank_multiple=8)
    assert model.get_size_ratio() >= 0.5
    for layer in model.acip_layers().values():
        kept = int(layer.kept.sum())
        assert kept % 8 == 0 or kept == layer.kept.numel()
    model.compress()
    ranks = model.config.layer_ranks.values()
    assert all(rank % 8 == 0 for rank in ranks) and ranks


def test_generate_matches_the_base_model():
    base = tiny_base_model("llama")
    ids = token_ids(1, 6)
    expected = base.generate(ids, max_new_tokens=6, do_sample=False)
    model = tiny_acip_model("llama")
    with warnings.catch_warnings():
        # the KV cache passes through under this transformers version's name (past_key_values, or cache from 5.25):
        # no deprecation warning on every step
        warnings.filterwarnings("error", message=".*(past_key_values|cache).*", category=FutureWarning)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        model(ids, labels=ids)
    torch.testing.assert_close(out, expected)


def test_sdpa_attention_is_accepted(tmp_path):
    tiny_acip_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert model.model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# Quantization (bitsandbytes, CPU here)
# ---------------------------------------------------------------------------------------------------------------------


def _weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_compressed_model(quant_type, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_acip_model("llama").prune_model_by_score(0.6).compress()
    reference, size = logits(model), _weight_bytes(model)
    assert model.quantize(quant_type=quant_type) is model
    quantized = logits(model)
    error = float((quantized - reference).norm() / reference.norm())
    print(f"\n{quant_type} relative logit error: {error:.4f}")
    assert error < 0.2
    assert _weight_bytes(model) < 0.6 * size
    # balanced plain factors (a gauge-aligned pair does not survive 4-bit rounding) hold more logical parameters
    assert model.config.balanced_factors and 0.6 <= model.get_size_ratio() < 0.8
    layer = model.acip_layers()["model.layers.0.self_attn.q_proj"]
    assert type(layer.sv).__name__ == "Linear4bit" and not layer.sv.support_avx512bf16_for_cpu

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), quantized, atol=1e-5, rtol=0)
    assert all(
        not m.support_avx512bf16_for_cpu for m in reloaded.modules() if type(m).__name__ == "Linear4bit"
    )


def test_quantized_prunable_model_still_prunes():
    pytest.importorskip("bitsandbytes")
    model = tiny_acip_model("llama").quantize()
    at_full = logits(model)
    model.prune_model_by_score(0.5)
    assert (logits(model) - at_full).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="quantiz"):
        model.compress()


def test_quantize_errors_leave_the_model_alone(monkeypatch):
    pytest.importorskip("bitsandbytes")
    model = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    with pytest.raises(ValueError, match="quant_type"):
        model.quantize(quant_type="int3")
    assert getattr(model.config, "quantization_config", None) is None
    model.quantize()
    with pytest.raises(RuntimeError, match="already quantized"):
        model.quantize()
    import acip.hub.parametrization as parametrization

    monkeypatch.setattr(parametrization, "bnb", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        tiny_acip_model("llama").quantize()


# ---------------------------------------------------------------------------------------------------------------------
# peft on the compressed model
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_on_compressed_model_trains_and_merges():
    from peft import LoraConfig, get_peft_model

    model = tiny_acip_model("qwen2").prune_model_by_score(0.5).compress()
    ids = token_ids(4, 16)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    names = [n for n, _ in peft_model.named_modules() if n.endswith("q_proj.sv.lora_A")]
    assert names, "peft all-linear should reach the factor layers"
    before = logits(peft_model, ids)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    peft_model.eval()
    trained = logits(peft_model, ids)
    assert (trained - before).abs().max() > 1e-4
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, ACIPModel)
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear exception, and the model as it was
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"compression_ratio": -0.1}, ValueError, r"\[0, 1\]"),
        ({"compression_ratio": 1.5}, ValueError, r"\[0, 1\]"),
        ({"compression_ratio": math.nan}, ValueError, r"\[0, 1\]"),
        ({"compression_ratio": "0.5"}, TypeError, "number"),
        ({"compression_ratio": True}, TypeError, "number"),
        ({"size_ratio": -1}, ValueError, "size_ratio"),
        ({"compression_ratio": 0.5, "size_ratio": 0.4}, ValueError, "disagree"),
        ({}, TypeError, "compression_ratio"),
        ({"compression_ratio": 0.01, "full": True}, ValueError, "full=True"),
    ],
)
def test_bad_ratios_raise_and_change_nothing(kwargs, error, match):
    model = tiny_acip_model("llama").prune_model_by_score(0.7)
    before = masks(model)
    with pytest.raises(error, match=match):
        model.prune_model_by_score(**kwargs)
    assert all(torch.equal(before[n], m) for n, m in masks(model).items())


def test_prune_and_compress_after_compress_raise():
    model = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    before = logits(model)
    with pytest.raises(RuntimeError, match="compressed"):
        model.prune_model_by_score(0.7)
    with pytest.raises(RuntimeError, match="compressed"):
        model.compress()
    with pytest.raises(RuntimeError, match="compressed"):
        model.score_map
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_compress_refuses_unmerged_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_acip_model("llama")
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(RuntimeError, match="merge"):
        model.compress()
    assert all(isinstance(layer, SVDLinear) for layer in model.acip_layers().values())


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_checkpoint_disagreeing_with_config_ranks_is_an_error(tmp_path):
    model = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    model.save_pretrained(tmp_path)
    name = next(iter(model.config.layer_ranks))

    def bump(config):
        config["layer_ranks"][name] += 1

    _edit_config(tmp_path, bump)
    with pytest.raises(ValueError, match="do not match the shapes config.json gives"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_checkpoint_missing_a_tensor_is_an_error(tmp_path):
    model = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    model.save_pretrained(tmp_path)
    name = next(iter(model.config.layer_ranks))

    def as_dense(config):  # the config now promises a dense weight the checkpoint does not hold
        del config["layer_ranks"][name]
        config["dense_modules"].append(name)

    _edit_config(tmp_path, as_dense)
    with pytest.raises(ValueError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_target_module_selection():
    base = tiny_base_model("llama")
    assert find_target_modules(base, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert len(find_target_modules(base, r".*\.mlp\..*")) == 6
    assert len(find_target_modules(base, exclude_modules=["down_proj"])) == 12
    with pytest.raises(ValueError, match="no linear layer"):
        find_target_modules(base, ["nonexistent"])
    model = ACIPModel.from_base_model(tiny_base_model("llama"), target_modules=["gate_proj"])
    assert isinstance(model.acip_layers()["model.layers.1.mlp.gate_proj"], SVDLinear)
    assert type(model.model.model.layers[1].mlp.up_proj) is nn.Linear


@pytest.mark.parametrize("rank_cost, form", [("aligned", AlignedLowRankLinear), ("factors", LowRankLinear)])
def test_compressed_layers_are_plain_modules(rank_cost, form):
    model = tiny_acip_model("llama", rank_cost=rank_cost).prune_model_by_score(0.3).compress()
    kinds = {type(layer) for layer in model.acip_layers().values()}
    assert kinds <= {form, nn.Linear} and form in kinds


# -- pruning by memory budget -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, "nf4", "int8", "int4"])
def test_memory_budget_picks_the_largest_model_that_fits(kind, dtype):
    from acip.efficiency import model_bytes

    model = tiny_acip_model(kind)
    full = model.compressed_bytes(dtype)
    budget = int(full * 0.6)
    model.prune_model_by_score(memory_budget=budget, dtype=dtype)
    chosen = model.compressed_bytes(dtype)
    assert chosen <= budget
    # One more rank, the next in the global ranking, would not fit.
    ratio = model.get_size_ratio()
    kept = sum(int(layer.kept.sum()) for layer in model.acip_layers().values())
    for step in range(1, 2000):
        model.prune_model_by_score(min(1.0, ratio + step * 1e-4))
        if sum(int(layer.kept.sum()) for layer in model.acip_layers().values()) > kept:
            break
    assert model.compressed_bytes(dtype) > budget
    # The count is what compress() (+ .to(dtype) or quantize()) really holds.
    model.prune_model_by_score(memory_budget=budget, dtype=dtype).compress()
    if isinstance(dtype, str):
        model.quantize(dtype)
    elif dtype is not None:
        model.to(dtype)
    assert model_bytes(model) == chosen


def test_memory_budget_units_and_errors():
    model = tiny_acip_model("llama")
    full = model.compressed_bytes()
    model.prune_model_by_score(memory_budget=f"{full / 1000:.3f}kB")
    assert model.get_size_ratio() == 1.0
    model.prune_model_by_score(memory_budget=f"{full * 0.7 / 2**10}KiB")
    assert 0.4 < model.get_size_ratio() < 1.0 and model.compressed_bytes() <= full * 0.7
    before = [layer.mask.clone() for layer in model.acip_layers().values()]
    for bad in ("300 parsecs", "-5MB", 0, True, "MB"):
        with pytest.raises(ValueError, match="memory_budget must be"):
            model.prune_model_by_score(memory_budget=bad)
    with pytest.raises(ValueError, match=r"memory_budget=100 .* must be at least [\d,]+ bytes"):
        model.prune_model_by_score(memory_budget=100)
    with pytest.raises(ValueError, match="either a compression_ratio or a memory_budget"):
        model.prune_model_by_score(0.5, memory_budget="1MB")
    with pytest.raises(ValueError, match="dtype must be"):
        model.prune_model_by_score(memory_budget="1MB", dtype=torch.int8)
    assert all(torch.equal(layer.mask, b) for layer, b in zip(model.acip_layers().values(), before))


# -- building: every layer is checked and converted before any is swapped in (issue 14) ------------------------------


def test_from_base_model_rejects_an_acip_model():
    model = tiny_acip_model("llama")
    before = state(model)
    with pytest.raises(TypeError, match="base_model is already an ACIP model"):
        ACIPModel.from_base_model(model)
    assert_unchanged(model, before)


def test_from_base_model_rejects_already_parametrized_layers():
    base = tiny_base_model("llama")
    name = "model.layers.1.mlp.up_proj"
    base.set_submodule(name, SVDLinear.from_linear(base.get_submodule(name)))
    before = state(base)
    with pytest.raises(ValueError, match=rf"base_model already holds ACIP layers \(SVDLinear at '{name}'\)"):
        ACIPModel.from_base_model(base)
    assert_unchanged(base, before)


def test_from_base_model_rejects_a_nan_weight_and_leaves_the_base_as_it_was():
    base = tiny_base_model("qwen2")
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[3, 5] = math.nan  # the last target: every other one converts
    before = state(base)
    with pytest.raises(ValueError, match=r"base_model's target module 'model.layers.1.mlp.down_proj' has NaN"):
        ACIPModel.from_base_model(base)
    assert_unchanged(base, before)


def test_from_base_model_failing_midway_leaves_the_base_as_it_was(monkeypatch):
    base = tiny_base_model("llama")
    before = state(base)
    convert, calls = SVDLinear.from_linear, []

    def third_fails(linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("the SVD of layer 3 failed")
        return convert(linear, *args, **kwargs)

    monkeypatch.setattr(SVDLinear, "from_linear", third_fails)
    with pytest.raises(RuntimeError, match="layer 3"):
        ACIPModel.from_base_model(base)
    assert_unchanged(base, before)


def test_from_parametrized_base_wraps_layers_built_from_svd_outputs():
    base = tiny_base_model("qwen2")
    ids = token_ids()
    expected = logits(base, ids)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    for name in names:
        dense = base.get_submodule(name)
        u, s, vh = torch.linalg.svd(dense.weight.double(), full_matrices=False)
        base.set_submodule(name, SVDLinear.from_svd(u, s, vh, dense.bias, 0.05, score=s, dtype=dense.weight.dtype))
    model = ACIPModel.from_parametrized_base(base, basis="whitened")
    assert model.config.target_modules == names and model.config.mask_constant == 0.05
    assert model.config.basis == "whitened"
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="base_model is already an ACIP model"):
        ACIPModel.from_parametrized_base(model)
    with pytest.raises(ValueError, match="base_model must hold SVDLinear layers"):
        ACIPModel.from_parametrized_base(tiny_base_model("llama"))


# -- bad input to the user verbs: the right error, naming the argument, and the model unchanged (issue 14) ----------


@pytest.mark.parametrize("full", ["no", 1, None])
def test_full_must_be_a_bool(full):
    model = tiny_acip_model("llama").prune_model_by_score(0.7)
    before = state(model)
    with pytest.raises(TypeError, match=r"full must be True or False"):
        model.prune_model_by_score(0.5, full=full)
    with pytest.raises(TypeError, match=r"full must be True or False"):
        model.get_size_ratio(full=full)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "scores,match",
    [
        (None, r"score_map must be a dict"),
        ([1.0, 2.0], r"score_map must be a dict"),
        ("complex", r"score_map\['model.layers.0.self_attn.q_proj'\] must hold real numbers"),
        ("text", r"score_map\['model.layers.0.self_attn.q_proj'\] must be a tensor of real numbers"),
    ],
)
def test_score_map_rejects_what_is_not_a_map_of_real_scores(scores, match):
    model = tiny_acip_model("llama")
    before = state(model)
    name = "model.layers.0.self_attn.q_proj"
    shape = model.score_map[name].shape
    if scores == "complex":
        scores = {name: torch.complex(torch.randn(shape), torch.randn(shape))}
    elif scores == "text":
        scores = {name: "high"}
    with pytest.raises(TypeError, match=match):
        model.score_map = scores
    assert_unchanged(model, before)


def test_infinite_scores_are_legal_and_rank_first_or_last():
    model = tiny_acip_model("llama")
    name = "model.layers.0.self_attn.q_proj"
    scores = torch.full_like(model.score_map[name], -math.inf)
    scores[:2] = math.inf
    model.score_map = {name: scores}
    model.prune_model_by_score(0.3)
    assert model.acip_layers()[name].kept.tolist() == [True, True] + [False] * (scores.numel() - 2)


def test_edited_mask_constant_in_config_json_is_an_error(tmp_path):
    model = tiny_acip_model("llama").prune_model_by_score(0.6)  # pruned entries (0) are fine, live ones hold c
    model.save_pretrained(tmp_path)

    def double(config):
        config["mask_constant"] *= 2

    _edit_config(tmp_path, double)
    files = folder_files(tmp_path)
    with pytest.raises(ValueError, match=r"config.json gives mask_constant=0.04, but the live masks .* hold 0.0199"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert folder_files(tmp_path) == files


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    tiny_acip_model("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    for size in (path.stat().st_size - 100, 50, 4):
        with open(path, "r+b") as f:
            f.truncate(size)
        files = folder_files(tmp_path)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a complete safetensors file"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
        assert folder_files(tmp_path) == files


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_threshold_selection_prunes_as_the_original(kind):
    model = tiny_acip_model(kind, rank_cost="factors")
    model.config.selection = "threshold"
    g = torch.Generator().manual_seed(2)
    model.score_map = {n: torch.randint(-30, 3, s.shape, generator=g).float() for n, s in model.score_map.items()}
    for ratio in (1.0, 0.95, 0.9, 0.8, 0.7, 0.55, 0.4, 0.25, 0.1):
        model.prune_model_by_score(compression_ratio=ratio)
        expected = original_prune(model, ratio)
        assert all(torch.equal(m.kept, k) for m, k in zip(model.acip_layers().values(), expected)), ratio
        assert ratio == 1.0 or model.get_size_ratio() > ratio
