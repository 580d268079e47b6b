"""Integration: the core on the embedded SmolLM2-135M (210 linear layers), end to end on the CPU."""

import copy
import json
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from acip import ACIPModel
from acip.default_model import MAX_POSITIONS, load_default_model

pytestmark = pytest.mark.slow  # loads and factorizes the real 135M model

TEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built for the 1889 World's Fair and"


@pytest.fixture(scope="module")
def smollm2_base():
    """The embedded SmolLM2 and its tokenizer, loaded once (dequantizing the GGUF file takes ~20 s); users copy it."""
    pytest.importorskip("gguf")
    return load_default_model()


@pytest.fixture(scope="module")
def smollm2(smollm2_base):
    base, tokenizer = copy.deepcopy(smollm2_base[0]), smollm2_base[1]
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = base(ids).logits
    start = time.perf_counter()
    model = ACIPModel.from_base_model(base).eval()
    print(f"\nparametrized {len(model.config.target_modules)} layers in {time.perf_counter() - start:.1f} s")
    return model, tokenizer, ids, reference


def test_the_positions_known_without_loading_are_the_models(smollm2_base):
    assert smollm2_base[0].config.max_position_embeddings == MAX_POSITIONS


def test_parametrized_smollm2_is_the_base_model(smollm2):
    model, tokenizer, ids, reference = smollm2
    assert len(model.config.target_modules) == 210
    assert model.config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference).abs().max() < 2e-3
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_smollm2_compresses_saves_and_quantizes(smollm2, tmp_path):
    model, tokenizer, ids, reference = smollm2
    model = copy.deepcopy(model).prune_model_by_score(0.6)
    with torch.no_grad():
        pruned = model(ids).logits
    model.compress()
    with torch.no_grad():
        compressed = model(ids).logits
    torch.testing.assert_close(compressed, pruned, atol=5e-3, rtol=0)  # fp32 rounding of the sliced factors
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == model.get_num_params(full=True)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == n_params
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compressed, atol=0, rtol=0)


def test_smollm2_quantized_to_4_bits(smollm2):
    pytest.importorskip("bitsandbytes")
    model, tokenizer, ids, reference = smollm2
    dense = copy.deepcopy(model).prune_model_by_score(1.0).compress()  # every layer back to dense
    with torch.no_grad():
        loss = float(dense(ids, labels=ids).loss)
        quantized = float(dense.quantize()(ids, labels=ids).loss)
    print(f"\nSmolLM2 next-token loss on a sentence: fp32 {loss:.3f}, nf4 {quantized:.3f}")
    assert quantized < loss + 0.5


def test_a_few_acip_steps_on_smollm2_save_a_prunable_model(smollm2_base, tmp_path):
    pytest.importorskip("mwparserfromhell")
    from acip.training import preset, run_acip

    base, tokenizer = copy.deepcopy(smollm2_base[0]), smollm2_base[1]
    # The weight basis: 210 float64 SVDs of the whitened basis would add a minute (benchmarks/basis.py covers it).
    config = preset("quick", block_size=64, batch_size=2, max_steps=3, post_tune_steps=1, checkpoint_every=2,
                    basis="weight")  # fmt: skip
    run_acip(config, tmp_path / "run", base_model=base, tokenizer=tokenizer)

    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["prune"] * 3 + ["post-tune"]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in log)
    assert not (tmp_path / "run" / "checkpoints").exists()  # removed once the model is saved

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    scores = torch.cat(list(model.score_map.values()))
    assert scores.numel() == sum(layer.rank for layer in model.acip_layers().values())
    assert (scores > 0).all()  # three steps at lr 5e-4 cannot kill a mask that starts at 2e-2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = float(model.prune_model_by_score(0.8)(ids, labels=ids).loss)
    assert model.get_size_ratio() >= 0.8 and math.isfinite(loss)
