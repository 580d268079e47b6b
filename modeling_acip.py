"""ACIP model: a Hugging Face causal LM whose linear layers are SVD-parametrized, prunable to any size by a global
score map, then compressible and quantizable into an ordinary (smaller) causal LM.

Loads with ``AutoModel.from_pretrained(dir_or_repo, trust_remote_code=True)`` (or ``AutoModelForCausalLM``).
This file is part of the Hub payload: it imports only torch, transformers, safetensors and its sibling files.
"""

import json
import os
import re
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationMixin, PreTrainedModel

from .configuration_acip import ACIPConfig
from .fusing import FusedLinear, build_fused, fuse_model, settle_loaded, unfuse_model
from .parametrization import (
    AlignedLowRankLinear,
    LowRankLinear,
    SVDLinear,
    keep_4bit_cpu_path_safe,
    linear_num_params,
    to_4bit,
)
from .pruning import (  # QUANT_TYPES: the package imports it from here
    BNB_TYPES,
    INT_TYPES,
    QUANT_TYPES,
    bytes_budget,
    check_rank_cost,
    check_ratio,
    check_scores,
    check_storage,
    layer_bytes,
    plan_memory,
    plan_pruning,
    rank_cost,
    ratio_budget,
    stored_bytes,
    stored_rank,
    tensor_bytes,
)
from .quantization import (
    HEAD_TYPE,
    IntLinear,
    TiedIntEmbedding,
    balanced,
    gptq_int4,
    input_moments,
    refit_output_factor,
    stack_rounded,
)


def _matches(name: str, patterns: str | list[str]) -> bool:
    """peft's convention: a string is a regex that must match the whole name; a list holds names or name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _submodule(root: nn.Module, name: str) -> nn.Module:
    """``root.get_submodule(name)`` for a name known to exist, without its per-level checks: several times faster,
    which shows on every prune of a model with hundreds of layers."""
    for part in name.split("."):
        root = root._modules[part]
    return root


def _check_plain_base(base_model: nn.Module) -> None:
    """A clear error when ``base_model`` is an ACIP model or already holds ACIP layers: they would nest."""
    if getattr(getattr(base_model, "config", None), "model_type", None) == ACIPConfig.model_type:
        raise TypeError("base_model is already an ACIP model; pass the plain causal LM it was built from")
    for name, module in base_model.named_modules():
        if isinstance(module, (LowRankLinear, AlignedLowRankLinear)):
            raise ValueError(
                f"base_model already holds ACIP layers ({type(module).__name__} at {name!r}); pass a plain causal LM, "
                "or wrap layers built by acip.parametrize with ACIPModel.from_parametrized_base"
            )


def find_target_modules(
    base_model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
) -> list[str]:
    """Names of the linear layers of ``base_model`` to parametrize: ``"all-linear"`` (every nn.Linear but the output
    head), a regex matched against whole names, or a list of names / name suffixes; minus ``exclude_modules``.
    Each must be a plain float nn.Linear with finite weights (checked unless on the meta device)."""
    _check_plain_base(base_model)
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    names = []
    for name, module in base_model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if target_modules != "all-linear" and not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if type(module) is not nn.Linear or not module.weight.is_floating_point():
            raise ValueError(
                f"base_model's target module {name!r} is a {type(module).__name__}; ACIP parametrizes plain float "
                "nn.Linear layers (load the base model unquantized and without adapters)"
            )
        if not module.weight.is_meta and not bool(torch.isfinite(module.weight).all()):
            raise ValueError(f"base_model's target module {name!r} has NaN or infinite weights")
        names.append(name)
    if not names:
        raise ValueError(
            f"no linear layer of the base model matches target_modules={target_modules!r} "
            f"(exclude_modules={exclude_modules!r}); the output head is never a target"
        )
    return names


def _parametrized_layers(base_model: nn.Module) -> tuple[list[str], float, tuple[int, float]]:
    """The names of the SVDLinear layers of a base model built by the package, in module order, their common mask
    constant and their common correction (rank, ramp; (0, 0.0) without); a clear error for an ACIP model, compressed
    layers, none at all, or mixed constants or corrections."""
    if getattr(getattr(base_model, "config", None), "model_type", None) == ACIPConfig.model_type:
        raise TypeError("base_model is already an ACIP model; pass the causal LM whose layers were parametrized")
    layers = {n: m for n, m in base_model.named_modules() if isinstance(m, (LowRankLinear, AlignedLowRankLinear))}
    constants = {m.mask_constant for m in layers.values() if isinstance(m, SVDLinear)}
    if not layers or len(constants) != 1 or not all(isinstance(m, SVDLinear) for m in layers.values()):
        raise ValueError("base_model must hold SVDLinear layers (no compressed ones), all of one mask_constant")
    corrections = {(0, 0.0) if m.correction is None else (m.correction.sv_a.shape[0], m.correction.ramp)
                   for m in layers.values()}  # fmt: skip
    if len(corrections) != 1:
        raise ValueError("base_model's SVDLinear layers must all have corrections of one rank and ramp, or none")
    return list(layers), constants.pop(), corrections.pop()


def _checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a local checkpoint folder (one file, or the shards its index names)."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        return []
    try:
        with open(index) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{index} is not a valid safetensors index (truncated or damaged?)") from error
    return [os.path.join(folder, shard) for shard in sorted(shards)]


def _check_complete(folder: str) -> None:
    """A clear error naming the file when a local checkpoint file is truncated or damaged (safetensors' own error
    names none). Hub downloads are checked by huggingface_hub."""
    for path in _checkpoint_files(folder) if os.path.isdir(folder) else []:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a complete safetensors file ({os.path.getsize(path):,} bytes; {error}): it was "
                "truncated or damaged, copy or download it again"
            ) from error


class ACIPPreTrainedModel(PreTrainedModel):
    """Shared settings of ACIP models: config class, capability flags, weight init of the ACIP layers."""

    config_class = ACIPConfig
    base_model_prefix = "acip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Loading with dtype=bf16/fp16 must not round masks and scores: the ranking depends on their float32 values.
    _keep_in_fp32_modules_strict = ["mask", "score"]


class ACIPModel(ACIPPreTrainedModel, GenerationMixin):
    """A causal LM whose linear layers are SVD-parametrized for ACIP; behaves exactly as the base causal LM.

    The base LM lives in ``self.model``. Build one from a loaded base model with :meth:`from_base_model`, or load a
    saved one with ``from_pretrained``. Then: :meth:`prune_model_by_score` (revertible), :meth:`compress`
    (physically small), :meth:`quantize` (4-bit), and use it as any transformers causal LM.
    """

    def __init__(self, config: ACIPConfig):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("ACIPConfig.text_config is missing: an ACIP model needs the config of its base model")
        self.model = AutoModelForCausalLM.from_config(config.text_config)
        for name in config.target_modules:
            self.model.set_submodule(name, self._empty_layer(name, self.model.get_submodule(name)))
        build_fused(self.model, config.fused_groups)
        self.planned_quant_type = None  # what the last prune_model_by_score(memory_budget, dtype="auto") chose
        if config.int_quantization is not None:
            quantized = config.int_quantization
            head = quantized["head"]  # None in models quantized before heads were
            types = dict.fromkeys(quantized["modules"], quantized["quant_type"])
            if head is not None:
                types[head] = HEAD_TYPE
            for name, quant_type in types.items():
                linear = self.model.get_submodule(name)
                self.model.set_submodule(name, IntLinear(linear.in_features, linear.out_features, linear.bias is not
                                         None, quant_type, device=linear.weight.device, dtype=linear.weight.dtype))
            if quantized["tied_embedding"]:
                embedding = self.model.get_input_embeddings()
                self.model.set_input_embeddings(TiedIntEmbedding(self.model.get_submodule(head),
                                                                 embedding.weight.dtype))  # fmt: skip
        self.post_init()

    def _empty_layer(self, name: str, linear: nn.Linear) -> nn.Module:
        """The ACIP layer that config.json says stands at ``name``, with the dense layer's shapes, unfilled."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"target module {name!r} of the base model is a {type(linear).__name__}, not nn.Linear")
        shape = dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        if not self.config.compressed:
            config = self.config
            return SVDLinear(**shape, mask_constant=config.mask_constant, correction_rank=config.correction_rank,
                             correction_ramp=config.correction_ramp, lora_rank=config.lora_rank, **like)  # fmt: skip
        if name in self.config.dense_modules:
            return nn.Linear(**shape, **like)
        # quantize() to 4 bits stores a compressed model's factors as balanced plain pairs (int_quantization's
        # "factors" is how int4 models recorded it before balanced_factors)
        plain = self.config.balanced_factors or (self.config.int_quantization or {}).get("factors", False)
        factors = AlignedLowRankLinear if self.config.rank_cost == "aligned" and not plain else LowRankLinear
        return factors(**shape, rank=self.config.layer_ranks[name], **like)

    @classmethod
    @torch.no_grad()
    def from_base_model(
        cls,
        base_model: PreTrainedModel,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        mask_constant: float = 2e-2,
        rank_cost: str = "aligned",
    ) -> "ACIPModel":
        """Wrap a loaded causal LM, its target linear layers replaced by SVD-parametrized ones (plain SVD of each
        weight). Every layer is checked and converted before any is swapped in, so a failure leaves ``base_model``
        exactly as it was. At ratio 1.0 the result computes what the base model did. ``rank_cost`` is the cost
        rule sizes are counted by (see ACIPConfig). For the whitened basis and a memory-lean build of large models,
        use ``acip.parametrize``."""
        check_rank_cost(rank_cost)
        names = find_target_modules(base_model, target_modules, exclude_modules)
        layers = {name: SVDLinear.from_linear(base_model.get_submodule(name), mask_constant) for name in names}
        for name, layer in layers.items():
            base_model.set_submodule(name, layer)
        return cls.from_parametrized_base(base_model, rank_cost=rank_cost)

    @classmethod
    def from_parametrized_base(cls, base_model: PreTrainedModel, basis: str = "weight",
                               rank_cost: str = "aligned") -> "ACIPModel":  # fmt: skip
        """Wrap a base causal LM whose target layers are already SVDLinear (built with ``SVDLinear.from_svd``):
        the targets are those layers in module order, the mask constant theirs, ``basis`` as they were built,
        sizes counted by ``rank_cost``."""
        names, mask_constant, (correction_rank, correction_ramp) = _parametrized_layers(base_model)
        config = ACIPConfig(text_config=base_model.config, target_modules=names, mask_constant=mask_constant,
                            base_model_name_or_path=getattr(base_model, "name_or_path", None) or None, basis=basis,
                            rank_cost=rank_cost, correction_rank=correction_rank,
                            correction_ramp=correction_ramp)  # fmt: skip
        # The targets are plain float layers now, so a quantization record of the base model (e.g. the GGUF file it
        # was de-quantized from) no longer describes the weights; kept, it would mark reloads as quantized.
        if getattr(base_model.config, "quantization_config", None) is not None:
            del base_model.config.quantization_config
        with torch.device("meta"):  # the structure only: the base model's own modules are put in below
            model = cls(config)
        model.model = base_model
        model.generation_config = base_model.generation_config
        return model.train(base_model.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved ACIP model; a checkpoint lacking or mismatching any tensor is an error, never re-initialised."""
        want_info = kwargs.pop("output_loading_info", False)
        _check_complete(os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder", "")))
        kwargs["ignore_mismatched_sizes"] = True  # a mismatch is reported below by key, not raised mid-load
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        _check_loaded(model, info)
        keep_4bit_cpu_path_safe(model)
        for module in model.modules():
            if isinstance(module, IntLinear):
                module.settle_loaded()
        if model.config.fused_groups:
            settle_loaded(model)  # loaded weights are contiguous: lay them out for this dtype and device
        return (model, info) if want_info else model

    def get_input_embeddings(self):
        """The base LM's input embeddings."""
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        """Replace the base LM's input embeddings."""
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        """The base LM's output head."""
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value):
        """Replace the base LM's output head."""
        self.model.set_output_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, logits_to_keep=0,
                **kwargs):  # fmt: skip
        """The base causal LM's forward pass (same arguments, same outputs)."""
        # The KV cache is not named here: transformers 5.25 renamed past_key_values to cache, and passing the name
        # this version does not use (even as None) warns on every step; whichever the caller gave goes through.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          labels=labels, logits_to_keep=logits_to_keep, **kwargs)  # fmt: skip

    def acip_layers(self) -> dict[str, nn.Module]:
        """The target layers by name (relative to the base LM): SVDLinear before compress, after it LowRankLinear or
        nn.Linear (possibly 4-bit)."""
        return {name: _submodule(self.model, name) for name in self.config.target_modules}

    def _prunable_layers(self) -> dict[str, SVDLinear]:
        """The SVD layers, or a clear error once the model has been compressed."""
        if self.config.compressed:
            raise RuntimeError(
                "this model is compressed: its pruned ranks are gone, so it can no longer be pruned or re-scored. "
                "Reload the full ACIP model to choose another size"
            )
        return self.acip_layers()

    @property
    def score_map(self) -> dict[str, torch.Tensor]:
        """Layer name -> float32 score per singular value (the live buffers). Assign a dict to replace scores."""
        return {name: layer.score for name, layer in self._prunable_layers().items()}

    @score_map.setter
    def score_map(self, scores: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(scores, Mapping):
            raise TypeError(f"score_map must be a dict of layer name -> scores, got {type(scores).__name__}")
        layers = self._prunable_layers()
        unknown = [name for name in scores if name not in layers]
        if unknown:
            raise KeyError(f"score_map has no layer {unknown[0]!r}; layers are named as in model.score_map")
        checked = {name: check_scores(name, s, layers[name].score.shape) for name, s in scores.items()}
        for name, score in checked.items():  # written only once every entry passed
            layers[name].score.copy_(score)

    def get_num_params(self, full: bool = False) -> int:
        """Parameters after compression at the current pruning state: target layers only, or the whole model."""
        current = sum(_layer_num_params(layer, self.config.rank_cost) for layer in self.acip_layers().values())
        return current + _outside_num_params(self, full)

    def get_size_ratio(self, full: bool = False) -> float:
        """Size after compression at the current pruning state / original size: over the target layers (the
        literature's convention), or over the whole model with ``full=True``."""
        return self.get_num_params(full) / (_dense_num_params(self) + _outside_num_params(self, full))

    def compressed_bytes(self, dtype: torch.dtype | str | None = None) -> int:
        """Bytes of parameters and buffers the model will hold after ``compress()`` at the current pruning state
        (tied weights once); with ``dtype`` after ``.to(dtype)``, or with "nf4"/"fp4" after ``quantize()``
        (4-bit weights, their quantization constants, everything else as it is)."""
        storage, rule = _storage(self, dtype), self.config.rank_cost
        layers = self._prunable_layers().values()
        weights = sum(layer_bytes(stored_rank(int(m.kept.sum()), m.in_features, m.out_features, m.lora_rank),
                                  m.in_features, m.out_features, storage, rule) for m in layers)  # fmt: skip
        return _fixed_bytes(self, storage) + weights

    @torch.no_grad()
    def prune_model_by_score(self, compression_ratio: float | None = None, *, size_ratio: float | None = None,
                             full: bool = False, memory_budget: int | str | None = None,
                             dtype: torch.dtype | str | None = None, rank_multiple: int = 1,
                             compression_rate: float | None = None) -> "ACIPModel":  # fmt: skip
        """Keep the globally highest-scoring singular values so that the size ratio is the smallest one ≥ the target
        (within one rank), or so that the model is the largest that fits ``memory_budget``. Revertible and nested:
        call again with any target. Returns the model.

        Args:
            compression_ratio: fraction of parameters to keep, in [0, 1] (1.0 = no compression).
            size_ratio: the same, by the name the original ACIP code uses; pass one of the two.
            full: count the whole model instead of the parametrized layers only.
            memory_budget: instead of a ratio, bytes the compressed model may hold (int, or "300MB", "1.5GiB"):
                the whole model's parameters and buffers, see :meth:`compressed_bytes`.
            dtype: with ``memory_budget``, the storage to count: a torch dtype, a quant type of quantize(), None
                for the current one, or "auto": the pair of size and quantization the quality-per-byte frontier
                favours (int8 where it keeps a size ratio of at least AUTO_INT8_RATIO, else int4), then
                ``compress().quantize("auto")`` quantizes as planned.
            rank_multiple: round each layer's kept rank up to a multiple of this (e.g. 8, 16, 64: aligned shapes for
                kernels that prefer them); the plan is still the smallest ≥ the target (the largest within a budget).
            compression_rate: the fraction of parameters to remove, 1 − compression_ratio (the original ACIP code's
                other name); pass one of the three.
        """
        if dtype == AUTO and is_quantized(self):
            raise ValueError("dtype='auto' chooses how to quantize: this model is quantized already; leave dtype out")
        plan, storage = _plan(self, compression_ratio, size_ratio, full, memory_budget, dtype, rank_multiple,
                              compression_rate)  # fmt: skip
        for layer, kept in zip(self._prunable_layers().values(), plan):
            layer.set_kept(kept)
        self.planned_quant_type = storage if dtype == AUTO else None
        return self

    @torch.no_grad()
    def compress(self) -> "ACIPModel":
        """Commit to the current pruning: every layer keeps only its kept ranks, stored as the model's cost rule
        prices them (``config.rank_cost``: gauge-aligned, or two plain factors), or back to a dense nn.Linear where
        the rule stores it dense. Memory really shrinks; not revertible. Returns the model."""
        layers = self._prunable_layers()
        if any(type(layer.sv) is not nn.Linear or type(layer.u) is not nn.Linear for layer in layers.values()):
            raise RuntimeError(
                "compress() needs plain factor layers: merge LoRA adapters first (peft merge_and_unload) and "
                "compress before quantize()"
            )
        small = {name: layer.compressed(self.config.rank_cost) for name, layer in layers.items()}
        for name, layer in small.items():
            self.model.set_submodule(name, layer)
        self.config.layer_ranks = {n: m.rank for n, m in small.items() if type(m) is not nn.Linear}
        self.config.dense_modules = [n for n, m in small.items() if type(m) is nn.Linear]
        self.config.compressed = True
        return self

    @torch.no_grad()
    def fuse(self, layout: str = "auto") -> "ACIPModel":
        """Inference form of a compressed model (see fusing.py): layers that read one input share one matmul, weights
        laid out as kernels prefer (``layout="contiguous"`` before torch.compile); same outputs. Before quantize();
        saves and reloads fused. Returns the model."""
        fuse_model(self, layout)
        return self

    @torch.no_grad()
    def unfuse(self) -> "ACIPModel":
        """Back from :meth:`fuse` to the compressed form, exactly (e.g. to fine-tune with peft). Returns the model."""
        unfuse_model(self)
        return self

    @torch.no_grad()
    def quantize(self, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                 calibration=None) -> "ACIPModel":
        """Quantize every linear layer of the base LM (the factor layers and the dense ones); the output head stays
        as it is with "nf4"/"fp4" and turns int8 with "int8"/"int4" (an embedding tied to it then reads its int8
        rows, so the table is stored once, in int8). Returns the model.

        Args:
            quant_type: "auto": as the last ``prune_model_by_score(memory_budget=..., dtype="auto")`` planned;
                "nf4" or "fp4": bitsandbytes 4-bit, matmuls in ``compute_dtype`` (default: the model's
                dtype), CPU and CUDA; or "int8" / "int4": weight-only integers computed with torch's own CPU kernels
                (bfloat16 activations; faster than float32 matmuls on a CPU; elsewhere dequantized per call), see
                quantization.py. A fused model (:meth:`fuse`) quantizes its fused matmuls.
            compute_dtype: for "nf4"/"fp4" only.
            calibration: for "int4" on a compressed model: token ids (a (B, T) tensor, or a list of them) whose
                activations guide the rounding (GPTQ: each layer's output error on such inputs is kept small, not each
                weight's; a few thousand tokens of ordinary text do, e.g. ``acip.data.load_blocks``); None rounds
                every weight to nearest. Measured on the quick preset's SmolLM2: see docs/quantization.md.
        """
        if quant_type == AUTO:
            if self.planned_quant_type is None:
                raise ValueError("quant_type='auto' quantizes as prune_model_by_score(memory_budget=..., "
                                 "dtype='auto') planned: plan first, or name a quant type")  # fmt: skip
            quant_type = self.planned_quant_type
            calibration = calibration if quant_type == "int4" else None  # only int4 rounds by calibration
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES} or 'auto', got {quant_type!r}")
        if is_quantized(self):
            raise RuntimeError("this model is already quantized: quantize() a model once (reload the unquantized "
                               "model to choose another quant_type)")  # fmt: skip
        if calibration is not None:
            calibration = _check_calibration(calibration, self.config)
            if quant_type != "int4" or not self.config.compressed:
                state = "compressed" if self.config.compressed else "prunable"
                raise ValueError("calibration applies to quantize('int4') of a compressed model, got "
                                 f"quant_type={quant_type!r} on a {state} model")  # fmt: skip
        if quant_type in INT_TYPES and compute_dtype is not None:
            raise ValueError(f"compute_dtype applies to {BNB_TYPES} only; quant_type={quant_type!r} computes in "
                             "bfloat16 with torch's kernels")  # fmt: skip
        if quant_type in INT_TYPES:
            self._quantize_int(quant_type, calibration)
            return self
        compute_dtype = compute_dtype or self.dtype
        if self.config.compressed:  # 4-bit rounding needs the balanced form (see quantization.balanced)
            fused = bool(self.config.fused_groups)
            self._balance_factors()
            if fused:
                self.fuse()
        head = self.model.get_output_embeddings()
        targets = [(n, m) for n, m in self.model.named_modules() if type(m) is nn.Linear and m is not head]
        for name, linear in targets:
            self.model.set_submodule(name, to_4bit(linear, quant_type, compute_dtype))
        self.config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=[f"model.{name}" for name, module in self.model.named_modules() if module is head],
        )
        return self

    def _quantize_int(self, quant_type: str, calibration: list[torch.Tensor] | None = None) -> None:
        """quantize("int8"/"int4"): for int4, a compressed model's factor pairs balanced first (see
        quantization.balanced; a fused model is unfused for it and fused again), then every linear layer but the head
        quantized, and the head in int8. int8 keeps the pairs as they are: its rounding is fine enough for the
        aligned pair (perplexity of the quick preset at 0.5 within 1% of float16, measured), which stores fewer
        weights."""
        config, fused = self.config, bool(self.config.fused_groups)
        for name, layer in self.acip_layers().items():  # checked before anything changes (fused members too)
            _check_plain_layers(name, layer)
        rebalance = config.compressed and quant_type == "int4"
        moments, rounded = {}, {}  # rounded: int4 roundings (gptq_int4's output) made already, by module name
        if rebalance:
            pairs = self._balance_factors()
            # unfused, every factor is a module of its own: its inputs can be observed (a fused model's are not)
            # wanted: the input sides and the untargeted layers (an output factor's moment is computed from its input
            # side's, below, and the head is rounded to nearest)
            wanted = {n for n, m in self.model.named_modules() if type(m) is nn.Linear} - {f"{n}.u" for n in pairs}
            moments = input_moments(self.model, calibration, wanted) if calibration is not None else {}
            for name, layer in pairs.items():  # each input side GPTQ-rounded once, here; output factors refitted
                side = name if type(layer) is nn.Linear else f"{name}.sv"
                if side in moments and (type(layer) is nn.Linear or layer.rank):
                    weight = _submodule(self.model, side).weight
                    rounded[side] = gptq_int4(weight, moments[side].to(weight.device))
                    if side != name:  # the output factor makes up for its input factor's rounding
                        moments[f"{name}.u"] = refit_output_factor(layer, moments[side], rounded[side])
            if fused:
                self.fuse()
                for group in config.fused_groups:  # the shared matmul's rows are its members' input sides
                    sides = {m if type(pairs[m]) is nn.Linear else f"{m}.sv": pairs[m] for m in group}
                    if all(side in rounded for side in sides):
                        rounded[f"{group[0]}.shared.proj"] = stack_rounded([(*rounded[side], m.out_features if type(
                            m) is nn.Linear else m.rank) for side, m in sides.items()])  # fmt: skip
        head = self.model.get_output_embeddings()
        targets = [(n, m) for n, m in self.model.named_modules() if type(m) is nn.Linear and m is not head]
        small = {n: IntLinear.from_linear(m, quant_type, _moment_of(n, moments), rounded.get(n)) for n, m in targets
                 if m.in_features and m.out_features}  # fmt: skip
        for name, layer in small.items():
            self.model.set_submodule(name, layer)
        config.int_quantization = {"quant_type": quant_type, "modules": list(small), "factors": rebalance}
        if type(head) is nn.Linear:
            self._quantize_head(head)

    def _balance_factors(self) -> dict[str, nn.Module]:
        """Rewrite every compressed layer as balanced plain factors (or dense where those would not be smaller; see
        quantization.balanced), recorded in the config; a fused model is unfused for it and left so (the caller fuses
        it again). Returns the new layers by name."""
        config = self.config
        for name, layer in self.acip_layers().items():  # checked before anything changes
            _check_plain_layers(name, layer)
        if config.fused_groups:
            self.unfuse()
        pairs = {name: balanced(layer) for name, layer in self.acip_layers().items()}
        for name, layer in pairs.items():
            self.model.set_submodule(name, layer)
        config.layer_ranks = {n: m.rank for n, m in pairs.items() if type(m) is not nn.Linear}
        config.dense_modules = [n for n, m in pairs.items() if type(m) is nn.Linear]
        config.balanced_factors = True
        return pairs

    def _quantize_head(self, head: nn.Linear) -> None:
        """The output head in int8 (see quantization.HEAD_TYPE); a tied input embedding then reads its rows."""
        name = next(n for n, m in self.model.named_modules() if m is head)
        embedding = self.model.get_input_embeddings()
        tied = getattr(embedding, "weight", None) is head.weight
        small = IntLinear.from_linear(head, HEAD_TYPE)
        self.model.set_submodule(name, small)
        if tied:
            self.model.set_input_embeddings(TiedIntEmbedding(small, head.weight.dtype))
            # the base model must not tie (or expect) float weights when it is rebuilt from config.json
            self.config.text_config.tie_word_embeddings = self.model.config.tie_word_embeddings = False
        self.config.int_quantization.update(head=name, tied_embedding=tied)


def _check_calibration(calibration, config) -> list[torch.Tensor]:
    """``calibration`` as a list of (B, T) token id tensors, or a clear error."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    vocab = config.text_config.vocab_size
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int) or \
                not ids.numel() or int(ids.min()) < 0 or int(ids.max()) >= vocab:  # fmt: skip
            raise ValueError(f"calibration must be (B, T) integer token ids in [0, {vocab}) or a list of them, got "
                             f"{ids if not isinstance(ids, torch.Tensor) else (ids.dtype, tuple(ids.shape))!r}")
    return batches


def _moment_of(name: str, moments: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The input moment of the fused or unfused linear layer ``name`` from those observed on the unfused model: a
    fused group's shared matmul sees its first member's input."""
    if name.endswith(".shared.proj"):
        member = name[: -len(".shared.proj")]
        return moments.get(f"{member}.sv", moments.get(member))
    return moments.get(name)


def _check_plain_layers(name: str, layer: nn.Module) -> None:
    """A clear error for a target layer holding adapters (peft) or other non-plain linear children."""
    for child_name, child in layer.named_modules():
        if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
            raise RuntimeError(f"{name!r} holds a {type(child).__name__} at {child_name!r}: quantize() needs plain "
                               "layers; merge LoRA adapters (merge_and_unload) first")  # fmt: skip


def is_quantized(model: "ACIPModel") -> bool:
    """Whether ``quantize()`` has run on the model (any quant type)."""
    return getattr(model.config, "quantization_config", None) is not None or model.config.int_quantization is not None


def quant_type_of(model: "ACIPModel") -> str | None:
    """The quant type the model is stored in, or None when it is not quantized."""
    if model.config.int_quantization is not None:
        return model.config.int_quantization["quant_type"]
    quantization = getattr(model.config, "quantization_config", None)
    return None if quantization is None else quantization.bnb_4bit_quant_type


def _check_loaded(model: "ACIPModel", info: dict) -> None:
    """A clear error for a loaded checkpoint that lacks or mismatches a tensor (transformers would have filled it with
    fresh weights), or whose config.json mask_constant is not the one its factors were built with."""
    bad = sorted(info["missing_keys"]) + sorted(str(key[0]) for key in info["mismatched_keys"])
    if bad:
        raise ValueError(
            "the checkpoint's tensors do not match the shapes config.json gives (per-layer ranks, targets); "
            f"missing or mismatched tensors: {bad[:8]}{' ...' if len(bad) > 8 else ''}"
        )
    if not model.config.compressed:
        _check_mask_constant(model)


def _check_mask_constant(model: "ACIPModel") -> None:
    """The factors hold U / c for the c they were built with; a live mask entry holds that c. A different
    mask_constant in config.json would silently rescale every layer's output."""
    expected = torch.tensor(model.config.mask_constant, dtype=torch.float32)
    for name, layer in model.acip_layers().items():
        mask = layer.mask.detach()
        wrong = mask[(mask > 0) & (mask != expected.to(mask.device))] if not mask.is_meta else mask[:0]
        if wrong.numel():
            raise ValueError(
                f"config.json gives mask_constant={model.config.mask_constant}, but the live masks of {name!r} "
                f"hold {float(wrong[0])}: the factors were built for that constant. Restore mask_constant in "
                "config.json (and reset masks trained to other values with prune_model_by_score(1.0) before saving)"
            )


def _layer_num_params(layer: nn.Module, rule: str) -> int:
    """Parameters of a target layer once compressed (an SVD layer at its current mask, under cost ``rule``), or as
    stored now (any compressed form, 4-bit included: its logical weights)."""
    if isinstance(layer, SVDLinear):
        return layer.num_params(rule)
    if isinstance(layer, (LowRankLinear, AlignedLowRankLinear, FusedLinear)):
        return layer.num_params()
    return linear_num_params(layer)


def _outside_num_params(model: "ACIPModel", full: bool) -> int:
    """With ``full``: parameters outside the target layers (embeddings, norms, head, untargeted layers), tied ones
    once; else 0."""
    if not isinstance(full, bool):
        raise TypeError(f"full must be True or False, got {full!r}")
    if not full:
        return 0
    layers = model.acip_layers().values()
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [p for p in model.model.parameters() if id(p) not in inside]
    states = [getattr(p, "quant_state", None) for p in outside]  # 4-bit storage is packed: count logical weights
    within = {id(m) for layer in layers for m in layer.modules()}
    integers = [m for m in model.model.modules() if isinstance(m, IntLinear) and id(m) not in within]  # buffers
    return sum(p.numel() if state is None else state.shape.numel() for p, state in zip(outside, states)) + sum(
        m.in_features * m.out_features for m in integers)  # fmt: skip


# With dtype="auto" a memory budget is planned in int8 when int8 keeps at least this size ratio of the target layers,
# else in int4 (twice the ranks in the same bytes): on the quick preset's SmolLM2 int4 at ratio 2r beat int8 at r at
# every budget measured except those where int8 keeps nearly everything (docs/quantization.md, benchmarks/frontier.py).
AUTO_INT8_RATIO = 0.9
AUTO = "auto"


def pruning_plan(model: "ACIPModel", compression_ratio=None, size_ratio=None, full=False, memory_budget=None,
                 dtype=None, rank_multiple=1, compression_rate=None) -> list[torch.Tensor]:
    """The boolean keep mask (k,) per SVD layer (in ``acip_layers`` order) that :meth:`ACIPModel.prune_model_by_score`
    sets for these arguments, without setting it."""
    return _plan(model, compression_ratio, size_ratio, full, memory_budget, dtype, rank_multiple, compression_rate)[0]


def _plan(model, compression_ratio, size_ratio, full, memory_budget, dtype, rank_multiple, compression_rate):
    """:func:`pruning_plan`, and the storage a memory budget was planned in (None for a ratio)."""
    other, selection = _outside_num_params(model, full), model.config.selection
    layers = list(model._prunable_layers().values())
    scores, shapes = [m.score for m in layers], [(m.in_features, m.out_features) for m in layers]
    if memory_budget is not None:
        if compression_ratio is not None or size_ratio is not None or compression_rate is not None:
            raise ValueError("pass either a compression_ratio or a memory_budget, not both")
        rule, extra = model.config.rank_cost, model.config.lora_rank  # a LayerLoRA's ranks are stored too

        def plan_in(storage):
            budget = bytes_budget(memory_budget, _fixed_bytes(model, storage), storage)
            return plan_memory(scores, shapes, budget, storage, rank_multiple, rule, extra, selection)[0]

        if dtype != AUTO:
            storage = _storage(model, dtype)
            return plan_in(storage), storage
        try:
            keep = plan_in("int8")
        except ValueError:  # below what int8 can hold at all
            keep = None
        if keep is not None:
            kept = sum(rank_cost(int(k.sum()), m.in_features, m.out_features, rule) for k, m in zip(keep, layers))
            if kept >= AUTO_INT8_RATIO * sum(m.in_features * m.out_features for m in layers):
                return keep, "int8"
        return plan_in("int4"), "int4"
    if dtype is not None:
        raise ValueError("dtype only applies to memory_budget")
    ratio = check_ratio(compression_ratio, size_ratio, compression_rate)
    total = sum(map(linear_num_params, layers)) + other
    fixed = other + sum(m.out_features for m in layers if m.bias is not None)
    threshold = selection == "threshold"
    budget = ratio_budget(ratio, total, fixed, full, strict=threshold)
    if threshold and ratio == 1.0:  # the original keeps everything at 1.0 (every other target prunes)
        return [torch.ones_like(s, dtype=torch.bool) for s in scores], None
    keep, _ = plan_pruning(scores, shapes, budget, rank_multiple, model.config.rank_cost, selection)
    return keep, None


def _dense_num_params(model: "ACIPModel") -> int:
    """Parameters of the target layers before any compression, biases included."""
    return sum(linear_num_params(layer) for layer in model.acip_layers().values())


def _storage(model: "ACIPModel", dtype) -> torch.dtype | str:
    """How the target layers' weights will be stored: ``dtype`` if given, else as they are now."""
    if dtype is not None:
        return check_storage(dtype)
    quant_type = quant_type_of(model)
    if quant_type is not None:
        return quant_type
    return next(iter(model.acip_layers().values())).u.weight.dtype


def _fixed_bytes(model: "ACIPModel", storage) -> int:
    """Bytes of the compressed model (in ``storage``) that pruning does not change: all but the target weights."""
    layers = model.acip_layers().values()
    inside = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    head = model.model.get_output_embeddings()
    quantized, heads = set(), set()
    if isinstance(storage, str):  # quantize() also turns the untargeted linear layers (not the head) to 4 bits
        quantized = {id(m.weight) for m in model.model.modules() if type(m) is nn.Linear and m is not head}
    if storage in INT_TYPES and type(head) is nn.Linear:  # ... and, for the int types, the head to int8
        heads = {id(head.weight)}
    outside = [t for t in [*model.model.parameters(), *model.model.buffers()] if id(t) not in inside]
    biases = [layer.bias for layer in layers if layer.bias is not None]
    return sum(tensor_bytes(t.numel(), HEAD_TYPE, t.shape[0]) if id(t) in heads else
               stored_bytes(t, storage, id(t) in quantized) for t in outside + biases)  # fmt: skip


# save_pretrained copies the Hub files next to config.json only for classes registered here; config.auto_map
# (set by ACIPConfig) names all three auto classes, since registration records just one.
ACIPConfig.register_for_auto_class()
ACIPModel.register_for_auto_class("AutoModelForCausalLM")
# A model loaded with AutoModel is still a causal LM: registered as one, transformers' text-generation pipeline accepts
# it without logging the list of every supported class (loading through AutoModelForCausalLM registers it too).
AutoModelForCausalLM.register(ACIPConfig, ACIPModel, exist_ok=True)
