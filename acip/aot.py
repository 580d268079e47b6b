"""Ahead-of-time compiled packages: a compressed (or fused, or dense) ACIP model compiled once by AOTInductor into a
``.pt2`` file, and the small runtime that decodes with it.

Why a package: ``torch.compile`` in the serving process removes most of what a decode step costs besides reading the
weights, but the process then also holds the compiler's state (SmolLM2 at 0.4: ~160 MiB of graphs, guards and
generated code beside 270 MiB of weights). A package is compiled in another process; the one that serves it loads
the shared library and the weights and nothing else (docs/inference.md, "Compiled ahead of time").

A package is one exported program: a fixed batch size and a static KV cache of ``max_cache_len`` positions, over a
prompt of any length up to it (prefill and decode steps are the same program, the sequence length a dynamic
dimension). It returns the logits of the last position only, as ``generate`` needs them.

Security: a package holds a compiled shared library that loading runs. Load only packages you built; acip never
loads one on its own (not from a model folder, not from the Hub).
"""

import os
import warnings
from pathlib import Path

import torch

from .folders import replacing
from .hub.modeling_acip import ACIPModel
from .hub.quantization import IntLinear

FORMAT = "acip-aot-1"  # written into every package's metadata; a package without it was not made by build_package


def _static_cache_module(base_model, batch_size: int, max_cache_len: int):
    """transformers' exportable wrapper (static cache registered as buffers), returning last-position logits."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogits(TorchExportableModuleWithStaticCache):
        """Same as transformers' wrapper, but only the last position's logits leave the program: prefilling 1024
        tokens would otherwise write (1024, vocab) floats nobody reads."""

        def forward(self, input_ids, cache_position):
            """(B, T) tokens at cache positions (T,) -> (B, 1, vocab) logits of the last one."""
            for layer in self.static_cache.layers:  # the cache's fill level follows the positions given
                layer.cumulative_length.copy_(cache_position[0])
            out = self.model(input_ids=input_ids, attention_mask=None, cache=self.static_cache, use_cache=True,
                             logits_to_keep=1)  # fmt: skip
            return out.logits

    return LastLogits(base_model, batch_size=batch_size, max_cache_len=max_cache_len)


def check_package_target(path: Path, batch_size: int, max_cache_len: int, overwrite: bool) -> None:
    """The checks of :func:`build_package` that need no model (a clear error naming the argument), so that a caller
    can make them before loading one."""
    if Path(path).suffix != ".pt2":
        raise ValueError(f"path must end in .pt2 (a PyTorch package), got {str(path)!r}")
    for name, value, lowest in (("batch_size", batch_size, 1), ("max_cache_len", max_cache_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"the folder of path does not exist: {Path(path).parent}")


def build_package(model: ACIPModel, path: str | os.PathLike, batch_size: int = 1, max_cache_len: int = 1024,
                  overwrite: bool = False) -> Path:  # fmt: skip
    """Compile ``model`` ahead of time into the package ``path`` (a ``.pt2`` file) for ``batch_size`` sequences of
    up to ``max_cache_len`` tokens (prompt + generated); returns the path. Minutes on a CPU (a C++ compiler runs).

    The model is left as it was (a fused model is compiled with contiguous weights, the layout inductor prefers, and
    laid out again afterwards). Its weights are frozen into the package: later changes to the model do not reach
    it. The file is written beside and renamed into place, under the path's lock (acip.folders); an existing file
    is replaced only with ``overwrite``."""
    path = Path(path)
    if not isinstance(model, ACIPModel):
        raise TypeError(f"model must be an ACIPModel, got {type(model).__name__}")
    check_package_target(path, batch_size, max_cache_len, overwrite)
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and max_cache_len > positions:
        raise ValueError(f"max_cache_len must be at most the model's max_position_embeddings ({positions}), "
                         f"got {max_cache_len}")  # fmt: skip
    window = getattr(model.config.text_config, "sliding_window", None)
    if window and getattr(model.config.text_config, "use_sliding_window", True) and max_cache_len > window:
        # transformers' exportable static cache has no sliding window: beyond it the package would attend further
        # back than the model does
        raise ValueError(f"max_cache_len must be at most the model's sliding_window ({window}), got {max_cache_len}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("build_package() needs a model without bitsandbytes layers: 4-bit layers do not export "
                           "(quantize('int8') and quantize('int4') do)")

    check = lambda: check_package_target(path, batch_size, max_cache_len, overwrite)  # noqa: E731
    # the stage keeps the .pt2 suffix, which inductor insists on
    with replacing(path, "path", check, file=True) as output, output.staged() as stage:
        _compile(model, batch_size, max_cache_len, stage)
    return path


def _compile(model: ACIPModel, batch_size: int, max_cache_len: int, package_path: Path) -> None:
    """Export ``model`` with a static cache and compile it into the package ``package_path`` (AOTInductor); the
    model is left as it was."""
    base = model.model
    members = [base.get_submodule(name) for name in model.config.target_modules] if model.config.fused_groups else []
    layout = next((m.layout for m in members if hasattr(m, "layout")), None)
    generation_config = base.generation_config
    try:
        base.generation_config = generation_config.__class__.from_dict(
            {**generation_config.to_dict(), "cache_implementation": "static", "use_cache": True})  # fmt: skip
        if layout is not None:
            model.fuse(layout="contiguous")
        device = model.device
        for module in base.modules():  # int4 weights in the CPU kernel's layout now: the program must not repack
            if isinstance(module, IntLinear) and module.quant_type == "int4" and device.type == "cpu":
                module._to_kernel_layout()
        wrapper = _static_cache_module(base, batch_size, max_cache_len)
        ids = torch.zeros((batch_size, 4), dtype=torch.long, device=device)  # any length > 1: it becomes dynamic
        seq = torch.export.Dim("seq", min=1, max=max_cache_len)
        with torch.no_grad(), warnings.catch_warnings():
            # fused layers hand their shared matmul to each other through an attribute: a side effect dynamo
            # reports at length, harmless (the last member clears it within the step)
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            program = torch.export.export(wrapper, args=(), kwargs={"input_ids": ids, "cache_position": torch.arange(
                4, device=device)}, dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
            metadata = {"format": FORMAT, "batch_size": str(batch_size), "max_cache_len": str(max_cache_len),
                        "vocab_size": str(model.config.text_config.vocab_size), "device": device.type,
                        "dtype": str(model.dtype).removeprefix("torch.")}  # fmt: skip
            # No freezing: with the weights folded in as constants, inductor also prepacks or transposes the output
            # head for the last-position matmul while the tied embedding keeps the original: more memory, no faster
            # (AOTInductor's C++ wrapper is what saves the time). Weights beside the library, not inside it: inside,
            # loading copies them out and the library's file pages stay mapped too. docs/inference.md ("Compiled
            # ahead of time") measures both.
            options = {"aot_inductor.metadata": metadata, "aot_inductor.package_constants_in_so": False,
                       "aot_inductor.package_constants_on_disk_format": "binary_blob"}  # fmt: skip
            torch._inductor.aoti_compile_and_package(program, package_path=str(package_path), inductor_configs=options)
    finally:
        base.generation_config = generation_config
        if layout is not None:
            model.fuse(layout=layout)


class PackagedLM:
    """A package made by :func:`build_package`, loaded for inference: ``generate`` (greedy) or one forward step."""

    def __init__(self, path: str | os.PathLike):
        """Load the package at ``path`` (runs its compiled library: load only packages you built)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no package at {path}")
        self.runner = torch._inductor.aoti_load_package(str(path))
        metadata = self.runner.get_metadata()
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a package made by acip.aot.build_package (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")  # fmt: skip
        self.batch_size = int(metadata["batch_size"])
        self.max_cache_len = int(metadata["max_cache_len"])
        self.vocab_size = int(metadata["vocab_size"])
        self.device = torch.device(metadata["device"])

    def __call__(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run ``input_ids`` (batch_size, T) at cache positions start..start+T-1 (the cache keeps what earlier
        calls wrote before ``start``); returns the last position's logits, (batch_size, vocab)."""
        batch, length = input_ids.shape
        if batch != self.batch_size or not 0 <= start <= start + length <= self.max_cache_len or length < 1:
            raise ValueError(f"input_ids must be ({self.batch_size}, T) with T >= 1 and start + T at most the "
                             f"package's max_cache_len={self.max_cache_len}, got {tuple(input_ids.shape)} at "
                             f"start={start}")  # fmt: skip
        positions = torch.arange(start, start + length, device=self.device)
        return self.runner(input_ids=input_ids, cache_position=positions)[:, -1]  # (B, V)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
        """Greedy decoding like ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``: returns the
        prompt and the new tokens, (batch_size, T + new); a sequence that has produced ``eos_token_id`` continues
        with ``pad_token_id`` (default: the EOS id), and decoding stops when all have."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a (batch, length) tensor of token ids (torch.long)")
        batch, length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"input_ids must hold batch_size={self.batch_size} sequences (the package's), got "
                             f"{batch}")  # fmt: skip
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if length < 1 or length + max_new_tokens - 1 > self.max_cache_len:
            raise ValueError(f"prompt length + max_new_tokens - 1 must be between 1 and the package's "
                             f"max_cache_len={self.max_cache_len}, got {length} + {max_new_tokens} - 1")  # fmt: skip
        pad = eos_token_id if pad_token_id is None else pad_token_id
        input_ids = input_ids.to(self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        out = [input_ids]
        logits = self(input_ids)
        for step in range(max_new_tokens):
            token = logits.argmax(-1)  # (B,)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(token[:, None], start=length + step)
        return torch.cat(out, dim=1)
