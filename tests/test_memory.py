"""Memory of an ACIP run (acip/memory.py): the meta-device estimate equals what a real model and peft hold, and
parametrizing a model of a few hundred MB peaks below 1.15 x the finished parametrized model (RSS, fresh process)."""

import mmap
import os

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_base_model
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from acip import ACIPModel
from acip.memory import (
    LLAMA2, estimate_run_memory, format_estimates, measure_parametrization, own_rss_bytes, rss_bytes,
)  # fmt: skip


# A 97M-parameter Llama: 389 MB dense, 588 MB parametrized, in float32.
FEW_HUNDRED_MB = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, vocab_size=8000, tie_word_embeddings=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_estimate_counts_what_a_real_run_holds(kind):
    estimate = estimate_run_memory(TINY_CONFIGS[kind](), lora_r=4, dtype=torch.float32)
    base = tiny_base_model(kind)
    assert estimate.base_params == sum(p.numel() for p in base.parameters())
    model = ACIPModel.from_base_model(base)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    assert estimate.parametrized_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    layers = model.acip_layers()
    assert estimate.masks_scores_bytes == sum(8 * layer.rank for layer in layers.values())
    factors = [f"model.{name}.{part}" for name in layers for part in ("sv", "u")]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=factors))
    assert estimate.lora_params == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = estimate.lora_params + sum(layer.rank for layer in layers.values())
    assert estimate.grad_bytes == 4 * trainable and estimate.adam_bytes == 8 * trainable


def test_llama2_estimates_from_public_shapes():
    estimates = [estimate_run_memory(LlamaConfig(**shape), name) for name, shape in LLAMA2.items()]
    assert [e.base_params for e in estimates] == [6_738_415_616, 13_015_864_320, 68_976_648_192]
    for e in estimates:
        assert 0 <= e.base_bytes - 2 * e.base_params < 4096  # bf16 weights, plus the rotary buffers
        assert e.base_bytes < e.parametrized_bytes < 1.6 * e.base_bytes  # full-rank factors cost more than dense
    assert "| LLaMA-2-7B | 6.74B |" in format_estimates(estimates)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux /proc")
def test_parametrizing_peaks_below_1_15_times_the_parametrized_model():
    result = measure_parametrization(FEW_HUNDRED_MB)
    assert 350e6 < result["base_bytes"] < 450e6 < result["parametrized_bytes"]  # a few hundred MB
    assert result["peak_rss_bytes"] < 1.15 * result["parametrized_bytes"], result


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_own_resident_memory_counts_mapped_files_of_the_folder_only(tmp_path):
    mine, other = tmp_path / "model", tmp_path / "other"
    mine.mkdir(), other.mkdir()
    size = 16 * 2**20
    for folder in (mine, other):
        (folder / "weights.bin").write_bytes(os.urandom(size))
    before_mine, before_whole = own_rss_bytes(mine), rss_bytes()
    with open(mine / "weights.bin", "rb") as a, open(other / "weights.bin", "rb") as b:
        ma, mb = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in (a, b))
        sum(ma[i] + mb[i] for i in range(0, size, 4096))  # page both files in
        grown_mine, grown_whole = own_rss_bytes(mine) - before_mine, rss_bytes() - before_whole
        ma.close(), mb.close()
    assert size * 0.9 < grown_mine < size * 1.5  # its own file, not the other folder's
    assert grown_whole > size * 1.9  # the process's resident set holds both
