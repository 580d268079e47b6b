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


# Checkpoints written by the original ACIP implementation's own code (tests/data/upstream_format/README.md): per
# architecture `upstream/` (the checkpoint), `base/` (its base model) and `refs.safetensors` (the original's logits
# and kept masks at 1.0 / 0.7 / 0.4).
UPSTREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "upstream_format")
UPSTREAM_KINDS = ("llama", "qwen2")


def upstream_copy(dest, kind: str = "llama", edit_config=None, tensors=None, drop=(), shards: int = 1, dtype=None):
    """A copy of an original checkpoint in ``dest``, changed: ``edit_config`` (a function changing the config.json
    dict in place), ``tensors`` (name -> tensor, added or replaced), ``drop`` (names removed), cast to ``dtype``
    (floating tensors but the scores, which the original keeps in float32), split into ``shards`` files with a
    model.safetensors.index.json; returns ``dest``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    source, dest = Path(UPSTREAM) / kind / "upstream", Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    if edit_config is not None:
        edit_config(config)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy2(source / "generation_config.json", dest / "generation_config.json")
    weights = {k: v for k, v in load_file(source / "model.safetensors").items() if k not in drop}
    weights.update(tensors or {})
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".mask_score") else v
                   for k, v in weights.items()}  # fmt: skip
    if shards == 1:
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
        return dest
    names = sorted(weights)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in group}, dest / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
             "weight_map": weight_map}  # fmt: skip
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dest


def upstream_refs(kind: str = "llama") -> dict:
    """The original's outputs on its fixture: ids, logits@R and kept@R:<layer> (R in 1.0, 0.7, 0.4)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(UPSTREAM, kind, "refs.safetensors"))


def upstream_base(kind: str = "llama") -> str:
    """The folder of the fixture's base model (the checkpoint names it fixture/tiny-<kind>-base)."""
    return os.path.join(UPSTREAM, kind, "base")


def synthetic_original(base_model, folder, lora_rank: int = 4, lora_alpha: float = 8.0, seed: int = 0, c=0.02):
    """A checkpoint in the original implementation's format (tests/data/upstream_format/README.md) made here from a
    base causal LM (e.g. an architecture the fixtures lack): every linear layer but the head as ``ortho`` = U/√c,
    ``base`` = S·Vᵀ/√c, mask c, random distinct scores, and a whole-layer LoRA with random B. Saves the base model in
    ``folder/base``, the checkpoint in ``folder/upstream``; returns (upstream, base, {layer: (W + scale·B·A, bias,
    scores)}) for references."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    base_model.save_pretrained(folder / "base")
    generator = torch.Generator().manual_seed(seed)
    head = base_model.get_output_embeddings()
    tensors, layers = {}, {}
    for name, module in base_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
        p = f"model.{name}.base_layer.parametrization."
        tensors[p + "ortho.weight"] = (u / c**0.5).float().contiguous()
        tensors[p + "base.weight"] = (s[:, None] * vh / c**0.5).float().contiguous()
        tensors[p + "mask"] = torch.full((s.numel(),), c)
        tensors[p + "S"] = s.float()
        tensors[p + "mask_score"] = torch.randn(s.numel(), generator=generator)
        if module.bias is not None:
            tensors[p + "ortho.bias"] = module.bias.detach().clone()
        a = 0.1 * torch.randn(lora_rank, module.in_features, generator=generator)
        b = 0.1 * torch.randn(module.out_features, lora_rank, generator=generator)
        tensors[f"model.{name}.lora_A.default.weight"], tensors[f"model.{name}.lora_B.default.weight"] = a, b
        layers[name] = (tensors[p + "ortho.weight"], tensors[p + "base.weight"], lora_alpha / lora_rank * b @ a,
                        module.bias, tensors[p + "mask_score"])  # fmt: skip
    targets = {name.rsplit(".", 1)[-1] for name in layers}
    for key, value in base_model.state_dict().items():
        if key.rsplit(".", 1)[0] not in layers and key not in getattr(base_model, "all_tied_weights_keys", {}):
            tensors[f"model.{key}"] = value.detach().clone().contiguous()
    (folder / "upstream").mkdir()
    save_file(tensors, folder / "upstream" / "model.safetensors", metadata={"format": "pt"})
    fixture = json.loads((Path(UPSTREAM) / "llama" / "upstream" / "config.json").read_text())
    fixture["base_model_config"]["pretrained_model_kwargs"]["pretrained_model_name_or_path"] = "org/unseen-base"
    fixture["parametrization_config"]["target_modules"] = sorted(targets)
    fixture["parametrization_config"]["module_factory_kwargs"]["mask_scaling_factor"] = c
    lora = fixture["adapter_config"]["peft_config"]["default"]
    lora.update(r=lora_rank, lora_alpha=lora_alpha, target_modules=sorted(targets | {"base", "ortho"}))
    (folder / "upstream" / "config.json").write_text(json.dumps(fixture, indent=2))
    return folder / "upstream", folder / "base", layers


def original_prune(model, ratio):
    """The original implementation's prune_model_by_score(size_ratio=ratio), by its documented behaviour: at 1.0 keep
    everything; else prune the k lowest scores (all scores equal to the k-th lowest with them) for the largest k >= 1
    that leaves a size ratio above ``ratio`` (k = 1 when none does), sizes counted with biases and the dense cap."""
    layers = list(model.acip_layers().values())
    if ratio == 1.0:
        return [torch.ones_like(m.score, dtype=torch.bool) for m in layers]
    flat = torch.cat([m.score for m in layers])
    total = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in layers)

    def plan(k):
        threshold = torch.kthvalue(flat, k).values
        keep = [m.score > threshold for m in layers]
        size = sum(min(int(c.sum()) * (m.in_features + m.out_features), m.in_features * m.out_features)
                   + (m.out_features if m.bias is not None else 0) for c, m in zip(keep, layers))  # fmt: skip
        return size / total, keep

    best = 1
    for k in range(1, flat.numel() + 1):
        if plan(k)[0] > ratio:
            best = k
    return plan(best)[1]
