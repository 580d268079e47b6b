"""Inference speed and memory of SmolLM2-135M: dense vs ACIP compressed vs fused, dense and fused also under
torch.compile, at size ratios 0.8, 0.6 and 0.4, in float32 and bfloat16.

Every configuration is saved once in its dtype (dense = the ACIP model compressed at ratio 1.0: the base model's
shapes) and measured in a fresh process (measure_inference, below): greedy decode tokens/s at batch 1 and 8
(generate, KV cache, prompt of 16 tokens), prefill tokens/s at 256 and 1024 tokens (one forward pass), resident
memory the model adds after decoding at batch 1 (its tensors, heap and checkpoint pages: "RSS"; and what the
process's resident set grew by, which also holds ~30 MiB of library code that the first matmuls page in whatever the
model: "process RSS"), and the seconds of the first calls (compilation for the compiled rows). The
configurations run interleaved (every configuration once, then again, --repeats times), so that a slow spell of a
shared machine hits all of them alike; each figure is the median over the repeats, with [min-max], and ratios are
against the dense model of the same dtype, median to median. Decode ratios at batch 1 are also given per repeat
(repeat i of a configuration against repeat i of dense, which ran just before it).

Uses the ACIP model in --model-dir (a folder made by `acip compress --preset quick`); without one, the embedded
SmolLM2 is parametrized in the whitened basis (32 x 256 calibration tokens of wiki-train, as a run draws them),
untrained: pruning then follows the initial scores. Speed depends only on the ranks, not on the score values.
With --rank-multiple M, fused rows with every kept rank rounded up to a multiple of M are added; with --plain-factors,
rows of the same kept ranks stored as two plain factors instead of gauge-aligned (the "factors" cost rule's form).
With --quant-types int8 int4, dense and fused are also measured quantized ("+ int8" rows: quantize("int8"), torch's
weight-only CPU kernels). With --package-dtypes (default float32), dense and fused (and fused + int8 / int4) are also
compiled ahead of time (acip.aot, minutes per
package, before the repeats) and served by acip.aot.PackagedLM: "+ package" rows.

Targets (float32, batch 1, against dense): at 0.4 decode >= 1.7x (median; >= 1.5x in every repeat), prefill
>= 1.5x, resident memory <= 0.55x; at 0.6 decode >= 1.3x; at 0.8 not slower than dense. bfloat16: no form slower
than its unfused (compressed) form.

    python benchmarks/inference.py [--model-dir runs/quality] [--repeats 3] [--threads N] [--compile-dtypes float32]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from acip import ACIPModel
from acip.efficiency import added_mib, best_time, decode_rate, resident

RATIOS = (0.8, 0.6, 0.4)
DTYPES = ("float32", "bfloat16")
COLUMNS = (("decode_b1", "decode b1 t/s"), ("decode_b8", "decode b8 t/s"), ("prefill_256", "prefill 256 t/s"),
           ("prefill_1024", "prefill 1024 t/s"), ("rss_mib", "RSS MiB"), ("process_rss_mib", "process RSS MiB"),
           ("first_calls_s", "first calls s"))  # fmt: skip


PROMPT = 16  # tokens of the prompt that decoding starts from

# How the compiled rows compile, per device. CPU: weights frozen into the graph as constants (inductor prepacks them
# for MKL) and the graph's wrapper generated as C++ rather than Python; both target what a batch-1 decode step costs
# besides reading the weights (docs/inference.md, "Compiled for the CPU", measures each). CUDA: CUDA graphs, the usual
# cure for per-kernel launch costs with a static cache.
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
    before = resident(folder)
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
        figures[f"decode_b{batch}"] = decode_rate(lambda n: generate(batch, n), batch, new_tokens, best_of)
        if batch == batches[0]:  # the model as a chat user runs it: weights (all read by now) and a small cache
            figures["rss_mib"], figures["process_rss_mib"] = added_mib(before, folder)
    for length in prompts:
        start = time.perf_counter()
        model(ids[:1, :length], logits_to_keep=1)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"prefill_{length}"] = length / best_time(lambda: model(ids[:1, :length], logits_to_keep=1), best_of)
    figures["params"] = model.get_num_params(full=True)
    return figures


def build_inference_packages(folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                             new_tokens: int = 32, batches: Sequence[int] = (1, 8),
                             prompts: Sequence[int] = (256, 1024)) -> Path:  # fmt: skip
    """Compile the saved model in ``folder`` ahead of time (:func:`acip.aot.build_package`) into the packages
    :func:`measure_packages` runs, in ``out``: one per decode batch size (cache: prompt + ``new_tokens``) and one per
    prefill length (batch 1, cache: that length). Minutes each."""
    from acip.aot import build_package

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ACIPModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    for batch in batches:
        build_package(model, out / f"decode_b{batch}.pt2", batch_size=batch, max_cache_len=PROMPT + new_tokens)
    for length in prompts:
        # a cache of exactly the prompt: attention reads every slot of a static cache, so a longer cache would make
        # a prefill attend over more keys than eager prefill does (docs/inference.md, "Prefill packages sized...")
        build_package(model, out / f"prefill_{length}.pt2", batch_size=1, max_cache_len=length)
    return out


@torch.inference_mode()
def measure_packages(folder: str | os.PathLike, new_tokens: int = 32, batches: Sequence[int] = (1, 8),
                     prompts: Sequence[int] = (256, 1024), best_of: int = 2) -> dict:  # fmt: skip
    """:func:`measure_inference`'s figures for the packages :func:`build_inference_packages` wrote to ``folder``,
    run by :class:`acip.aot.PackagedLM` (its greedy loop instead of ``generate``); first calls = loading them."""
    from acip.aot import PackagedLM

    folder = Path(folder)
    gc.collect()
    before = resident(folder)
    figures = {"first_calls_s": 0.0}

    for batch in batches:
        start = time.perf_counter()
        lm = PackagedLM(folder / f"decode_b{batch}.pt2")
        ids = torch.randint(lm.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
        lm.generate(ids, 2)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"decode_b{batch}"] = decode_rate(lambda n: lm.generate(ids, n), batch, new_tokens, best_of)
        if batch == batches[0]:
            figures["rss_mib"], figures["process_rss_mib"] = added_mib(before, folder)
        lm = None  # unloaded before the next is loaded
        gc.collect()
    for length in prompts:
        start = time.perf_counter()
        lm = PackagedLM(folder / f"prefill_{length}.pt2")
        ids = torch.randint(lm.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        lm(ids)
        figures["first_calls_s"] += time.perf_counter() - start
        figures[f"prefill_{length}"] = length / best_time(lambda: lm(ids), best_of)
        lm = None  # unloaded before the next is loaded
        gc.collect()
    figures["params"] = 0  # not known from a package (the folder's model has them)
    return figures


def measure_inference_in_subprocess(folder: str | os.PathLike, dtype: str = "float32", compile: bool = False,
                                    threads: int | None = None, new_tokens: int = 32, package: bool = False) -> dict:
    """:func:`measure_inference` (or with ``package``, :func:`measure_packages` on the packages in ``folder``) in a
    fresh interpreter (own memory, own compile state), with ``threads`` torch threads (None: torch's default)."""
    command = [sys.executable, __file__, "--measure", str(folder), "--dtype", dtype, "--new-tokens", str(new_tokens)]
    command += ["--compile"] * compile + ["--package"] * package
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {folder} ({dtype}, compile={compile}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_source(folder: Path) -> Path:
    """The embedded SmolLM2, parametrized in the whitened basis (untrained), saved to ``folder``."""
    from acip import parametrize
    from acip.data import TrainBatches
    from acip.default_model import load_default_model

    base, tokenizer = load_default_model(torch.float32)
    calibration = next(TrainBatches("wiki-train", tokenizer, 256, 32, seed=0).batches())  # (32, 256)
    parametrize(base, "whitened", calibration).save_pretrained(folder)
    return folder


def save_configurations(source: Path, root: Path, ratios, dtypes, rank_multiple: int | None,
                        plain: bool = False, quant_types=()) -> list[dict]:  # fmt: skip
    """Save every form at every ratio in every dtype under ``root``; returns the configurations to measure. With
    ``plain``, the same kept ranks also stored as two plain factors (the "factors" cost rule's form) beside the
    model's own rule: what the gauge-aligned form costs or gains in speed. Dense and fused are also quantized with
    each of ``quant_types``."""
    configurations = []
    for dtype in dtypes:
        for ratio in (1.0, *ratios):
            # (label of the compressed row or None, label of the fused or dense row, rank multiple, storage rule)
            variants = [("compressed", "fused", 1, None)] if ratio < 1.0 else [(None, "dense", 1, None)]
            if ratio < 1.0 and rank_multiple:
                variants.append((None, f"fused, ranks x{rank_multiple}", rank_multiple, None))
            if ratio < 1.0 and plain:
                variants.append(("plain factors", "fused, plain factors", 1, "factors"))
            for compressed_label, label, multiple, rule in variants:
                model = ACIPModel.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
                model.prune_model_by_score(ratio, rank_multiple=multiple)
                if rule is not None:  # same kept ranks, stored under another rule
                    model.config.rank_cost = rule
                model.compress()
                size = model.get_size_ratio()
                folder = root / f"{dtype}-{ratio:g}-{multiple}{'-' + rule if rule else ''}"
                if compressed_label is not None:
                    model.save_pretrained(folder / "compressed")
                    configurations.append(dict(dtype=dtype, ratio=ratio, form=compressed_label, size=size,
                                               folder=folder / "compressed", compile=False))  # fmt: skip
                if label != "dense":
                    model.fuse()
                model.save_pretrained(folder / "model")
                configurations.append(dict(dtype=dtype, ratio=ratio, form=label, size=size, folder=folder / "model",
                                           compile=False))  # fmt: skip
                del model
                for quant_type in quant_types if label in ("dense", "fused") else ():
                    quantized = ACIPModel.from_pretrained(folder / "model", dtype=getattr(torch, dtype)).eval()
                    quantized.quantize(quant_type).save_pretrained(folder / quant_type)
                    configurations.append(dict(dtype=dtype, ratio=ratio, form=f"{label} + {quant_type}", size=size,
                                               folder=folder / quant_type, compile=False))  # fmt: skip
                    del quantized
    return configurations


def with_compiled(configurations: list[dict], dtypes) -> list[dict]:
    """The configurations plus, after each dense and each plain fused one in ``dtypes``, the same folder measured
    compiled (COMPILE_OPTIONS): the compiled dense row is what a compiled fused row competes with."""
    out = []
    for c in configurations:
        out.append(c)
        if c["form"] in ("dense", "fused") and c["dtype"] in dtypes:
            out.append({**c, "form": f"{c['form']} + compile", "compile": True})
    return out


def with_packages(configurations: list[dict], dtypes, new_tokens: int) -> list[dict]:
    """The configurations plus, after each dense and each plain fused one in ``dtypes``, its ahead-of-time compiled
    packages (acip.aot; built here, minutes each): the same model served without the compiler in the process."""
    out = []
    for c in configurations:
        out.append(c)
        packaged = ("dense", "fused", "fused + int8", "fused + int4")
        if c["form"] in packaged and c["dtype"] in dtypes and not c["compile"]:
            start = time.perf_counter()
            packages = build_inference_packages(c["folder"], c["folder"].parent / "packages", c["dtype"], new_tokens)
            print(f"packages of {c['dtype']} {c['ratio']:g} {c['form']}: {time.perf_counter() - start:.0f} s",
                  flush=True)  # fmt: skip
            out.append({**c, "form": f"{c['form']} + package", "folder": packages, "package": True})
    return out


def summarize(configurations: list[dict], runs: list[list[dict]]) -> str:
    """The table: per configuration, median [min-max] of each figure over the repeats, and ratios to dense."""
    lines = []
    dense = {c["dtype"]: i for i, c in enumerate(configurations) if c["form"] == "dense"}
    header = f"{'dtype':<9}{'ratio':>6}{'size':>7} {'form':<22}" + "".join(f"{title:>24}" for _, title in COLUMNS)
    lines.append(header + f"{'x decode b1':>13}{'x prefill 256':>15}{'x RSS':>7}  x decode b1 per repeat")
    for i, c in enumerate(configurations):
        cells = []
        for key, _ in COLUMNS:
            values = [run[i][key] for run in runs]
            cells.append(f"{statistics.median(values):>9.1f} [{min(values):.1f}-{max(values):.1f}]".rjust(24))
        d = dense[c["dtype"]]
        med = {key: statistics.median(run[i][key] for run in runs)
               / statistics.median(run[d][key] for run in runs) for key in ("decode_b1", "prefill_256", "rss_mib")}
        each = " ".join(f"{run[i]['decode_b1'] / run[d]['decode_b1']:.2f}" for run in runs)
        ratios = f"{med['decode_b1']:>13.2f}{med['prefill_256']:>15.2f}{med['rss_mib']:>7.2f}  {each}"
        lines.append(f"{c['dtype']:<9}{c['ratio']:>6g}{c['size']:>7.3f} {c['form']:<22}" + "".join(cells) + ratios)
    return "\n".join(lines)


def main() -> None:
    """The benchmark (or, with --measure, one measurement of it in this process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a saved ACIP model (default: whitened SmolLM2, untrained)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all configurations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode measurement")
    parser.add_argument("--compile-dtypes", nargs="*", default=list(DTYPES), choices=DTYPES,
                        help="dtypes with compiled dense and fused rows (none: no such rows; each compiles minutes)")
    parser.add_argument("--package-dtypes", nargs="*", default=["float32"], choices=DTYPES,
                        help="dtypes with ahead-of-time compiled dense and fused rows (acip.aot; minutes per package)")
    parser.add_argument("--quant-types", nargs="*", default=[], choices=["int8", "int4", "nf4"],
                        help="also measure dense and fused quantized with each (quantize(); fused ones packaged too)")
    parser.add_argument("--rank-multiple", type=int, default=None, help="add fused rows with ranks rounded up to this")
    parser.add_argument("--plain-factors", action="store_true",
                        help="add rows of the same kept ranks stored as two plain factors (unaligned)")
    parser.add_argument("--measure", metavar="FOLDER", default=None, help="what the benchmark runs in a fresh process: "
                        "measure the saved form in FOLDER here and print its figures as one JSON line")  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="--measure: the dtype to load in")
    parser.add_argument("--compile", action="store_true", help="--measure: under torch.compile")
    parser.add_argument("--package", action="store_true", help="--measure: FOLDER holds build_inference_packages'")
    args = parser.parse_args()
    if args.measure is not None:
        if args.package:
            figures = measure_packages(args.measure, new_tokens=args.new_tokens)
        else:
            figures = measure_inference(args.measure, args.dtype, args.compile, new_tokens=args.new_tokens)
        print(json.dumps(figures))
        return

    with tempfile.TemporaryDirectory(prefix="acip-inference-") as tmp:
        source = Path(args.model_dir) if args.model_dir else build_source(Path(tmp) / "source")
        configurations = save_configurations(source, Path(tmp), args.ratios, args.dtypes, args.rank_multiple,
                                             args.plain_factors, args.quant_types)  # fmt: skip
        configurations = with_compiled(configurations, args.compile_dtypes)
        configurations = with_packages(configurations, args.package_dtypes, args.new_tokens)
        runs = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            runs.append([measure_inference_in_subprocess(c["folder"], c["dtype"], c["compile"], args.threads,
                                                         args.new_tokens, c.get("package", False))
                         for c in configurations])  # fmt: skip
            print(f"repeat {repeat + 1}/{args.repeats}: {time.perf_counter() - start:.0f} s", flush=True)

    threads = args.threads or torch.get_num_threads()
    print(f"\nSmolLM2-135M ({'--model-dir ' + args.model_dir if args.model_dir else 'whitened, untrained'}), "
          f"{threads} thread(s) per process, {args.repeats} interleaved repeats, median [min-max]; size = size ratio "
          f"of the target layers; ratios to dense of the same dtype\n")  # fmt: skip
    print(summarize(configurations, runs))


if __name__ == "__main__":
    main()
