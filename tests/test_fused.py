"""The fused inference form (fusing.py, ACIPModel.fuse/unfuse): same outputs as the compressed model, fewer matmuls,
saved and reloaded as such, torch.compile without graph breaks, clear errors where a form does not apply."""

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from conftest import greedy, tiny_acip_model, tiny_tokenizer, token_ids
from transformers import AutoModelForCausalLM, pipeline

from acip import ACIPModel
from acip import AlignedLowRankLinear, LowRankLinear
from acip.hub.fusing import FusedLinear, SharedInput

RATIOS = (0.3, 0.6, 0.9)  # from mostly factorized to mostly dense: groups mixing both forms at 0.6 and 0.9


def compressed(kind="llama", ratio=0.6, seed=0, rank_cost="aligned"):
    """A tiny compressed ACIP model."""
    return tiny_acip_model(kind, seed, rank_cost=rank_cost).prune_model_by_score(ratio).compress()


def logits(model, ids=None):
    """Logits of the model on fixed token ids, no gradients."""
    with torch.no_grad():
        return model(token_ids(2, 12) if ids is None else ids).logits


@pytest.mark.parametrize("ratio", RATIOS)
def test_fused_equals_compressed(kind, ratio, rank_cost):
    small = compressed(kind, ratio, rank_cost=rank_cost)
    fused = copy.deepcopy(small).fuse()
    assert all(isinstance(m, FusedLinear) for m in fused.acip_layers().values())
    torch.testing.assert_close(logits(fused), logits(small), atol=1e-4, rtol=0)
    assert fused.get_num_params() == small.get_num_params()
    assert fused.get_num_params(full=True) == small.get_num_params(full=True)
    ids = token_ids(1, 5, seed=1)
    expected = greedy(small, ids)
    assert torch.equal(greedy(fused, ids), expected)
    assert torch.equal(greedy(fused, ids, cache_implementation="static"), expected)
    # Nothing is kept between calls: the last member of each group clears the shared slices.
    assert all(m.stash is None for m in fused.modules() if isinstance(m, SharedInput))


def test_groups_are_found_by_shared_input(kind):
    fused = compressed(kind, 0.3).fuse()
    layer = "model.layers.0"
    groups = [g for g in fused.config.fused_groups if g[0].startswith(layer + ".")]
    assert groups == [
        [f"{layer}.self_attn.q_proj", f"{layer}.self_attn.k_proj", f"{layer}.self_attn.v_proj"],
        [f"{layer}.self_attn.o_proj"],
        [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"],
        [f"{layer}.mlp.down_proj"],
    ]
    assert sorted(n for g in fused.config.fused_groups for n in g) == sorted(fused.config.target_modules)
    attention = fused.model.model.layers[0].self_attn
    shared = attention.q_proj.shared
    assert attention.k_proj._shared is shared and "shared" not in dict(attention.k_proj.named_children())
    assert shared.sizes == [attention.q_proj.rows, attention.k_proj.rows, attention.v_proj.rows]


@pytest.mark.parametrize("rank_cost, ratio", [("factors", 0.9), ("aligned", 0.99)])
def test_a_dense_member_joins_the_shared_matmul(rank_cost, ratio):
    # Near full size some layers go back to dense (by the original cost rule most of them at 0.9); a group with at
    # least one factorized member takes its dense ones along, a group of dense layers only stays one matmul per layer.
    small = compressed("qwen2", ratio, rank_cost=rank_cost)
    fused = copy.deepcopy(small).fuse()
    shared = [name for group in fused.config.fused_groups if len(group) > 1 for name in group]
    dense = [name for name in shared if fused.model.get_submodule(name).rank is None]
    assert dense, "at 0.9 some group should mix dense and factorized layers"
    for name in dense:  # its weight is its rows of the shared matmul, its bias its own
        member, layer = fused.model.get_submodule(name), small.model.get_submodule(name)
        rows = member._shared.proj.weight.split(member._shared.sizes)[member.index]
        assert torch.equal(rows, layer.weight)
        assert (member.bias is None) == (layer.bias is None)
        assert layer.bias is None or torch.equal(member.bias, layer.bias)
    for group in fused.config.fused_groups:
        if len(group) > 1:
            assert any(type(small.model.get_submodule(name)) in (LowRankLinear, AlignedLowRankLinear) for name in group)
        else:
            assert fused.model.get_submodule(group[0]).alone


def test_a_member_called_with_another_input_computes_its_own_slice():
    small = compressed("llama", 0.3)
    fused = copy.deepcopy(small).fuse()
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    fused_attention, small_attention = fused.model.model.layers[1].self_attn, small.model.model.layers[1].self_attn
    with torch.no_grad():
        torch.testing.assert_close(fused_attention.k_proj(y), small_attention.k_proj(y), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_attention.q_proj(x), small_attention.q_proj(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_attention.v_proj(y), small_attention.v_proj(y), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_attention.k_proj(x), small_attention.k_proj(x), atol=1e-5, rtol=0)


def test_fused_model_saves_and_reloads_fused(tmp_path, rank_cost):
    fused = compressed("qwen2", 0.6, rank_cost=rank_cost).fuse()
    fused.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.fused_groups == fused.config.fused_groups
    assert all(isinstance(m, FusedLinear) for m in reloaded.acip_layers().values())
    torch.testing.assert_close(logits(reloaded), logits(fused), atol=0, rtol=0)
    q_proj = reloaded.model.model.layers[0].self_attn.q_proj
    assert q_proj.shared.proj.weight.stride() == (1, q_proj.shared.proj.out_features)  # float32 on CPU: (in, out)


def test_layout_follows_dtype():
    fused = compressed("llama", 0.3).fuse()
    proj = fused.model.model.layers[0].self_attn.q_proj.shared.proj
    u = fused.model.model.layers[0].mlp.up_proj.u
    assert proj.weight.stride() == (1, proj.out_features) and u.weight.stride() == (1, u.out_features)
    fused.to(torch.bfloat16)
    assert proj.weight.is_contiguous() and u.weight.is_contiguous()
    fused.to(torch.float32)
    assert proj.weight.stride() == (1, proj.out_features)


def test_bfloat16_fused_equals_compressed(kind):
    small = compressed(kind, 0.6).to(torch.bfloat16)
    fused = copy.deepcopy(small).fuse()
    reference = logits(small).float()
    error = float((logits(fused).float() - reference).norm() / reference.norm())
    assert error < 1e-2  # the same products, summed in another order in bfloat16


def test_unfuse_is_exact(rank_cost):
    small = compressed("mistral", 0.6, rank_cost=rank_cost)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    back = copy.deepcopy(small).fuse().unfuse()
    assert back.config.fused_groups == []
    after = back.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
        assert after[name].is_contiguous(), name


def test_decoder_layer_traces_into_one_graph():
    fused = compressed("qwen2", 0.6).fuse()
    layer = fused.model.model.layers[0]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    logits(fused)
    hook.remove()
    with torch.no_grad():
        explained = torch._dynamo.explain(layer)(*captured["args"], **captured["kwargs"])
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*captured["args"], **captured["kwargs"]),
                                   layer(*captured["args"], **captured["kwargs"]), atol=1e-6, rtol=0)  # fmt: skip


def test_what_each_form_refuses():
    with pytest.raises(RuntimeError, match="compress"):
        tiny_acip_model("llama").prune_model_by_score(0.5).fuse()
    fused = compressed("llama", 0.5).fuse()
    with pytest.raises(RuntimeError, match="compressed"):
        fused.prune_model_by_score(0.4)
    with pytest.raises(RuntimeError, match="compressed"):
        fused.compress()
    assert fused.fuse() is fused  # fused already: nothing more to do


def test_quantize_after_fuse_and_not_before():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(RuntimeError, match="fuse.. before quantize"):
        compressed("llama", 0.5).quantize().fuse()
    fused = compressed("llama", 0.5).fuse()
    reference = logits(fused)
    fused.quantize()
    assert type(fused.model.model.layers[0].self_attn.q_proj.shared.proj).__name__ == "Linear4bit"
    error = float((logits(fused) - reference).norm() / reference.norm())
    assert error < 0.2
    with pytest.raises(RuntimeError, match="unfuse"):
        fused.unfuse()


def test_text_generation_pipeline_on_a_fused_model():
    model = compressed("llama", 0.5).fuse()
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    out = generator("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w6 w7")


def test_fused_config_is_checked():
    config = compressed("llama", 0.5).fuse().config.to_dict()
    config["fused_groups"] = [["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]]
    with pytest.raises(ValueError, match="fused_groups"):
        ACIPModel.config_class.from_dict(config)


REMOTE_CHECK = """
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModel, AutoModelForCausalLM, pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from safetensors.torch import load_file
folder = sys.argv[1]
expected = load_file(os.path.join(folder, "expected.safetensors"))
for auto in (AutoModel, AutoModelForCausalLM):
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(model.model.model.layers[0].self_attn.q_proj).__name__ == "FusedLinear"
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
    with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
        pipeline("text-generation", model=model, tokenizer=folder)
    assert "is not supported" not in captured.out, captured.out[:300]
assert "acip" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_fused_folder_loads_through_remote_code_and_suits_the_pipeline(tmp_path):
    fused = compressed("qwen2", 0.5).fuse()
    fused.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "fusing.py").is_file()
    ids = token_ids(1, 7)
    save_file({"ids": ids, "logits": logits(fused, ids).contiguous()}, tmp_path / "expected.safetensors")
    done = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
