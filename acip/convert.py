"""``acip convert``: a checkpoint of the original ACIP implementation (github merantix-momentum/acip, the nine
``MerantixMomentum/acip_*`` models) as one of acip's model folders, the same model on today's transformers.

The original saves its ``ACIPModel`` (``model_type: "acip_model"``) with each target layer ``P`` as
``P.base_layer.parametrization.{ortho,base}.weight`` (U/√c and S·Vᵀ/√c), its ``mask`` (straight-through: c where
positive), ``mask_score`` (the score map) and ``S``, plus a peft LoRA on the whole layer (``P.lora_{A,B}.default``),
and it names its base model's repository instead of holding its config. Both forward passes compute
``U·(c·mask01 ⊙ S·Vᵀx) + bias``, so the factors are copied as they are (``sv = base``, ``u = ortho``, the bias into
``u``) with ``mask_constant = c``; the LoRA becomes the layer's :class:`LayerLoRA` (``alpha/r`` folded into ``b``),
added at every size as there. The written model counts sizes by the original's rule (``rank_cost="factors"``), so
``prune_model_by_score(R)`` keeps what the original's ``prune_model_by_score(size_ratio=R)`` keeps and computes the
same logits.

Everything is checked before anything is written: what the source is, its parametrization, its tensors against the
base model's config (shapes, missing, extra), its files (torn shards). The weights are then read through memory maps
and written tensor by tensor into a new safetensors file (its header first, from the checked shapes), so memory holds
one tensor at a time; the output folder appears complete or not at all (``replacing()``, docs/guarantees.md).
"""

import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import hub
from .folders import check_output_dir, replaceable, replacing, tree_files, write_json
from .hub import HUB_FILES
from .hub.configuration_acip import ACIPConfig
from .hub.modeling_acip import ACIPModel, find_target_modules
from .hub.pruning import parse_bytes
from .inputs import check_model_dir, check_model_source, is_local_path
from .records import CONVERT_FILE

ORIGINAL = "acip_model"  # the original implementation's model_type
PARAMETRIZED = ".base_layer.parametrization."
LAYER_PARTS = {"base.weight": "sv.weight", "ortho.weight": "u.weight", "ortho.bias": "u.bias", "mask": "mask",
               "mask_score": "score"}  # fmt: skip
DROPPED_PARTS = ("S",)  # the singular values: a buffer its forward pass does not use
LORA_PARTS = {"A": "layer_lora.a", "B": "layer_lora.b"}  # P.lora_{A,B}.default.weight
ORIGINAL_PARTS = {**{ours: f"base_layer.parametrization.{part}" for part, ours in LAYER_PARTS.items()},
                  **{ours: f"lora_{part}.default.weight" for part, ours in LORA_PARTS.items()}}  # fmt: skip
FLOAT32_PARTS = (".mask", ".score")  # kept float32 whatever the weights' dtype, as the model keeps them
QUANTIZED_MARKS = ("absmax", "quant_map", "quant_state", "nested_", "SCB", "weight_format")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
SOURCE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
GATED_HINT = ("the published models name a gated meta-llama (or other) repository, which needs a network connection "
              "and an accepted license: give the base model's config with --base-model (base_model=...), a local "
              "folder holding its config.json or a Hub id that can be reached")  # fmt: skip


@dataclass
class Tensor:
    """One tensor of the written model: where it comes from and how it is made."""

    key: str  # in the written model's state dict
    source: str  # key in the original checkpoint
    shape: tuple[int, ...]
    dtype: torch.dtype  # written
    kind: str = "copy"  # copy, mask (c where positive, else 0), lora_b (scaled by alpha / r)


@dataclass
class Conversion:
    """What :func:`convert` checked and will write: the written model's config and every tensor's recipe."""

    folder: Path  # the original checkpoint, on this machine
    source: str  # as given
    base_model: str  # where the base config came from
    config: ACIPConfig
    tensors: list[Tensor]
    files: dict[str, Path]  # source key -> safetensors file
    lora: dict = field(default_factory=dict)
    tokenizer_from: Path | None = None
    generation_config: object = None  # a transformers GenerationConfig
    dropped: list[str] = field(default_factory=list)


def convert(src, out, base_model=None, dtype: str | None = None, overwrite: bool = False,
            max_shard_size: int | str = "5GB") -> Path:  # fmt: skip
    """Convert the original ACIP implementation's checkpoint ``src`` into the ACIP model folder ``out``; returns it.

    Args:
        src: a folder, or a Hub id (``MerantixMomentum/acip_llama2_7b``), of a checkpoint saved by the original
            implementation (one safetensors file or shards with an index).
        out: the folder to write: config.json (``rank_cost="factors"``), the weights with the original's score map,
            the Hub files, the tokenizer (from ``src``, else from a local ``base_model``).
        base_model: where the base architecture's config comes from (a folder or a Hub id); default: the repository
            the checkpoint names, which for the published models is gated.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` weights; default: as in ``src`` (masks and scores are
            float32 either way).
        overwrite: replace a non-empty ``out`` that an earlier acip command wrote, once the new folder is complete.
        max_shard_size: the largest safetensors file to write (bytes, or "5GB"); more weights go into shards.
    """
    shard_bytes = parse_bytes(max_shard_size) if max_shard_size is not None else None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)} or None (as in src), got {dtype!r}")
    check_model_source("src", src)
    inputs = {name: os.fspath(value) for name, value in (("src", src), ("base_model", base_model))
              if isinstance(value, (str, os.PathLike)) and is_local_path(os.fspath(value))}  # fmt: skip
    out = check_output_dir(out, inputs, "out")
    replaceable(out, overwrite, "out")
    conversion = plan_conversion(src, base_model, dtype)  # every check of the source, before anything is written
    with replacing(out, "out", lambda: replaceable(out, overwrite, "out")) as output:
        with output.staged() as stage:
            write_conversion(conversion, stage, shard_bytes)
    return out


# -- checks: what the source is, and what will be written -----------------------------------------------------------


def plan_conversion(src, base_model=None, dtype: str | None = None) -> Conversion:
    """Read and check the original checkpoint ``src`` and the base config (headers and configs only, no weights);
    returns what :func:`write_conversion` writes. Every error names its argument and writes nothing."""
    folder = _source_folder(src)
    config = _original_config(folder, src)
    mask_constant, targets, excluded = _parametrization(config, src)
    lora = _adapter(config, src)
    files = _weight_files(folder, src)
    shapes = _headers(files, src)
    base_name, base_config = _base_config(config, base_model, src)
    layers, plain = _layer_tensors(shapes, lora, src)
    names = _target_names(base_config, base_name, layers, targets, excluded, src)
    named = (config["base_model_config"].get("pretrained_model_kwargs") or {}).get("pretrained_model_name_or_path")
    named = named if isinstance(named, str) and named else base_name  # the repository it was made from
    base_config.dtype = None  # the weights' dtype is the ACIP config's (set below), as acip's own models save it
    acip_config = ACIPConfig(text_config=base_config, target_modules=names, mask_constant=mask_constant,
                             base_model_name_or_path=named, rank_cost="factors", selection="threshold",
                             lora_rank=lora.get("rank", 0))  # fmt: skip
    acip_config.architectures = ["ACIPModel"]
    with torch.device("meta"):
        model = ACIPModel(acip_config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items() if k not in tied}
    del model
    sources = _sources(layers, plain, tied)
    used = set(sources.values())
    dropped = sorted(key for key in shapes if key not in used)  # the unused singular values S, tied copies
    _check_tensors(sources, shapes, expected, base_name, src)
    acip_config.dtype = DTYPES[dtype] if dtype is not None else _weights_dtype(shapes, sources)
    tensors = []
    for key in sorted(expected):
        source = sources[key]
        out_dtype = torch.float32 if key.endswith(FLOAT32_PARTS) else DTYPES[dtype] if dtype else shapes[source][1]
        kind = "mask" if key.endswith(".mask") else "lora_b" if key.endswith(".layer_lora.b") else "copy"
        tensors.append(Tensor(key, source, expected[key][0], out_dtype, kind))
    return Conversion(folder=folder, source=os.fspath(src), base_model=base_name, config=acip_config,
                      tensors=tensors, files={k: files[k] for k in used}, lora=lora,
                      tokenizer_from=_tokenizer_folder(folder, base_model), dropped=dropped,
                      generation_config=_generation_config(base_model, base_name, base_config))  # fmt: skip


def _source_folder(src) -> Path:
    """The checkpoint's folder on this machine: ``src`` itself, or its Hub snapshot (config, weights, tokenizer)."""
    value = os.fspath(src)
    if is_local_path(value):
        return check_model_dir("src", value)
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                *TOKENIZER_FILES]  # fmt: skip
    try:
        return Path(snapshot_download(value, allow_patterns=patterns))
    except Exception as error:  # offline, not found, gated, network: all say the same to the user
        raise FileNotFoundError(
            f"src: the Hub repository {value} could not be reached ({type(error).__name__}: {error}); download it "
            "where there is a connection and give its folder"
        ) from None


def _original_config(folder: Path, src) -> dict:
    """config.json of ``folder`` if it is a checkpoint of the original implementation; else an error saying what it
    is."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"src: {path} is not a model's config ({error})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == ACIPConfig.model_type:
        raise ValueError(
            f"src {os.fspath(src)} is already one of acip's ACIP model folders (model_type {kind!r}), not a "
            "checkpoint of the original implementation: use it as it is, nothing to convert"
        )
    if kind != ORIGINAL:
        what = f"a plain {kind} model" if isinstance(kind, str) else "a model of no known type (no model_type)"
        raise ValueError(
            f"src {os.fspath(src)} is {what}, not a checkpoint of the original ACIP implementation (model_type "
            f"{ORIGINAL!r}); to make an ACIP model of a plain model run acip compress --base-model {os.fspath(src)}"
        )
    for name in ("base_model_config", "parametrization_config"):
        if not isinstance(config.get(name), dict):
            raise ValueError(f"src: {path} has no {name}; it is not a complete checkpoint of the original ACIP "
                             "implementation")  # fmt: skip
    if config.get("weight_quantization_config") is not None:
        raise ValueError(
            f"src {os.fspath(src)} is a 4-bit checkpoint of the original implementation (weight_quantization_config "
            "is set): its factors are quantized and cannot be converted exactly; convert from the unquantized one "
            "and quantize the result with model.quantize()"
        )
    return config


def _parametrization(config: dict, src) -> tuple[float, list | str | None, list | str | None]:
    """The mask constant c, and the target and excluded modules, of an SVD parametrization with the STE mask; an error
    for any other."""
    spec = config["parametrization_config"]
    factory = spec.get("module_factory_cls")
    kwargs = spec.get("module_factory_kwargs") or {}
    if factory != "svd":
        raise ValueError(
            f"src {os.fspath(src)} uses the parametrization module_factory_cls={factory!r}; acip converts the SVD "
            "parametrization (\"svd\") only"
        )
    mask_func = kwargs.get("mask_func", "ste")
    if mask_func != "ste":
        raise ValueError(
            f"src {os.fspath(src)} uses the mask function mask_func={mask_func!r}; acip converts the straight-through "
            "estimator (\"ste\") only"
        )
    c = kwargs.get("mask_scaling_factor")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        raise ValueError(f"src {os.fspath(src)}: mask_scaling_factor must be a number > 0, got {c!r}")
    return float(c), spec.get("target_modules"), spec.get("exclude_modules")


def _adapter(config: dict, src) -> dict:
    """The LoRA of the checkpoint: rank, alpha, scale (empty without one); an error for what acip cannot hold."""
    adapters = ((config.get("adapter_config") or {}).get("peft_config")) or {}
    if not adapters:
        return {}
    if set(adapters) != {"default"}:
        raise ValueError(f"src {os.fspath(src)} has the adapters {sorted(adapters)}; acip converts one LoRA adapter "
                         "named 'default'")  # fmt: skip
    lora = adapters["default"]
    unsupported = {"peft_type": lora.get("peft_type", "LORA") != "LORA", "use_dora": bool(lora.get("use_dora")),
                   "rank_pattern": bool(lora.get("rank_pattern")), "alpha_pattern": bool(lora.get("alpha_pattern")),
                   "lora_bias": bool(lora.get("lora_bias")), "bias": lora.get("bias", "none") != "none",
                   "modules_to_save": bool(lora.get("modules_to_save"))}  # fmt: skip
    bad = [name for name, set_ in unsupported.items() if set_]
    if bad:
        raise ValueError(f"src {os.fspath(src)}: its LoRA adapter sets {', '.join(bad)}, which acip cannot hold; "
                         "convert a checkpoint with a plain LoRA (r, lora_alpha)")  # fmt: skip
    rank, alpha = lora.get("r"), lora.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float))):
        raise ValueError(f"src {os.fspath(src)}: its LoRA adapter has r={rank!r}, lora_alpha={alpha!r}")
    scale = alpha / math.sqrt(rank) if lora.get("use_rslora") else alpha / rank
    return {"rank": rank, "alpha": alpha, "scale": scale, "rslora": bool(lora.get("use_rslora"))}


def _weight_files(folder: Path, src) -> dict[str, Path]:
    """Which safetensors file holds each tensor (one file, or the shards an index names); an error for a torn or
    missing shard, a damaged index, or weights in another format."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(key): folder / str(shard) for key, shard in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ValueError(f"src: {index} is not a valid safetensors index (truncated or damaged?)") from None
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(
                    f"src: {index.name} names the shard {shard.name}, which is not in {folder}: the checkpoint is "
                    "incomplete (a torn copy or download); copy or download it again"
                )
        return files
    if single.is_file():
        return {key: single for key in _open(single, src).keys()}
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    held = f"only {', '.join(others)}: acip convert reads safetensors weights" if others else "no weights"
    raise FileNotFoundError(f"src: {folder} holds {held} (model.safetensors, or shards with "
                            "model.safetensors.index.json)")  # fmt: skip


def _open(path: Path, src):
    """``safe_open`` of one weight file, or an error naming it when it is torn."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"src: {path} is not a complete safetensors file ({path.stat().st_size:,} bytes; {error}): it was "
            "truncated or damaged (a torn shard); copy or download it again"
        ) from None


def _headers(files: dict[str, Path], src) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor, from the files' headers; an error for a torn file, a tensor the index names
    that its shard lacks, or 4-bit (or other non-float) tensors."""
    shapes = {}
    by_file = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in sorted(by_file.items()):
        handle = _open(path, src)
        held = set(handle.keys())
        lost = [key for key in keys if key not in held]
        if lost:
            raise ValueError(f"src: {path.name} lacks {lost[0]!r}, which the index puts there: a torn shard (or a "
                             "stale index); copy or download the checkpoint again")  # fmt: skip
        for key in keys:
            view = handle.get_slice(key)
            shapes[key] = (tuple(view.get_shape()), view.get_dtype())
    quantized = [k for k, (_, d) in shapes.items() if d not in SOURCE_DTYPES or any(m in k for m in QUANTIZED_MARKS)]
    if quantized:
        raise ValueError(
            f"src {os.fspath(src)} holds quantized (4-bit or integer) tensors, e.g. {quantized[0]!r} "
            f"({shapes[quantized[0]][1]}): convert from the unquantized checkpoint and quantize the result with "
            "model.quantize()"
        )
    return {key: (shape, SOURCE_DTYPES[dtype]) for key, (shape, dtype) in shapes.items()}


def _base_config(config: dict, base_model, src):
    """(where it came from, the base causal LM's config): from ``base_model``, else the checkpoint's own
    ``pretrained_config``, else the repository it names; an error saying how to give it when it cannot be read."""
    from transformers import AutoConfig

    spec = config["base_model_config"]
    named = (spec.get("pretrained_model_kwargs") or {}).get("pretrained_model_name_or_path")
    if base_model is None and isinstance(spec.get("pretrained_config"), dict):  # the checkpoint holds it
        held = dict(spec["pretrained_config"])
        try:
            return str(named or "the base model"), AutoConfig.for_model(held.pop("model_type"), **held)
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"src: the base config held in its config.json is not usable ({error}); give one with "
                             "--base-model") from None  # fmt: skip
    if base_model is None:
        if not isinstance(named, str) or not named:
            raise ValueError(f"base_model is needed: src {os.fspath(src)} names no base model; give it with "
                             "--base-model (base_model=...)")  # fmt: skip
        name, given = named, False
    else:
        check_model_source("base_model", base_model)
        name, given = os.fspath(base_model), True
    if given and is_local_path(name):
        _check_base_kind(Path(os.path.expanduser(name)) / "config.json", name)
    try:
        base = AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError, KeyError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if given:
            raise ValueError(f"base_model {name}: its config could not be read ({reason})") from None
        raise ValueError(
            f"base_model: the base model {name} that src names could not be reached ({reason}); {GATED_HINT}"
        ) from None
    if getattr(base, "model_type", None) in (ACIPConfig.model_type, ORIGINAL):
        raise ValueError(f"base_model {name} is an ACIP model; give the plain base model the checkpoint was made from")
    return name, base


def _check_base_kind(path: Path, name: str) -> None:
    """An error for a local base_model folder that holds an ACIP model (of either implementation)."""
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # AutoConfig says what is wrong with it
    if kind in (ACIPConfig.model_type, ORIGINAL):
        raise ValueError(f"base_model {name} is an ACIP model (model_type {kind!r}); give the plain base model the "
                         "checkpoint was made from")  # fmt: skip


def _layer_tensors(shapes: dict, lora: dict, src) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The checkpoint's tensors by parametrized layer (its name in the base LM -> our part -> source key), and the
    others (the base model's own tensors, and anything unknown: reported as extra later); an error for a
    parametrized layer that lacks a part."""
    layers, plain = {}, []
    for key in shapes:
        layer, sep, part = key.partition(PARAMETRIZED)
        if sep:
            if part not in DROPPED_PARTS:
                layers.setdefault(layer, {})[LAYER_PARTS.get(part, f"unknown.{part}")] = key
            else:
                layers.setdefault(layer, {})
            continue
        layer, sep, part = key.partition(".lora_")
        adapter = part.removesuffix(".default.weight")
        if sep and lora and adapter in LORA_PARTS and part == f"{adapter}.default.weight":
            layers.setdefault(layer, {})[LORA_PARTS[adapter]] = key
        else:
            plain.append(key)
    needed = ["sv.weight", "u.weight", "mask", "score", *(LORA_PARTS.values() if lora else [])]
    by_layer = {}
    for layer, parts in sorted(layers.items()):
        missing = [f"{layer}.{ORIGINAL_PARTS[p]}" for p in needed if p not in parts]
        if missing:
            raise ValueError(f"src {os.fspath(src)} lacks tensors of the parametrized layer {layer}: missing "
                             f"{', '.join(missing)}")  # fmt: skip
        if not layer.startswith("model."):  # not where the original puts its layers: extra
            plain += list(parts.values())
            continue
        by_layer[layer.removeprefix("model.")] = parts
    return by_layer, plain


def _target_names(base_config, base_name: str, layers: dict, targets, excluded, src) -> list[str]:
    """The parametrized layers in the base model's module order; an error for one the base model lacks, or one its
    target_modules name that the checkpoint holds no factors of."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(base_config)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"base_model {base_name} is not a causal LM transformers can build ({error})") from None
    linear = {name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)}
    foreign = sorted(name for name in layers if name not in linear)
    if foreign:
        raise ValueError(
            f"src {os.fspath(src)} holds factors of model.{foreign[0]}, which base_model {base_name}'s config has no "
            "linear layer at: an extra tensor, or a base config that does not describe this checkpoint"
        )
    try:
        wanted = find_target_modules(base, targets or "all-linear", excluded) if targets else []
    except ValueError:  # target_modules that match no layer: the tensors say which layers were parametrized
        wanted = []
    lacking = [name for name in wanted if name not in layers]
    if lacking:
        raise ValueError(
            f"src {os.fspath(src)} lacks the factors of model.{lacking[0]} (and {len(lacking) - 1} more layers), which "
            "its target_modules parametrize: missing tensors (a torn checkpoint?), or a base config with more layers"
        )
    return [name for name, _ in base.named_modules() if name in layers]


def _sources(layers: dict, plain: list[str], tied: set[str]) -> dict[str, str]:
    """Our state-dict key -> the checkpoint's key, for every tensor the checkpoint holds (unknown parts kept under
    names no model has, so that they are reported as extra)."""
    sources = {key: key for key in plain if key not in tied}
    for name, parts in layers.items():
        for part, key in parts.items():
            sources[f"model.{name}.{part}"] = key
    return sources


def _check_tensors(sources: dict[str, str], shapes: dict, expected: dict, base_name: str, src) -> None:
    """An error naming the first tensor whose shape differs from what the base config gives, then any missing or
    extra tensor."""
    for key in sorted(set(sources) & set(expected)):
        have, want = shapes[sources[key]][0], expected[key][0]
        if have != want:
            raise ValueError(
                f"base_model {base_name}'s config does not match src {os.fspath(src)}: {sources[key]} has shape "
                f"{list(have)}, the config gives {list(want)} for it (as {key}); give the base model the checkpoint "
                "was made from (--base-model)"
            )
    extra = sorted(sources[key] for key in sources if key not in expected)
    missing = sorted(_original_key(key) for key in expected if key not in sources)
    if missing or extra:
        said = []
        if missing:
            said.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)})")
        if extra:
            said.append(f"extra {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''} ({len(extra)})")
        raise ValueError(
            f"src {os.fspath(src)} does not hold the tensors base_model {base_name}'s config needs: {'; '.join(said)}"
            ": a torn or foreign checkpoint, or a base config that does not describe it"
        )


def _original_key(key: str) -> str:
    """The name the original implementation gives the tensor that becomes ``key`` of the written model."""
    for ours, theirs in ORIGINAL_PARTS.items():
        if key.endswith("." + ours):
            return f"{key.removesuffix(ours)}{theirs}"
    return key


def _weights_dtype(shapes: dict, sources: dict[str, str]) -> torch.dtype:
    """The dtype of the checkpoint's factors (the model's dtype as written)."""
    for key, source in sorted(sources.items()):
        if key.endswith(".sv.weight"):
            return shapes[source][1]
    return torch.float32


def _tokenizer_folder(folder: Path, base_model) -> Path | None:
    """Where the tokenizer files come from: the checkpoint's folder, else a local base model folder, else none."""
    candidates = [folder]
    if base_model is not None and is_local_path(os.fspath(base_model)):
        candidates.append(Path(os.path.expanduser(os.fspath(base_model))))
    return next((c for c in candidates if (c / "tokenizer_config.json").is_file()), None)


def _generation_config(base_model, base_name: str, base_config):
    """The generation config to write: the base model's (a local folder, or a Hub id given as base_model), else one
    made from its config (special tokens); the original's own names none."""
    from transformers import GenerationConfig

    for place in (base_model, base_name):
        if place is None or not is_local_path(os.fspath(place)) and place is not base_model:
            continue
        try:
            return GenerationConfig.from_pretrained(os.path.expanduser(os.fspath(place)))
        except (OSError, ValueError):
            continue
    return GenerationConfig.from_model_config(base_config)


# -- writing ---------------------------------------------------------------------------------------------------------


def write_conversion(conversion: Conversion, stage: Path, max_shard_size: int | None = None) -> None:
    """Write every file of the converted model into the empty folder ``stage``: weights tensor by tensor (read from
    the memory-mapped source one at a time), config, Hub files, tokenizer, generation config, the record."""
    shards = _shards(conversion.tensors, max_shard_size)

    def make(tensor: Tensor) -> torch.Tensor:
        # A memory map per tensor, closed once it is read: the pages of the source never add up in this process.
        with safe_open(str(conversion.files[tensor.source]), framework="pt") as source:
            value = source.get_tensor(tensor.source)
        if tensor.kind == "mask":  # c where the mask is alive, 0 where pruned: what the STE applies
            value = torch.where(value.float() > 0, conversion.config.mask_constant, 0.0)
        elif tensor.kind == "lora_b":
            value = value.float() * conversion.lora["scale"]
        return value.to(tensor.dtype)

    weight_map = {}
    for number, group in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(stage / name, group, make)
        weight_map.update({tensor.key: name for tensor in group})
    if len(shards) > 1:
        total = sum(math.prod(t.shape) * t.dtype.itemsize for t in conversion.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(stage / "model.safetensors.index.json", index)
    conversion.config.save_pretrained(stage)
    for name in HUB_FILES:  # what save_pretrained copies next to a model's config.json
        shutil.copy2(Path(hub.__file__).resolve().parent / name, stage / name)
    if conversion.generation_config is not None:
        conversion.generation_config.save_pretrained(stage)
    if conversion.tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (conversion.tokenizer_from / name).is_file():
                shutil.copy2(conversion.tokenizer_from / name, stage / name)
    record = {
        "source": conversion.source, "base_model": conversion.base_model,
        "dtype": str(conversion.config.dtype).removeprefix("torch."),
        "mask_constant": conversion.config.mask_constant, "layers": len(conversion.config.target_modules),
        "lora": conversion.lora or None, "dropped": _dropped_summary(conversion.dropped),
        "tokenizer_from": None if conversion.tokenizer_from is None else conversion.tokenizer_from.name,
        "converted": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    record["files"] = sorted({*tree_files(stage), CONVERT_FILE})
    write_json(stage / CONVERT_FILE, record)


def _dropped_summary(keys: list[str]) -> dict[str, int]:
    """How many tensors of each kind were left out (the unused singular values ``S``, a tied head's copy)."""
    summary = {}
    for key in keys:
        kind = "S (singular values, unused by the forward pass)" if key.endswith(".S") else "tied copies"
        summary[kind] = summary.get(kind, 0) + 1
    return summary


def _shards(tensors: list[Tensor], max_shard_size: int | None) -> list[list[Tensor]]:
    """The tensors in order, cut into groups of at most ``max_shard_size`` bytes (a larger tensor alone)."""
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * tensor.dtype.itemsize
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def write_safetensors(path: Path, tensors: list[Tensor], make) -> None:
    """Write a safetensors file whose header comes from the tensors' shapes and dtypes, then each tensor as ``make``
    returns it, one at a time; flushed to the disk. Reading it back checks it is complete."""
    header, offset = {}, 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * tensor.dtype.itemsize
        header[tensor.key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors:
            value = make(tensor)
            if tuple(value.shape) != tensor.shape or value.dtype != tensor.dtype:
                raise RuntimeError(f"{tensor.key}: made {tuple(value.shape)} {value.dtype}, the header says "
                                   f"{tensor.shape} {tensor.dtype}")  # fmt: skip
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy())  # its memory as it is: no copy
            del value
        f.flush()
        os.fsync(f.fileno())
    with safe_open(str(path), framework="pt") as check:
        if len(check.keys()) != len(tensors):
            raise RuntimeError(f"{path} holds {len(check.keys())} tensors, {len(tensors)} were written")
