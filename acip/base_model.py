"""The base causal LM a run starts from: the embedded SmolLM2 (``"smollm2"``), or a local folder / Hub name."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .default_model import DEFAULT_MODEL, load_default_model

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' automatic placements


def check_device_map(device_map: str | None) -> None:
    """A clear error for a device map a run cannot use."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {DEVICE_MAPS} or None, got {device_map!r}")


def load_base_model(name: str, dtype: torch.dtype, device_map: str | None = None):
    """The base causal LM and its tokenizer, in eval mode.

    Weights are loaded straight into their final place (transformers builds the model on the meta device first, so
    no random initialisation and no second copy); ``device_map`` (e.g. "auto") spreads the layers over the visible
    GPUs, each layer is later factorized on its own device. Offloading to disk is refused: ACIP needs every weight.
    """
    check_device_map(device_map)
    if name == DEFAULT_MODEL:
        model, tokenizer = load_default_model(dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    if placed & {"disk", "meta"}:
        raise ValueError(
            f"{name} does not fit the GPUs and CPU memory here (device_map={device_map!r} put layers on disk); "
            "ACIP needs every weight in memory: use more or larger GPUs"
        )
    return model, tokenizer
