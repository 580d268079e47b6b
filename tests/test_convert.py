"""acip convert (acip/convert.py): checkpoints written by the original ACIP implementation's own code
(tests/data/upstream_format) become acip model folders that prune to the original's kept sets and logits at every
ratio, compress, save, reload (also through remote code in a fresh process), generate and fine-tune; sharded and
bfloat16 checkpoints too. Bad inputs: tests/test_bad_input.py."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    UPSTREAM,
    UPSTREAM_KINDS,
    greedy,
    original_prune,
    synthetic_original,
    tiny_base_model,
    tiny_tokenizer,
    token_ids,
    upstream_base,
    upstream_copy,
    upstream_refs,
)

from acip import ACIPModel
from acip.cli import main
from acip.convert import convert
from acip.hub.parametrization import LayerLoRA, LowRankLinear, SVDLinear

RATIOS = (1.0, 0.7, 0.4)
LORA_RANK = 8  # the fixtures' LoRA: r 8, alpha 16


def upstream(kind: str) -> str:
    return os.path.join(UPSTREAM, kind, "upstream")


@pytest.fixture(scope="module", params=UPSTREAM_KINDS)
def converted(request, tmp_path_factory):
    """(kind, folder): each fixture converted once."""
    out = tmp_path_factory.mktemp("converted") / request.param
    convert(upstream(request.param), out, base_model=upstream_base(request.param))
    return request.param, out


def load(folder) -> ACIPModel:
    return ACIPModel.from_pretrained(folder).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def kept_of(refs: dict, ratio: float, name: str) -> torch.Tensor:
    return refs[f"kept@{ratio}:{name}.base_layer.parametrization.mask"] > 0


def test_the_folder_is_an_acip_model_with_the_originals_rules(converted):
    kind, folder = converted
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "acip" and config["rank_cost"] == "factors" and config["selection"] == "threshold"
    assert config["lora_rank"] == LORA_RANK and config["mask_constant"] == 0.02 and not config["compressed"]
    assert config["base_model_name_or_path"] == f"fixture/tiny-{kind}-base"  # what the checkpoint names
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for name in ("configuration_acip.py", "modeling_acip.py", "parametrization.py", "pruning.py", "fusing.py"):
        assert (folder / name).is_file()
    record = json.loads((folder / "acip_convert.json").read_text())
    assert sorted(record["files"]) == sorted(p.name for p in folder.iterdir())
    model = load(folder)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SVDLinear) and isinstance(layer.layer_lora, LayerLoRA)
    assert layer.mask.dtype == layer.score.dtype == torch.float32
    generation = json.loads((folder / "generation_config.json").read_text())
    base = json.loads(open(os.path.join(upstream_base(kind), "generation_config.json")).read())
    assert {k: generation.get(k) for k in base if k != "transformers_version"} == {  # the base model's (its tokens)
        k: v for k, v in base.items() if k != "transformers_version"}


def test_pruned_logits_and_kept_sets_are_the_originals(converted):
    kind, folder = converted
    model, refs = load(folder), upstream_refs(kind)
    achieved = json.loads(open(os.path.join(UPSTREAM, kind, "refs.json")).read())["achieved"]
    for ratio in RATIOS:
        assert model.prune_model_by_score(compression_ratio=ratio) is model
        for name, layer in model.acip_layers().items():
            assert torch.equal(layer.kept, kept_of(refs, ratio, name)), (ratio, name)
        assert model.get_size_ratio() == pytest.approx(achieved[str(ratio)], abs=1e-12)
        torch.testing.assert_close(logits(model, refs["ids"]), refs[f"logits@{ratio}"], atol=1e-4, rtol=0)


def test_compress_keeps_the_logits_and_the_saved_model_rebuilds_from_config(converted, tmp_path):
    kind, folder = converted
    refs = upstream_refs(kind)
    model = load(folder)
    for ratio in RATIOS:
        small = copy.deepcopy(model).prune_model_by_score(ratio).compress()
        torch.testing.assert_close(logits(small, refs["ids"]), refs[f"logits@{ratio}"], atol=1e-4, rtol=0)
        small.save_pretrained(tmp_path / str(ratio))
        again = load(tmp_path / str(ratio))
        assert again.config.layer_ranks == small.config.layer_ranks
        torch.testing.assert_close(logits(again, refs["ids"]), refs[f"logits@{ratio}"], atol=1e-4, rtol=0)


def test_compress_holds_the_lora_as_extra_ranks(converted):
    # The original adds its LoRA at every size and does not count it: a factorized layer of rank r stores r + 8
    # ranks, a layer stored dense holds it merged; the bytes planned before compress() are the bytes after it.
    kind, folder = converted
    model = load(folder).prune_model_by_score(0.4)
    kept = {name: int(layer.kept.sum()) for name, layer in model.acip_layers().items()}
    planned = model.compressed_bytes()
    ratio = model.get_size_ratio()
    model.compress()
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert stored == planned
    for name, layer in model.acip_layers().items():
        if isinstance(layer, LowRankLinear):
            assert layer.rank == kept[name] + LORA_RANK == model.config.layer_ranks[name]
        else:
            in_features, out_features = layer.in_features, layer.out_features
            assert (kept[name] + LORA_RANK) * (in_features + out_features) >= in_features * out_features
    # what the LoRA term costs at 0.4 on these tiny layers (64-160 wide; rank 8 of 32-64 is a large share)
    assert ratio == pytest.approx(0.40, abs=0.005) and model.get_size_ratio() > ratio


def test_the_original_call_names(converted):
    kind, folder = converted
    model, refs = load(folder), upstream_refs(kind)
    small = model.prune_model_by_score(compression_rate=0.3).compress()  # the original's README: chained
    assert small is model and model.config.compressed
    torch.testing.assert_close(logits(model, refs["ids"]), refs["logits@0.7"], atol=1e-4, rtol=0)
    fresh = load(folder)
    fresh.prune_model_by_score(size_ratio=0.4, compression_rate=0.6)  # agreeing names are accepted
    assert all(torch.equal(m.kept, kept_of(refs, 0.4, n)) for n, m in fresh.acip_layers().items())
    with pytest.raises(ValueError, match="compression_ratio=0.5 and compression_rate=0.3 disagree"):
        fresh.prune_model_by_score(compression_ratio=0.5, compression_rate=0.3)
    with pytest.raises(ValueError, match=r"compression_rate must be in \[0, 1\] \(the fraction of parameters removed"):
        fresh.prune_model_by_score(compression_rate=1.5)


def test_generate_fuse_quantize_and_memory_budget_on_the_converted_model(converted):
    kind, folder = converted
    model = load(folder).prune_model_by_score(0.4)
    ids = upstream_refs(kind)["ids"][:, :6]
    expected = greedy(model, ids)
    small = copy.deepcopy(model).compress()
    assert torch.equal(greedy(small, ids), expected)
    fused = copy.deepcopy(small).fuse()
    assert torch.equal(greedy(fused, ids), expected)
    assert greedy(copy.deepcopy(small).quantize(), ids).shape == expected.shape
    budget = int(0.8 * model.prune_model_by_score(1.0).compressed_bytes())
    model.prune_model_by_score(memory_budget=budget)
    assert model.compressed_bytes() <= budget
    assert sum(t.numel() * t.element_size() for t in [*model.compress().parameters(), *model.buffers()]) <= budget


def test_a_peft_lora_step_on_the_compressed_model(converted):
    from peft import LoraConfig, get_peft_model

    kind, folder = converted
    model = load(folder).prune_model_by_score(0.4).compress().train()
    tuned = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    trainable = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    ids = upstream_refs(kind)["ids"]
    loss = tuned(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = [n for n, p in tuned.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)
    assert tuned(input_ids=ids, labels=ids).loss < loss


@pytest.mark.parametrize("kind, seed", [("mistral", 0), ("llama", 5), ("qwen2", 7)])
def test_checkpoints_of_other_architectures_and_seeds(kind, seed, tmp_path):
    # Made here in the original's format (conftest.synthetic_original); the reference at each ratio is the base model
    # with every layer's weight replaced by what the original computes: its kept factors times c, plus its LoRA.
    base = tiny_base_model(kind, seed)
    src, base_dir, layers = synthetic_original(base, tmp_path / "original", seed=seed)
    convert(src, tmp_path / "out", base_model=base_dir)
    model, ids = load(tmp_path / "out"), token_ids(2, 10, seed)
    for ratio in (1.0, 0.8, 0.55, 0.3):
        model.prune_model_by_score(compression_ratio=ratio)
        expected = original_prune(model, ratio)
        assert all(torch.equal(m.kept, k) for m, k in zip(model.acip_layers().values(), expected)), ratio
        reference = copy.deepcopy(base)
        with torch.no_grad():
            for keep, (name, (ortho, factor, lora, _, _)) in zip(expected, layers.items()):
                reference.get_submodule(name).weight.copy_(ortho[:, keep] @ (0.02 * factor[keep]) + lora)
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits(copy.deepcopy(model).compress(), ids), logits(reference, ids), atol=1e-4,
                                   rtol=0)  # fmt: skip


@pytest.mark.parametrize("kind", UPSTREAM_KINDS)
def test_a_sharded_bfloat16_checkpoint_converts_and_stays_bfloat16(kind, tmp_path):
    source = upstream_copy(tmp_path / "src", kind, shards=3, dtype=torch.bfloat16)
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) == 3
    convert(source, tmp_path / "out", base_model=upstream_base(kind))
    model, refs = load(tmp_path / "out"), upstream_refs(kind)
    assert model.dtype == torch.bfloat16 and json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == (
        "bfloat16")
    layer = model.model.model.layers[0].mlp.down_proj
    assert layer.mask.dtype == layer.score.dtype == torch.float32 and layer.layer_lora.b.dtype == torch.bfloat16
    for ratio in RATIOS:
        model.prune_model_by_score(ratio)
        assert all(torch.equal(m.kept, kept_of(refs, ratio, n)) for n, m in model.acip_layers().items())
        torch.testing.assert_close(logits(model, refs["ids"]).float(), refs[f"logits@{ratio}"], atol=3e-2, rtol=0)
    convert(source, tmp_path / "fp32", base_model=upstream_base(kind), dtype="float32")
    assert load(tmp_path / "fp32").dtype == torch.float32


def test_large_outputs_are_written_in_shards_and_overwritten_whole(tmp_path):
    kind, out = "qwen2", tmp_path / "out"
    convert(upstream(kind), out, base_model=upstream_base(kind), max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    refs = upstream_refs(kind)
    model = load(out).prune_model_by_score(0.7)
    torch.testing.assert_close(logits(model, refs["ids"]), refs["logits@0.7"], atol=1e-4, rtol=0)
    convert(upstream(kind), out, base_model=upstream_base(kind), overwrite=True)  # a folder acip convert wrote
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_the_tokenizer_comes_along_and_the_folder_exports(tmp_path):
    from acip.export import export_model

    source = upstream_copy(tmp_path / "src", "llama")
    tiny_tokenizer().save_pretrained(source)
    convert(source, tmp_path / "out", base_model=upstream_base("llama"))
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    export_model(tmp_path / "out", tmp_path / "export", ratio=0.5, license="llama2", validate=False)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["compressed"]


def test_the_command_line(tmp_path, capsys):
    main(["convert", upstream("llama"), str(tmp_path / "out"), "--base-model", upstream_base("llama"), "--dtype",
          "bfloat16"])  # fmt: skip
    said = capsys.readouterr().out
    assert said.startswith(f"converted {upstream('llama')} into {tmp_path / 'out'}") and "LoRA (rank 8" in said
    assert load(tmp_path / "out").dtype == torch.bfloat16


REMOTE_CHECK = """
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
folder, refs, ratio = sys.argv[1], load_file(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
if not model.config.compressed:
    model.prune_model_by_score(compression_ratio=float(ratio))
with torch.no_grad():
    torch.testing.assert_close(model(refs["ids"]).logits, refs["logits@" + ratio], atol=1e-4, rtol=0)
out = model.generate(refs["ids"][:, :5], max_new_tokens=3, do_sample=False)
assert out.shape == (1, 8), out.shape
assert "acip" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_converted_and_compressed_folders_load_through_remote_code_without_acip(converted, tmp_path):
    kind, folder = converted
    small = load(folder).prune_model_by_score(0.4).compress()
    small.save_pretrained(tmp_path / "small")
    refs = os.path.join(UPSTREAM, kind, "refs.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    for path, ratio in ((folder, "0.7"), (tmp_path / "small", "0.4")):
        done = subprocess.run([sys.executable, "-I", "-c", REMOTE_CHECK, str(path), refs, ratio], capture_output=True,
                              text=True, cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


MEMORY_CHECK = """
import os, sys, time
def status(key):
    return int([line for line in open("/proc/self/status") if line.startswith(key)][0].split()[1]) * 1024
from acip.convert import convert
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: the conversion's own
before = status("VmRSS:")
convert(sys.argv[1], sys.argv[2], base_model=sys.argv[3])
print(status("VmHWM:") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-memory reset")
def test_a_conversion_holds_about_one_tensor_in_memory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    src, base, _ = synthetic_original(LlamaForCausalLM(config), tmp_path / "original")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))  # about 90 MB
    largest = 8000 * 512 * 4  # the embedding and the head
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(src), str(tmp_path / "out"), str(base)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    grown = int(done.stdout.split()[-1])
    print(f"conversion peak: +{grown / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint")
    assert grown < 2 * largest < 0.4 * size, (grown, largest, size)


def hub_cached(cache, repo_id: str, folder) -> None:
    """Put the files of ``folder`` into the Hub cache ``cache`` as the snapshot of ``repo_id`` (as a download would)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_a_published_model_converts_by_hub_id_from_the_hub_cache(tmp_path, monkeypatch):
    # The published flow, offline: the checkpoint and its base model by Hub id, both already in the Hub cache.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cached(tmp_path / "hub", "MerantixMomentum/acip_tiny_llama", upstream("llama"))
    hub_cached(tmp_path / "hub", "fixture/tiny-llama-base", upstream_base("llama"))
    monkeypatch.chdir(tmp_path)
    convert("MerantixMomentum/acip_tiny_llama", tmp_path / "out")  # the base model the checkpoint names
    model, refs = load(tmp_path / "out").prune_model_by_score(0.4), upstream_refs("llama")
    torch.testing.assert_close(logits(model, refs["ids"]), refs["logits@0.4"], atol=1e-4, rtol=0)
    record = json.loads((tmp_path / "out" / "acip_convert.json").read_text())
    assert record["source"] == "MerantixMomentum/acip_tiny_llama" and record["base_model"] == "fixture/tiny-llama-base"
    with pytest.raises(FileNotFoundError, match="src: the Hub repository MerantixMomentum/acip_missing could not be "
                       "reached"):  # fmt: skip
        convert("MerantixMomentum/acip_missing", tmp_path / "other")
    assert not (tmp_path / "other").exists()
