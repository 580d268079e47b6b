"""Tiny randomly initialised causal LMs for the tests: seconds, not minutes."""

import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is faster than two (no thread start-up per op) and keeps the suite's time steady when the
# machine is busy, where oversubscribed threads spin; child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

VOCAB = 96

# AOTInductor (acip.aot) compiles C++: without a compiler its tests cannot run (the rest of acip needs none)
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")

TINY_CONFIGS = {
    # Llama: tied embeddings, grouped-query attention, no biases.
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    # Qwen2: GQA with q/k/v biases, untied head.
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    # Mistral: sliding-window attention, untied head.
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=32,
        tie_word_embeddings=False,
    ),
}
MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def tiny_base_model(kind: str = "llama", seed: int = 0):
    """A tiny random base causal LM in eval mode; biases get random values so that they are really tested."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind](TINY_CONFIGS[kind]()).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


def tiny_acip_model(kind: str = "llama", seed: int = 0, random_scores: bool = True, rank_cost: str = "aligned"):
    """A tiny ACIP model; random scores stand in for a trained score map."""
    from acip import ACIPModel

    model = ACIPModel.from_base_model(tiny_base_model(kind, seed), rank_cost=rank_cost).eval()
    if random_scores:
        generator = torch.Generator().manual_seed(seed + 1)
        model.score_map = {name: torch.randn(s.shape, generator=generator) for name, s in model.score_map.items()}
    return model


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids for the tiny vocabulary."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, max_new_tokens: int = 8, **kwargs) -> torch.Tensor:
    """The model's own greedy continuation of ``ids`` (every prompt token attended: no pad-id masking)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)  # fmt: skip


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def kind(request) -> str:
    """Each tiny architecture in turn."""
    return request.param


@pytest.fixture(params=["aligned", "factors"])
def rank_cost(request) -> str:
    """Each cost rule in turn, and so each compressed form (gauge-aligned, plain factors)."""
    return request.param


def words_file(path, words: int = 2000, seed: int = 0) -> str:
    """A text file of random words from the tiny tokenizer's vocabulary; returns its path."""
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randint(3, VOCAB - 1)}" for _ in range(words)))
    return str(path)


def save_tiny_run(folder, kind: str = "llama"):
    """A saved tiny ACIP model as an ACIP run leaves it (tokenizer, acip_run.json naming a saved base model);
    returns (acip folder, base folder)."""
    import dataclasses
    import json

    base_dir, acip_dir = folder / "base", folder / "acip"
    tokenizer = tiny_tokenizer()
    tiny_base_model(kind).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tiny_acip_model(kind).save_pretrained(acip_dir)
    tokenizer.save_pretrained(acip_dir)
    from acip.training import ACIPRunConfig

    config = dataclasses.asdict(ACIPRunConfig(base_model=str(base_dir), data="hf:org/texts:en"))
    record = {"config": config, "finished": True, "pruning_steps": 50, "post_tune_steps": 5, "train_seconds": 1.0}
    (acip_dir / "acip_run.json").write_text(json.dumps(record))
    return acip_dir, base_dir
