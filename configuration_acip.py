"""Configuration of an ACIP model: the base causal LM's own config plus every number that shapes the ACIP layers.

A checkpoint rebuilds from ``config.json`` alone: the base model's config is nested (``text_config``), the
parametrized layers are listed by name, and a compressed model records the rank of each factorized layer and which
layers went back to dense. Loading never needs the base model's repository.

This file is part of the Hub payload: it imports only transformers.
"""

from transformers import AutoConfig, PretrainedConfig

AUTO_MAP = {
    "AutoConfig": "configuration_acip.ACIPConfig",
    "AutoModel": "modeling_acip.ACIPModel",
    "AutoModelForCausalLM": "modeling_acip.ACIPModel",
}


BASES = ("weight", "whitened")
RANK_COSTS = ("aligned", "factors")  # as pruning.RANK_COSTS (this file imports only transformers)
SELECTIONS = ("ranked", "threshold")  # as pruning.SELECTIONS
INT_TYPES = ("int8", "int4")  # as pruning.INT_TYPES


class ACIPConfig(PretrainedConfig):
    """Configuration for :class:`ACIPModel`: a base causal LM whose linear layers are SVD-parametrized.

    Args:
        text_config: config of the base causal LM (a config object or its dict); named ``text_config`` because
            generation looks the decoder's config up under that name.
        target_modules: names of the parametrized linear layers, relative to the base LM
            (e.g. ``"model.layers.0.self_attn.q_proj"``).
        mask_constant: the value ``c`` of a live mask entry; the output factor holds ``U / c``.
        compressed: whether ``compress()`` has sliced the layers to their kept ranks.
        layer_ranks: for a compressed model, the rank of each target layer that stayed factorized.
        dense_modules: for a compressed model, the target layers stored as dense ``nn.Linear`` again.
        base_model_name_or_path: where the base model came from (informational; never loaded).
        fused_groups: for a fused model (``fuse()``), the groups of target layers that share one input-side matmul,
            each in call order.
        basis: the singular basis the layers were factorized in: ``"weight"`` (SVD of W) or ``"whitened"`` (SVD of
            W·L, L Lᵀ the Gram matrix of the layer's calibration inputs). Informational: shapes do not depend on it.
        rank_cost: what a layer of rank r costs, and so what a size ratio means and how ``compress()`` stores it:
            ``"aligned"`` r·(in + out − r), stored gauge-aligned (new models), or ``"factors"`` r·(in + out), stored
            as two plain factors (the original implementation's rule, kept by models converted from it).
        correction_rank: rank of each prunable layer's factor corrections (``FactorCorrection``; 0: none). A pruned
            layer applies them with strength ``min(1, f / correction_ramp)``, f the share of its ranks pruned, so a
            layer kept whole is the base model's layer.
        correction_ramp: the pruned share at which a layer's corrections reach full strength (with correction_rank).
        lora_rank: rank of each prunable layer's whole-layer low-rank term (``LayerLoRA``; 0: none), added at every
            size as the original implementation adds its LoRA (models converted from it). Not counted by a size
            ratio, as there; ``compress()`` keeps it as extra ranks of the stored factors (``layer_ranks`` then record
            the stored rank).
        selection: which kept sets a prune may choose: ``"ranked"`` (acip's) the shortest prefix of the global
            ranking, ties cut by its tie-break order, whose size is at or above the target; ``"threshold"`` (the
            original implementation's, kept by models converted from it) the scores above a threshold, equal scores
            kept or pruned together, the smallest size strictly above the target (1.0 keeps everything).
        int_quantization: for a model quantized with ``quantize("int8")`` or ``quantize("int4")``, the quant type
            and the linear layers (names relative to the base LM) stored that way, and whether the compressed layers
            are stored as balanced plain factor pairs (``"factors"``: quantize("int4") stores them so whatever the
            rank_cost), and the output head stored in int8 (``"head"``, its name; None in models quantized before
            heads were) whose rows the input embedding reads (``"tied_embedding"``: the two were tied):
            ``{"quant_type": ..., "modules": [...], "factors": bool, "head": str | None, "tied_embedding": bool}``.
            (bitsandbytes 4-bit is recorded in transformers' own ``quantization_config``.)
        balanced_factors: whether the compressed layers are stored as two balanced plain factors whatever the
            rank_cost (``quantize()`` to 4 bits, "nf4", "fp4" or "int4", stores them so: a gauge-aligned pair does not
            survive 4-bit rounding; quantization.balanced).
    """

    model_type = "acip"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        target_modules: list[str] | None = None,
        mask_constant: float = 2e-2,
        compressed: bool = False,
        layer_ranks: dict[str, int] | None = None,
        dense_modules: list[str] | None = None,
        base_model_name_or_path: str | None = None,
        basis: str = "weight",
        fused_groups: list[list[str]] | None = None,
        rank_cost: str = "aligned",
        correction_rank: int = 0,
        correction_ramp: float = 0.0,
        lora_rank: int = 0,
        selection: str = "ranked",
        int_quantization: dict | None = None,
        balanced_factors: bool = False,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.target_modules = list(target_modules or [])
        self.mask_constant = float(mask_constant)
        self.compressed = bool(compressed)
        self.layer_ranks = {name: int(rank) for name, rank in (layer_ranks or {}).items()}
        self.dense_modules = list(dense_modules or [])
        self.base_model_name_or_path = base_model_name_or_path
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        self.basis = basis
        if rank_cost not in RANK_COSTS:
            raise ValueError(f"rank_cost must be one of {RANK_COSTS}, got {rank_cost!r}")
        self.rank_cost = rank_cost
        self.correction_rank = int(correction_rank)
        self.correction_ramp = float(correction_ramp)
        if self.correction_rank < 0 or (self.correction_rank and not self.correction_ramp > 0):
            raise ValueError(
                f"correction_rank must be >= 0 and correction_ramp > 0 with it, got {correction_rank!r}, "
                f"{correction_ramp!r}"
            )
        if isinstance(lora_rank, bool) or int(lora_rank) != lora_rank or lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {lora_rank!r}")
        self.lora_rank = int(lora_rank)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        if not self.mask_constant > 0:
            raise ValueError(f"mask_constant must be > 0, got {mask_constant}")
        if int_quantization is not None and (
            not isinstance(int_quantization, dict) or int_quantization.get("quant_type") not in INT_TYPES
            or not isinstance(int_quantization.get("modules"), list)
            or not isinstance(int_quantization.get("head"), str | None)
        ):  # fmt: skip
            raise ValueError(f"int_quantization must be {{'quant_type': one of {INT_TYPES}, 'modules': [names]}} or "
                             f"None, got {int_quantization!r}")  # fmt: skip
        self.balanced_factors = bool(balanced_factors)
        self.int_quantization = None if int_quantization is None else {
            "quant_type": int_quantization["quant_type"], "modules": list(int_quantization["modules"]),
            "factors": bool(int_quantization.get("factors", False)), "head": int_quantization.get("head"),
            "tied_embedding": bool(int_quantization.get("tied_embedding", False))}  # fmt: skip
        self.fused_groups = [list(group) for group in fused_groups or []]
        fused = [name for group in self.fused_groups for name in group]
        if fused and not (self.compressed and len(set(fused)) == len(fused) and set(fused) <= set(self.target_modules)):
            raise ValueError("fused_groups must list compressed target modules, each at most once")
        if self.compressed:
            listed = set(self.layer_ranks) | set(self.dense_modules)
            if listed != set(self.target_modules) or set(self.layer_ranks) & set(self.dense_modules):
                raise ValueError(
                    "a compressed ACIPConfig must list every target module exactly once, "
                    "either in layer_ranks or in dense_modules"
                )
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
