"""How much memory an ACIP run needs, before you rent the GPU, and what parametrizing a model really costs.

:func:`estimate_run_memory` builds a model from its config on the meta device (no weights, milliseconds, any size)
and counts the bytes of the parametrized model (factors in the run's dtype; float32 masks and scores), of the LoRA
adapters the run trains, their gradients and AdamW state. Activations are not counted: they depend on batch size,
sequence length and gradient checkpointing.

:func:`measure_parametrization` (``python -m acip.memory``) measures, in a fresh process, the peak resident memory
while :func:`acip.parametrize` factorizes a randomly initialised model layer by layer, against the size of
the finished parametrized model. The byte and resident-memory helpers here also serve ``acip eval --efficiency``.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .hub.configuration_acip import ACIPConfig
from .hub.modeling_acip import ACIPModel, find_target_modules
from .build import parametrize

_GIB = 2**30

# Public shapes of the LLaMA-2 family (config.json of meta-llama/Llama-2-*-hf), for estimates without the weights.
LLAMA2 = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}  # fmt: skip


@dataclass
class MemoryEstimate:
    """Bytes an ACIP run holds besides activations, for one base model."""

    name: str
    base_params: int  # parameters of the dense base model
    base_bytes: int  # the dense base model in the run's dtype
    parametrized_bytes: int  # the ACIP model: full-rank factors in the run's dtype, masks and scores in float32
    masks_scores_bytes: int  # of which float32 masks and scores
    lora_params: int  # LoRA parameters on both factor layers of every target layer
    lora_bytes: int  # LoRA weights (float32: peft keeps adapters in float32 on a bf16 model)
    grad_bytes: int  # float32 gradients of masks and LoRA
    adam_bytes: int  # AdamW's two float32 moments per mask entry and LoRA weight

    @property
    def total_bytes(self) -> int:
        """Everything but activations."""
        return self.parametrized_bytes + self.lora_bytes + self.grad_bytes + self.adam_bytes


def estimate_run_memory(
    base_config: PretrainedConfig,
    name: str = "",
    lora_r: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
) -> MemoryEstimate:
    """Count an ACIP run's memory for ``base_config`` from a meta-device model: nothing is allocated."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
        names = find_target_modules(base, target_modules, exclude_modules)
        model = ACIPModel(ACIPConfig(text_config=base_config, target_modules=names)).to(dtype)
    base_params = sum(p.numel() for p in base.parameters())
    base_bytes = model_bytes(base)
    parametrized = model_bytes(model)
    masks_scores = lora = 0
    for layer in model.acip_layers().values():
        rank = layer.rank
        masks_scores += rank * (layer.mask.element_size() + layer.score.element_size())
        # peft LoRA on the two factors: sv (in -> rank) and u (rank -> out), A: (r, fan_in), B: (fan_out, r)
        lora += lora_r * (layer.in_features + rank) + lora_r * (rank + layer.out_features)
    masks = sum(layer.rank for layer in model.acip_layers().values())
    trainable = 4 * (masks + lora)  # float32
    return MemoryEstimate(
        name=name, base_params=base_params, base_bytes=base_bytes, parametrized_bytes=parametrized,
        masks_scores_bytes=masks_scores, lora_params=lora, lora_bytes=4 * lora, grad_bytes=trainable,
        adam_bytes=2 * trainable,
    )  # fmt: skip


def format_estimates(estimates: list[MemoryEstimate]) -> str:
    """A Markdown table of estimates, in GiB."""
    lines = [
        "| model | base params | dense base | parametrized model | of which masks+scores | LoRA (r) weights | "
        "grads | AdamW | total w/o activations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        cells = [e.base_bytes, e.parametrized_bytes, e.masks_scores_bytes, e.lora_bytes, e.grad_bytes, e.adam_bytes,
                 e.total_bytes]  # fmt: skip
        gib = " | ".join(f"{b / _GIB:.2f}" for b in cells)
        lines.append(f"| {e.name} | {e.base_params / 1e9:.2f}B | {gib} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Measured: peak resident memory while parametrizing
# ---------------------------------------------------------------------------------------------------------------------


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (shared tensors once), plus 4-bit quantization constants.
    Works on meta-device models too (tied tensors are then told apart as objects: they have no storage)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def _proc_status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else peak_rss_bytes()


def own_rss_bytes(folder: str | os.PathLike) -> int | None:
    """Resident memory of this process that is its own (anonymous: heap, tensors) or maps a file in ``folder`` (a
    memory-mapped checkpoint); None where /proc/self/smaps is missing (not Linux).

    Unlike :func:`rss_bytes` it leaves out the pages of shared libraries: the first matmuls of a process page in
    about 30 MiB of torch's and MKL's code, the same whichever model runs, which is not the model's memory."""
    prefix = os.path.realpath(folder) + os.sep
    total = 0
    try:
        with open("/proc/self/smaps") as f:
            path = ""
            for line in f:
                head = line.split(maxsplit=5)
                if head and not head[0].endswith(":"):  # a mapping's first line: address perms offset dev inode [path]
                    path = head[5].strip() if len(head) > 5 else ""
                elif head[0] == "Rss:" and (not path.startswith("/") or path.startswith(prefix)):
                    total += int(head[1]) * 1024
    except OSError:
        return None
    return total


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux ≥ 4.0), so what ran before (imports, setup) does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size since :func:`reset_peak_rss` (Linux), or of the process (ru_maxrss)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def _parametrize_here(base_config: dict) -> dict:
    """In this process: build a random base model, then factorize it, recording resident memory around it."""
    config = AutoConfig.for_model(**base_config)
    gc.collect()
    before = rss_bytes()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    gc.collect()
    with_base = rss_bytes()
    base_bytes = model_bytes(base)  # before: parametrizing happens in place
    reset_peak_rss()
    model = parametrize(base)
    gc.collect()
    peak, after = peak_rss_bytes(), rss_bytes()
    return {
        "base_bytes": base_bytes,
        "parametrized_bytes": model_bytes(model),
        "base_rss_bytes": with_base - before,
        "peak_rss_bytes": peak - before,
        "final_rss_bytes": after - before,
    }


def measure_parametrization(base_config: dict) -> dict:
    """Peak resident memory of parametrizing a random model of ``base_config`` (a config dict with model_type),
    measured in a fresh process; bytes relative to the process before the base model existed."""
    command = [sys.executable, "-m", "acip.memory", json.dumps(base_config)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring parametrization memory failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_over_parametrized"] = result["peak_rss_bytes"] / result["parametrized_bytes"]
    return result


def main() -> None:
    """Child process of :func:`measure_parametrization`: prints one JSON line."""
    parser = argparse.ArgumentParser(description="peak RSS while parametrizing a random model")
    parser.add_argument("config", help="JSON config dict of the base model, with model_type")
    print(json.dumps(_parametrize_here(json.loads(parser.parse_args().config))))


if __name__ == "__main__":
    main()
