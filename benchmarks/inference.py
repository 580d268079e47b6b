"""Inference speed and memory of SmolLM2-135M: dense vs ACIP compressed vs fused, dense and fused also under
torch.compile, at size ratios 0.8, 0.6 and 0.4, in float32 and bfloat16.

Every configuration is saved once in its dtype (dense = the ACIP model compressed at ratio 1.0: the base model's
shapes) and measured in a fresh process (acip.efficiency.measure_inference): greedy decode tokens/s at batch 1 and 8
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
With --rank-multiple M, fused rows with every kept rank rounded up to a multiple of M are added.
With --package-dtypes (default float32), dense and fused are also compiled ahead of time (acip.aot, minutes per
package, before the repeats) and served by acip.aot.PackagedLM: "+ package" rows.

Targets (float32, batch 1, against dense): at 0.4 decode >= 1.7x (median; >= 1.5x in every repeat), prefill
>= 1.5x, resident memory <= 0.55x; at 0.6 decode >= 1.3x; at 0.8 not slower than dense. bfloat16: no form slower
than its unfused (compressed) form.

    python benchmarks/inference.py [--model-dir runs/quality] [--repeats 3] [--threads N] [--compile-dtypes float32]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from acip import ACIPModel
from acip.efficiency import build_inference_packages, measure_inference_in_subprocess

RATIOS = (0.8, 0.6, 0.4)
DTYPES = ("float32", "bfloat16")
COLUMNS = (("decode_b1", "decode b1 t/s"), ("decode_b8", "decode b8 t/s"), ("prefill_256", "prefill 256 t/s"),
           ("prefill_1024", "prefill 1024 t/s"), ("rss_mib", "RSS MiB"), ("process_rss_mib", "process RSS MiB"),
           ("first_calls_s", "first calls s"))  # fmt: skip


def build_source(folder: Path) -> Path:
    """The embedded SmolLM2, parametrized in the whitened basis (untrained), saved to ``folder``."""
    from acip import parametrize
    from acip.data import TrainBatches
    from acip.default_model import load_default_model

    base, tokenizer = load_default_model(torch.float32)
    calibration = next(TrainBatches("wiki-train", tokenizer, 256, 32, seed=0).batches())  # (32, 256)
    parametrize(base, "whitened", calibration).save_pretrained(folder)
    return folder


def save_configurations(source: Path, root: Path, ratios, dtypes, rank_multiple: int | None) -> list[dict]:
    """Save every form at every ratio in every dtype under ``root``; returns the configurations to measure."""
    configurations = []
    for dtype in dtypes:
        for ratio in (1.0, *ratios):
            variants = [("compressed", 1)] if ratio < 1.0 else [("dense", 1)]
            if ratio < 1.0 and rank_multiple:
                variants.append((f"ranks x{rank_multiple}", rank_multiple))
            for label, multiple in variants:
                model = ACIPModel.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
                model.prune_model_by_score(ratio, rank_multiple=multiple).compress()
                size = model.get_size_ratio()
                folder = root / f"{dtype}-{ratio:g}-{multiple}"
                if label != "dense":
                    if label == "compressed":
                        model.save_pretrained(folder / "compressed")
                        configurations.append(dict(dtype=dtype, ratio=ratio, form="compressed", size=size,
                                                   folder=folder / "compressed", compile=False))  # fmt: skip
                    model.fuse()
                    label = "fused" if multiple == 1 else f"fused, ranks x{multiple}"
                model.save_pretrained(folder / "model")
                configurations.append(dict(dtype=dtype, ratio=ratio, form=label, size=size, folder=folder / "model",
                                           compile=False))  # fmt: skip
                del model
    return configurations


def with_compiled(configurations: list[dict], dtypes) -> list[dict]:
    """The configurations plus, after each dense and each plain fused one in ``dtypes``, the same folder measured
    compiled (acip.efficiency.COMPILE_OPTIONS): the compiled dense row is what a compiled fused row competes with."""
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
        if c["form"] in ("dense", "fused") and c["dtype"] in dtypes and not c["compile"]:
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
    parser.add_argument("--rank-multiple", type=int, default=None, help="add fused rows with ranks rounded up to this")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="acip-inference-") as tmp:
        source = Path(args.model_dir) if args.model_dir else build_source(Path(tmp) / "source")
        configurations = save_configurations(source, Path(tmp), args.ratios, args.dtypes, args.rank_multiple)
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
