"""What a size buys: parameters, bytes, resident memory and tokens/s of an ACIP model, dense vs pruned-and-compressed
vs compressed + 4-bit; and the inference speed of each form (dense, compressed, fused, compiled) for
benchmarks/inference.py.

Each configuration is saved to a temporary folder and measured in a fresh Python process that loads it the way a
user would (``from_pretrained``), so resident memory is the model's own and no configuration inherits another's
allocations. The dense row is the ACIP model compressed at ratio 1.0: every layer goes back to a dense
``nn.Linear`` of the base model's shape (the weights are the trained ones, the size and speed those of the base).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .folders import write_atomically, write_json
from .hub.modeling_acip import ACIPModel
from .memory import model_bytes, own_rss_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from .sizes import check_ratios, load_at_size

REPORT_STEM = "eval_efficiency"  # eval_efficiency.json / .csv, next to the model
_MIB = 2**20


@dataclass
class EfficiencyRow:
    """Size and speed of one configuration of a model."""

    name: str  # e.g. "dense", "ACIP 0.4", "ACIP 0.4 + nf4"
    ratio: float  # size ratio it was pruned to (1.0: dense)
    params: int  # parameters of the whole model; a 4-bit weight counts as one parameter
    bytes: int  # bytes of parameters, buffers and 4-bit quantization constants in memory
    file_bytes: int  # size of its safetensors checkpoint on disk
    rss_mib: float  # resident memory the model adds once loaded and run (weights, caches; no library code)
    process_rss_mib: float  # what the process's resident set grew by (also library code paged in by the first runs)
    peak_rss_mib: float  # peak resident memory added while loading it and running prefill and decode
    prefill_tokens_per_s: float  # one sequence of prompt_tokens, one forward pass (best of repeats)
    decode_tokens_per_s: float  # greedy generation with the KV cache, batch 1, prompt excluded (best of repeats)


def _resident(folder) -> tuple[int, int]:
    """(the process's own resident bytes and those mapping ``folder``'s files, its whole resident set): the first
    leaves out shared libraries, whose code pages the first matmuls bring in whatever the model (see
    acip.memory.own_rss_bytes); where it cannot be told apart, both are the whole."""
    whole = rss_bytes()
    own = own_rss_bytes(folder)
    return (whole if own is None else own), whole


def _added_mib(before: tuple[int, int], folder) -> tuple[float, float]:
    """MiB added since ``before`` (a :func:`_resident` reading): to the model's own memory, to the process's."""
    own, whole = _resident(folder)
    return (own - before[0]) / _MIB, (whole - before[1]) / _MIB


def _timed(fn) -> float:
    """Wall seconds of one call (CUDA work included: kernels run asynchronously)."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _best(fn, best_of: int) -> float:
    """The shortest of ``best_of`` timed calls: on a shared machine the least disturbed one."""
    return min(_timed(fn) for _ in range(best_of))


def _decode_rate(generate, batch: int, new_tokens: int, best_of: int) -> float:
    """Decoded tokens/s of ``generate(n)`` (n new tokens for ``batch`` sequences). Generating one token is the
    prompt's forward pass: the difference to ``new_tokens`` leaves the new_tokens - 1 decode steps."""
    steps = _best(lambda: generate(new_tokens), best_of) - _best(lambda: generate(1), best_of)
    return batch * (new_tokens - 1) / max(steps, 1e-9)


@torch.inference_mode()
def measure(folder: str | os.PathLike, prompt_tokens: int = 256, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Load a saved ACIP model and measure it in this process; returns an EfficiencyRow's fields but name/ratio."""
    gc.collect()
    before = _resident(folder)
    reset_peak_rss()
    model = ACIPModel.from_pretrained(folder).eval()
    if torch.cuda.is_available():  # resident figures then cover the host side only
        model.to("cuda")
    device = next(model.parameters()).device
    ids = torch.randint(model.config.text_config.vocab_size, (1, prompt_tokens), device=device,
                        generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    prompt = ids[:, :16]

    def generate(n: int):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    model(ids[:, :8])  # first calls pay one-off costs (kernel selection, allocator growth)
    generate(2)
    # Best of `repeats`. Prefill keeps the last position's logits only, as generate() does.
    prefill = _best(lambda: model(ids, logits_to_keep=1), repeats)
    decode = _decode_rate(generate, 1, new_tokens, repeats)
    rss_mib, process_rss_mib = _added_mib(before, folder)
    return {
        "params": model.get_num_params(full=True),
        "bytes": model_bytes(model),
        "file_bytes": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")),
        # Weights may be memory-mapped from the checkpoint and become resident as they are first read: the
        # resident size is taken after the runs, when every weight has been used.
        "rss_mib": rss_mib,
        "process_rss_mib": process_rss_mib,
        "peak_rss_mib": (peak_rss_bytes() - before[1]) / _MIB,
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": decode,
    }


def _measure_in_subprocess(folder: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Run :func:`measure` in a fresh interpreter: its memory figures are not polluted by this process."""
    command = [sys.executable, "-m", "acip.efficiency", str(folder), "--prompt-tokens", str(prompt_tokens),
               "--new-tokens", str(new_tokens), "--repeats", str(repeats)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def efficiency_report(
    model_dir: str | os.PathLike,
    ratios: Sequence[float] = (0.4,),
    quant_type: str | None = "nf4",
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    repeats: int = 3,
) -> list[EfficiencyRow]:
    """Dense, then for each ratio the pruned-and-compressed model and (with ``quant_type``) it quantized to 4 bits:
    size, memory and speed, each measured in its own process."""
    ratios = check_ratios(ratios)
    for name, value, lowest in (("prompt_tokens", prompt_tokens, 2), ("new_tokens", new_tokens, 2),
                                ("repeats", repeats, 1)):  # fmt: skip
        if value < lowest:
            raise ValueError(f"{name} must be at least {lowest}, got {value}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="acip-efficiency-") as tmp:
        for ratio in [1.0, *ratios]:
            name = "dense" if ratio == 1.0 else f"ACIP {ratio:g}"
            model = load_at_size(model_dir, ratio)
            saved = [(name, Path(tmp) / name)]
            model.save_pretrained(Path(tmp) / name)
            if quant_type is not None and ratio < 1.0:
                model.quantize(quant_type)
                name = f"{name} + {quant_type}"
                saved.append((name, Path(tmp) / name))
                model.save_pretrained(Path(tmp) / name)
            del model
            gc.collect()
            for name, folder in saved:
                figures = _measure_in_subprocess(folder, prompt_tokens, new_tokens, repeats)
                rows.append(EfficiencyRow(name=name, ratio=ratio, **figures))
    return rows


def format_rows(rows: list[EfficiencyRow]) -> str:
    """A plain-text table of the rows, with ratios against the first (dense) row."""
    dense = rows[0]
    header = (f"{'model':<16}{'params':>12}{'MiB':>9}{'on disk':>9}{'RSS MiB':>9}{'proc RSS':>10}{'peak MiB':>10}"
              f"{'prefill t/s':>13}{'decode t/s':>12}{'× decode':>10}{'× RSS':>8}")  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(
            f"{row.name:<16}{row.params:>12,}{row.bytes / _MIB:>9.1f}{row.file_bytes / _MIB:>9.1f}"
            f"{row.rss_mib:>9.1f}{row.process_rss_mib:>10.1f}{row.peak_rss_mib:>10.1f}{row.prefill_tokens_per_s:>13.1f}"
            f"{row.decode_tokens_per_s:>12.1f}{row.decode_tokens_per_s / dense.decode_tokens_per_s:>10.2f}"
            f"{row.rss_mib / dense.rss_mib:>8.2f}"
        )
    return "\n".join(lines)


def write_rows(rows: list[EfficiencyRow], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``eval_efficiency.{json,csv}`` to ``out_dir`` atomically."""
    names = [f.name for f in fields(EfficiencyRow)]
    csv = ",".join(names) + "\n" + "".join(",".join(str(getattr(r, n)) for n in names) + "\n" for r in rows)
    return {
        "json": write_json(Path(out_dir) / f"{REPORT_STEM}.json", [asdict(r) for r in rows]),
        "csv": write_atomically(Path(out_dir) / f"{REPORT_STEM}.csv", csv),
    }


# --------------------------------------------------------------------------------------------------------------------
# Inference speed of one saved form (dense, compressed, fused), optionally compiled: benchmarks/inference.py runs
# measure_inference in fresh processes, interleaved and repeated.
# --------------------------------------------------------------------------------------------------------------------

PROMPT = 16  # tokens of the prompt that decoding starts from

# How the compiled rows compile, per device. CPU: weights frozen into the graph as constants (inductor prepacks them
# for MKL) and the graph's wrapper generated as C++ rather than Python. Both target what a batch-1 decode step costs
# besides reading the weights: SmolLM2 fused at 0.4, one thread, decoded 32 ms/token compiled plainly or frozen, 26 ms
# frozen with the C++ wrapper (eager: 33-36 ms); compiling took 99 s and 170 s. benchmarks/inference.py: 2.09x eager
# dense's decode, 1.69x compiled dense's (docs/inference.md). CUDA: CUDA graphs, the usual cure for per-kernel launch
# costs with a static cache (not run here: no GPU).
COMPILE_OPTIONS = {"cpu": {"options": {"freezing": True, "cpp_wrapper": True}}, "cuda": {"mode": "reduce-overhead"}}


@torch.inference_mode()
def measure_inference(folder: str | os.PathLike, dtype: str = "float32", compile: bool = False,
                      new_tokens: int = 32, batches: Sequence[int] = (1, 8), prompts: Sequence[int] = (256, 1024),
                      best_of: int = 2) -> dict:  # fmt: skip
    """Load a saved ACIP model in ``dtype`` (as saved: dense, compressed or fused) and measure it in this process:
    greedy decode tokens/s per batch size (generated tokens of all sequences / s, prompt excluded), prefill tokens/s
    per prompt length (one forward pass, last logits only, as generate() runs it), resident memory the model adds
    (after decoding at the first batch size), and the seconds of the first calls (compilation, for ``compile``).
    Each timing is the best of ``best_of``.

    ``compile``: ``model.forward = torch.compile(model.forward, **COMPILE_OPTIONS[device type])`` (a fused model
    laid out contiguous first), and decoding with a static KV cache of one fixed length, so each shape compiles
    once."""
    gc.collect()
    before = _resident(folder)
    model = ACIPModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    device = next(model.parameters()).device
    if compile:
        if model.config.fused_groups:
            model.fuse(layout="contiguous")  # inductor runs the input-major layout at half the speed
        model.forward = torch.compile(model.forward, **COMPILE_OPTIONS.get(device.type, {}))
    ids = torch.randint(model.config.text_config.vocab_size, (max(batches), max(prompts)), device=device,
                        generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    cache = dict(cache_implementation="static", max_cache_len=PROMPT + new_tokens) if compile else {}

    def generate(batch: int, n: int):
        return model.generate(ids[:batch, :PROMPT], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, **cache)  # fmt: skip

    figures = {"first_calls_s": 0.0}
    for batch in batches:
        start = time.perf_counter()  # first calls: one-off costs (compilation, kernel selection, allocator growth)
        generate(batch, 2)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"decode_b{batch}"] = _decode_rate(lambda n: generate(batch, n), batch, new_tokens, best_of)
        if batch == batches[0]:  # the model as a chat user runs it: weights (all read by now) and a small cache
            figures["rss_mib"], figures["process_rss_mib"] = _added_mib(before, folder)
    for length in prompts:
        start = time.perf_counter()
        model(ids[:1, :length], logits_to_keep=1)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"prefill_{length}"] = length / _best(lambda: model(ids[:1, :length], logits_to_keep=1), best_of)
    figures["params"] = model.get_num_params(full=True)
    return figures


def build_inference_packages(folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                             new_tokens: int = 32, batches: Sequence[int] = (1, 8),
                             prompts: Sequence[int] = (256, 1024)) -> Path:  # fmt: skip
    """Compile the saved model in ``folder`` ahead of time (:func:`acip.aot.build_package`) into the packages
    :func:`measure_packages` runs, in ``out``: one per decode batch size (cache: prompt + ``new_tokens``) and one per
    prefill length (batch 1, cache: that length). Minutes each."""
    from .aot import build_package

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ACIPModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    for batch in batches:
        build_package(model, out / f"decode_b{batch}.pt2", batch_size=batch, max_cache_len=PROMPT + new_tokens)
    for length in prompts:
        # a cache of exactly the prompt: attention reads every slot of a static cache, so a 1024-slot cache made the
        # 256-token prefill attend over four times the keys eager prefill does (1.14x dense instead of ~1.6x)
        build_package(model, out / f"prefill_{length}.pt2", batch_size=1, max_cache_len=length)
    return out


@torch.inference_mode()
def measure_packages(folder: str | os.PathLike, new_tokens: int = 32, batches: Sequence[int] = (1, 8),
                     prompts: Sequence[int] = (256, 1024), best_of: int = 2) -> dict:  # fmt: skip
    """:func:`measure_inference`'s figures for the packages :func:`build_inference_packages` wrote to ``folder``,
    run by :class:`acip.aot.PackagedLM` (its greedy loop instead of ``generate``); first calls = loading them."""
    from .aot import PackagedLM

    folder = Path(folder)
    gc.collect()
    before = _resident(folder)
    figures = {"first_calls_s": 0.0}

    for batch in batches:
        start = time.perf_counter()
        lm = PackagedLM(folder / f"decode_b{batch}.pt2")
        ids = torch.randint(lm.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
        lm.generate(ids, 2)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"decode_b{batch}"] = _decode_rate(lambda n: lm.generate(ids, n), batch, new_tokens, best_of)
        if batch == batches[0]:
            figures["rss_mib"], figures["process_rss_mib"] = _added_mib(before, folder)
        lm = None  # unloaded before the next is loaded
        gc.collect()
    for length in prompts:
        start = time.perf_counter()
        lm = PackagedLM(folder / f"prefill_{length}.pt2")
        ids = torch.randint(lm.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        lm(ids)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"prefill_{length}"] = length / _best(lambda: lm(ids), best_of)
        lm = None  # unloaded before the next is loaded
        gc.collect()
    figures["params"] = 0  # not known from a package (the folder's model has them)
    return figures


def measure_inference_in_subprocess(folder: str | os.PathLike, dtype: str = "float32", compile: bool = False,
                                    threads: int | None = None, new_tokens: int = 32, package: bool = False) -> dict:
    """:func:`measure_inference` (or with ``package``, :func:`measure_packages` on the packages in ``folder``) in a
    fresh interpreter (own memory, own compile state), with ``threads`` torch threads (None: torch's default)."""
    command = [sys.executable, "-m", "acip.efficiency", str(folder), "--inference", "--dtype", dtype,
               "--new-tokens", str(new_tokens)] + ["--compile"] * compile + ["--package"] * package  # fmt: skip
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {folder} ({dtype}, compile={compile}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Measure one saved model in this process and print its figures as one JSON line (used by the report)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inference", action="store_true", help="measure_inference instead of measure")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--package", action="store_true", help="folder holds build_inference_packages' packages")
    args = parser.parse_args(argv)
    import acip  # noqa: F401  (registers the auto classes, as a user's import would)

    if args.inference and args.package:
        figures = measure_packages(args.folder, new_tokens=args.new_tokens)
    elif args.inference:
        figures = measure_inference(args.folder, args.dtype, args.compile, new_tokens=args.new_tokens)
    else:
        figures = measure(args.folder, args.prompt_tokens, args.new_tokens, args.repeats)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
