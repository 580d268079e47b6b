"""ACIP model: a Hugging Face causal LM whose linear layers are SVD-parametrized, prunable to any size by a global
score map, then compressible and quantizable into an ordinary (smaller) causal LM.

Loads with ``AutoModel.from_pretrained(dir_or_repo, trust_remote_code=True)`` (or ``AutoModelForCausalLM``).
This file is part of the Hub payload: it imports only torch, transformers, optional bitsandbytes, and its two
sibling files.
"""

import ctypes
import math
import numbers
import re
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationMixin, PreTrainedModel

from .configuration_acip import ACIPConfig
from .parametrization import LowRankLinear, SVDLinear, is_dense_rank, linear_num_params, plan_pruning

try:  # optional: only quantize() needs it
    import bitsandbytes as bnb
except ImportError:
    bnb = None

QUANT_TYPES = ("nf4", "fp4")
_QUANT_BLOCK = 64  # bitsandbytes 4-bit: one float32 absmax per block of 64 weights (compress_statistics off)
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def _parse_bytes(value) -> int:
    """A memory size in bytes: an int, or a string such as ``"300MB"`` or ``"1.5 GiB"`` (MB = 10⁶ B, MiB = 2²⁰ B)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if isinstance(value, bool) or match is None or match.group(2) not in _BYTE_UNITS:
            raise ValueError(
                f"memory_budget must be a number of bytes or a string like '300MB' or '1.5GiB' (units: "
                f"{', '.join(u for u in _BYTE_UNITS if u)}), got {value!r}"
            )
        number = int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
    if number <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return number


def _tensor_bytes(numel: int, storage) -> int:
    """Bytes of a weight of ``numel`` values stored as ``storage`` (a torch dtype or a 4-bit quant type)."""
    if storage in QUANT_TYPES:  # two values per byte, plus the float32 absmax of every block
        return (numel + 1) // 2 + 4 * math.ceil(numel / _QUANT_BLOCK)
    return numel * storage.itemsize


try:  # glibc only; elsewhere (macOS, Windows, musl) freed memory is simply left to the allocator
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def _release_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc's malloc_trim).

    Parametrizing frees a dense weight and allocates its factors, layer after layer; glibc keeps freed blocks below
    its (self-raising) mmap threshold in the heap, where fragmentation made peak RSS vary from 1.08x to 1.27x the
    finished model between identical runs. Trimming after every layer keeps it at the live size (1.07x, every run).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _matches(name: str, patterns: str | list[str]) -> bool:
    """peft's convention: a string is a regex that must match the whole name; a list holds names or name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(
    base_model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
) -> list[str]:
    """Names of the linear layers of ``base_model`` to parametrize: ``"all-linear"`` (every nn.Linear but the output
    head), a regex matched against whole names, or a list of names / name suffixes; minus ``exclude_modules``."""
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    names = []
    for name, module in base_model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if target_modules != "all-linear" and not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; ACIP parametrizes plain float nn.Linear layers "
                "(load the base model unquantized and without adapters)"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"no linear layer of the base model matches target_modules={target_modules!r} "
            f"(exclude_modules={exclude_modules!r}); the output head is never a target"
        )
    return names


def _check_ratio(compression_ratio, size_ratio) -> float:
    """The one target ratio given by either name; a clear error for anything that is not a number in [0, 1]."""
    given = {k: v for k, v in (("compression_ratio", compression_ratio), ("size_ratio", size_ratio)) if v is not None}
    if not given:
        raise TypeError("prune_model_by_score() needs compression_ratio (the fraction of parameters kept, in [0, 1])")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, 1] (the fraction of parameters kept), got {value!r}")
        if not (0.0 <= float(value) <= 1.0):  # NaN fails this too
            raise ValueError(f"{name} must be in [0, 1] (the fraction of parameters kept), got {value!r}")
    values = {float(v) for v in given.values()}
    if len(values) > 1:
        raise ValueError(
            f"compression_ratio={compression_ratio!r} and size_ratio={size_ratio!r} disagree; they mean the same "
            "thing (the fraction of parameters kept): pass one"
        )
    return values.pop()


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
        self.post_init()

    def _empty_layer(self, name: str, linear: nn.Linear) -> nn.Module:
        """The ACIP layer that config.json says stands at ``name``, with the dense layer's shapes, unfilled."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"target module {name!r} of the base model is a {type(linear).__name__}, not nn.Linear")
        shape = dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        if not self.config.compressed:
            return SVDLinear(**shape, mask_constant=self.config.mask_constant, **like)
        if name in self.config.dense_modules:
            return nn.Linear(**shape, **like)
        return LowRankLinear(**shape, rank=self.config.layer_ranks[name], **like)

    # ---------------------------------------------------------------------------------------------------------------
    # Construction and loading
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_base_model(
        cls,
        base_model: PreTrainedModel,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        mask_constant: float = 2e-2,
        whitening: Callable[[str], torch.Tensor] | None = None,
    ) -> "ACIPModel":
        """Wrap a loaded causal LM, replacing its target linear layers by SVD-parametrized ones in place (one layer at
        a time, in module order, on the layer's device). At ratio 1.0 the result computes what the base model did.

        ``whitening`` selects the whitened basis: called with each target's name (after every earlier target was
        replaced), it returns the layer's lower-triangular input Gram factor L (see ``SVDLinear.from_linear``);
        ``acip.whitening`` computes it from calibration text, one decoder block at a time. None: the weight's SVD.
        """
        names = find_target_modules(base_model, target_modules, exclude_modules)
        # The targets are plain float layers (checked above), so any quantization record of the base model (e.g. the
        # GGUF file it was de-quantized from) no longer describes the weights; kept, it would mark reloads as quantized.
        if getattr(base_model.config, "quantization_config", None) is not None:
            del base_model.config.quantization_config
        config = ACIPConfig(
            text_config=base_model.config,
            target_modules=names,
            mask_constant=mask_constant,
            base_model_name_or_path=getattr(base_model, "name_or_path", None) or None,
            basis="weight" if whitening is None else "whitened",
        )
        with torch.device("meta"):  # the structure only: the base model's own modules are put in below
            model = cls(config)
        model.model = base_model
        model.generation_config = base_model.generation_config
        for name in names:
            dense = base_model.get_submodule(name)
            factor = whitening(name) if whitening is not None else None
            base_model.set_submodule(name, SVDLinear.from_linear(dense, mask_constant, whitening=factor))
            del factor
            del dense  # free each dense weight as soon as its factors exist
            _release_freed_memory()
        model.train(base_model.training)
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load a saved ACIP model; a checkpoint lacking or mismatching any tensor is an error, never re-initialised."""
        want_info = kwargs.pop("output_loading_info", False)
        mismatch = "the checkpoint's tensors do not match the shapes config.json gives (per-layer ranks, targets)"
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "mismatch" in str(error) or "ignore_mismatched_sizes" in str(error):
                raise ValueError(f"{mismatch}; see the load report above") from error
            raise
        bad = sorted(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
        if bad:
            raise ValueError(f"{mismatch}; missing or mismatched tensors: {bad[:8]}{' ...' if len(bad) > 8 else ''}")
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False  # see _to_4bit
        return (model, info) if want_info else model

    # ---------------------------------------------------------------------------------------------------------------
    # The causal LM interface, delegated
    # ---------------------------------------------------------------------------------------------------------------

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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """The base causal LM's forward pass (same arguments, same outputs)."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    # ---------------------------------------------------------------------------------------------------------------
    # ACIP layers, sizes and the score map
    # ---------------------------------------------------------------------------------------------------------------

    def acip_layers(self) -> dict[str, nn.Module]:
        """The target layers by name (relative to the base LM): SVDLinear before compress, after it LowRankLinear or
        nn.Linear (possibly 4-bit)."""
        return {name: self.model.get_submodule(name) for name in self.config.target_modules}

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
    def score_map(self, scores: dict[str, torch.Tensor]) -> None:
        layers = self._prunable_layers()
        checked = {}
        for name, score in scores.items():  # check everything before writing anything
            if name not in layers:
                raise KeyError(f"score_map has no layer {name!r}; layers are named as in model.score_map")
            score = torch.as_tensor(score).detach()
            if score.shape != layers[name].score.shape:
                raise ValueError(f"score_map[{name!r}] must have shape {tuple(layers[name].score.shape)}")
            if torch.isnan(score).any():
                raise ValueError(f"score_map[{name!r}] contains NaN")
            checked[name] = score
        for name, score in checked.items():
            layers[name].score.copy_(score.float())

    def _other_num_params(self) -> int:
        """Parameters outside the target layers (embeddings, norms, head, untargeted layers), tied ones once."""
        inside = {id(p) for layer in self.acip_layers().values() for p in layer.parameters()}
        total = 0
        for p in self.model.parameters():
            if id(p) not in inside:
                state = getattr(p, "quant_state", None)  # 4-bit storage is packed; count the logical weights
                total += state.shape.numel() if state is not None else p.numel()
        return total

    def _original_num_params(self) -> int:
        """Parameters of the target layers before any compression, biases included."""
        return sum(linear_num_params(layer) for layer in self.acip_layers().values())

    def get_num_params(self, full: bool = False) -> int:
        """Parameters after compression at the current pruning state: target layers only, or the whole model."""
        current = 0
        for layer in self.acip_layers().values():
            current += layer.num_params() if isinstance(layer, LowRankLinear) else linear_num_params(layer)
        return current + (self._other_num_params() if full else 0)

    def get_size_ratio(self, full: bool = False) -> float:
        """Size after compression at the current pruning state / original size: over the target layers (the
        literature's convention), or over the whole model with ``full=True``."""
        other = self._other_num_params() if full else 0
        return self.get_num_params(full) / (self._original_num_params() + other)

    def _storage(self, dtype) -> torch.dtype | str:
        """How the target layers' weights will be stored: ``dtype`` if given (a torch dtype, or "nf4"/"fp4"),
        else as they are now."""
        if dtype is None:
            quantization = getattr(self.config, "quantization_config", None)
            if quantization is not None:
                return quantization.bnb_4bit_quant_type
            return next(iter(self.acip_layers().values())).u.weight.dtype
        if dtype in QUANT_TYPES or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
        raise ValueError(f"dtype must be a floating torch dtype or one of {QUANT_TYPES}, got {dtype!r}")

    def _other_bytes(self, storage) -> int:
        """Bytes of everything but the target layers after compress() (and quantize() for a 4-bit storage)."""
        layers = self.acip_layers().values()
        inside = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
        head = self.model.get_output_embeddings()
        quantized = set()
        if storage in QUANT_TYPES:  # quantize() also turns the untargeted linear layers (not the head) to 4 bits
            quantized = {id(m.weight) for m in self.model.modules() if type(m) is nn.Linear and m is not head}
        total = 0
        for tensor in [*self.model.parameters(), *self.model.buffers()]:  # tied weights appear once
            if id(tensor) in inside:
                continue
            if id(tensor) in quantized:
                total += _tensor_bytes(tensor.numel(), storage)
            elif tensor.is_floating_point() and isinstance(storage, torch.dtype):
                total += tensor.numel() * storage.itemsize  # model.to(dtype) converts every float tensor
            else:
                total += tensor.numel() * tensor.element_size()
        return total

    def _layer_bytes(self, layer: SVDLinear, rank: int, storage) -> int:
        """Bytes of one target layer compressed to ``rank`` (dense when factors would not be smaller)."""
        if is_dense_rank(rank, layer.in_features, layer.out_features):
            weights = _tensor_bytes(layer.in_features * layer.out_features, storage)
        else:
            weights = sum(_tensor_bytes(rank * n, storage) for n in (layer.in_features, layer.out_features))
        bias = layer.bias
        if bias is None:
            return weights
        return weights + bias.numel() * (storage.itemsize if isinstance(storage, torch.dtype) else bias.element_size())

    def _target_bytes(self, layers: list[SVDLinear], keep: list[torch.Tensor], storage) -> int:
        """Bytes of the target layers compressed to the kept ranks ``keep`` (one boolean mask per layer)."""
        return sum(self._layer_bytes(layer, int(kept.sum()), storage) for layer, kept in zip(layers, keep))

    def compressed_bytes(self, dtype: torch.dtype | str | None = None) -> int:
        """Bytes of parameters and buffers the model will hold after ``compress()`` at the current pruning state
        (tied weights once); with ``dtype`` after ``.to(dtype)``, or with "nf4"/"fp4" after ``quantize()``
        (4-bit weights, their quantization constants, everything else as it is)."""
        storage = self._storage(dtype)
        layers = list(self._prunable_layers().values())
        return self._other_bytes(storage) + self._target_bytes(layers, [layer.kept for layer in layers], storage)

    # ---------------------------------------------------------------------------------------------------------------
    # Prune, compress, quantize
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prune_model_by_score(
        self,
        compression_ratio: float | None = None,
        *,
        size_ratio: float | None = None,
        full: bool = False,
        memory_budget: int | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> "ACIPModel":
        """Keep the globally highest-scoring singular values so that the size ratio is the smallest one ≥ the target
        (within one rank), or so that the model is the largest that fits ``memory_budget``. Revertible and nested:
        call again with any target. Returns the model.

        Args:
            compression_ratio: fraction of parameters to keep, in [0, 1] (1.0 = no compression).
            size_ratio: the same, by the name the original ACIP code uses; pass one of the two.
            full: count the whole model instead of the parametrized layers only.
            memory_budget: instead of a ratio, bytes the compressed model may hold (int, or "300MB", "1.5GiB"):
                the whole model's parameters and buffers, see :meth:`compressed_bytes`.
            dtype: with ``memory_budget``, the storage to count: a torch dtype, "nf4"/"fp4" (after quantize()),
                or None for the current one.
        """
        if memory_budget is not None:
            if compression_ratio is not None or size_ratio is not None:
                raise ValueError("pass either a compression_ratio or a memory_budget, not both")
            return self._prune_to_bytes(_parse_bytes(memory_budget), memory_budget, dtype)
        if dtype is not None:
            raise ValueError("dtype only applies to memory_budget")
        ratio = _check_ratio(compression_ratio, size_ratio)
        layers = self._prunable_layers()
        biases = sum(layer.out_features for layer in layers.values() if layer.bias is not None)
        other = self._other_num_params() if full else 0
        target = ratio * (self._original_num_params() + other)  # parameters to reach
        if target < other + biases - 1e-6:
            lowest = (other + biases) / (self._original_num_params() + other)
            raise ValueError(
                f"compression_ratio={ratio} is below what full={full} allows: with the uncompressed parts counted "
                f"the ratio must be in [{lowest:.4f}, 1]"
            )
        scores = [layer.score for layer in layers.values()]
        shapes = [(layer.in_features, layer.out_features) for layer in layers.values()]
        keep, _ = plan_pruning(scores, shapes, math.ceil(target - other - biases - 1e-6))
        for layer, kept in zip(layers.values(), keep):
            layer.set_kept(kept)
        return self

    @torch.no_grad()
    def _prune_to_bytes(self, budget: int, given, dtype) -> "ACIPModel":
        """The largest prefix of the global ranking whose compressed model fits ``budget`` bytes."""
        storage = self._storage(dtype)
        layers = list(self._prunable_layers().values())
        scores = [layer.score for layer in layers]
        shapes = [(layer.in_features, layer.out_features) for layer in layers]
        other = self._other_bytes(storage)

        def plan(weights: int):
            keep, _ = plan_pruning(scores, shapes, weights)
            return keep, other + self._target_bytes(layers, keep, storage)

        keep, smallest = plan(0)
        if smallest > budget:
            raise ValueError(
                f"memory_budget={given!r} ({budget:,} bytes) is below the smallest this model can be in {storage}: "
                f"it must be at least {smallest:,} bytes (every rank pruned; the uncompressed parts remain)"
            )
        # Plans are nested and their bytes grow with the weight budget: bisect for the largest one that fits.
        low, high = 0, sum(i * o for i, o in shapes)
        keep, size = plan(high)
        if size > budget:
            while high - low > 1:
                middle = (low + high) // 2
                if plan(middle)[1] <= budget:
                    low = middle
                else:
                    high = middle
            keep, _ = plan(low)
        for layer, kept in zip(layers, keep):
            layer.set_kept(kept)
        return self

    @torch.no_grad()
    def compress(self) -> "ACIPModel":
        """Commit to the current pruning: slice every layer to its kept ranks, or back to a dense nn.Linear where
        factors would not be smaller. Memory really shrinks; not revertible. Returns the model."""
        layers = self._prunable_layers()
        if any(type(layer.sv) is not nn.Linear or type(layer.u) is not nn.Linear for layer in layers.values()):
            raise RuntimeError(
                "compress() needs plain factor layers: merge LoRA adapters first (peft merge_and_unload) and "
                "compress before quantize()"
            )
        ranks, dense = {}, []
        for name, layer in layers.items():
            small = layer.compressed()
            self.model.set_submodule(name, small)
            if isinstance(small, LowRankLinear):
                ranks[name] = small.rank
            else:
                dense.append(name)
        self.config.compressed = True
        self.config.layer_ranks = ranks
        self.config.dense_modules = dense
        return self

    @torch.no_grad()
    def quantize(self, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> "ACIPModel":
        """Quantize every linear layer of the base LM but the output head to 4 bits with bitsandbytes (the factor
        layers and the dense ones). Works on CPU and CUDA. Returns the model.

        Args:
            quant_type: ``"nf4"`` (default) or ``"fp4"``.
            compute_dtype: dtype of the matmuls; defaults to the model's dtype.
        """
        if bnb is None:
            raise ImportError("quantize() needs bitsandbytes: pip install bitsandbytes")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if getattr(self.config, "quantization_config", None) is not None:
            raise RuntimeError("this model is already quantized")
        compute_dtype = compute_dtype or self.dtype
        head = self.model.get_output_embeddings()
        targets = [
            (name, module)
            for name, module in self.model.named_modules()
            if type(module) is nn.Linear and module is not head
        ]
        for name, linear in targets:
            self.model.set_submodule(name, _to_4bit(linear, quant_type, compute_dtype))
        skip = [name for name, module in self.model.named_modules() if module is head]
        self.config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=[f"model.{name}" for name in skip],
        )
        return self


def _to_4bit(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes 4-bit copy of ``linear``, quantized on the layer's own device."""
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type=quant_type,
        device="meta",
    )
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place on the first no-grad eval forward,
    # after which training forwards lose their input gradient, and the packed path fails when in_features % 64 != 0.
    layer.support_avx512bf16_for_cpu = False
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=False,
        module=layer,
    ).to(device)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


# save_pretrained copies the three Hub files next to config.json only for classes registered here; config.auto_map
# (set by ACIPConfig) names all three auto classes, since registration records just one.
ACIPConfig.register_for_auto_class()
ACIPModel.register_for_auto_class("AutoModelForCausalLM")
