"""Decode speed of the packaged (acip.aot) fused model in float32, int8 and int4 against the dense model's eager
``generate``: batch 1, a 16-token prompt, 48 greedy new tokens, one thread, every measurement in a fresh process,
configurations interleaved, median [min-max] over --repeats. The eager fused int8 model is measured beside. Beside
each: prefill (one forward pass over a 128-token prompt, tokens/s) and the process's resident memory once it has
decoded (MiB; the interpreter and torch included).

A quicker check of issue 34's speed targets than benchmarks/inference.py (which builds four packages per form and
measures batch sizes and prompt lengths): here one package per form, minutes each.

    python benchmarks/package_decode.py --model-dir runs/quality [--ratio 0.4] [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, NEW_TOKENS, PREFILL = 16, 48, 128
FORMS = ("dense", "float32", "int8", "int4", "eager-int8")  # dense eager; fused packages; fused int8 eager


def build(model_dir: str, ratio: float, root: Path) -> None:
    """The fused model at ``ratio`` packaged in float32, int8 and int4 (and saved in int8) under ``root``."""
    from acip import ACIPModel
    from acip.aot import build_package

    for quant in ("float32", "int8", "int4"):
        model = ACIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.prune_model_by_score(ratio).compress().fuse()
        if quant != "float32":
            model.quantize(quant)
        start = time.perf_counter()
        build_package(model, root / f"{quant}.pt2", batch_size=1, max_cache_len=max(PROMPT + NEW_TOKENS + 1, PREFILL))
        print(f"{quant} package: {time.perf_counter() - start:.0f} s", flush=True)
        if quant == "int8":
            model.save_pretrained(root / "eager-int8")


@torch.no_grad()
def measure(form: str, root: Path) -> dict:
    """Decode tokens per second of one form (a 1-token run's time subtracted), prefill tokens per second and resident
    MiB, one thread."""
    from acip.memory import rss_bytes

    torch.set_num_threads(1)
    ids = torch.randint(1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    long = torch.randint(1000, (1, PREFILL), generator=torch.Generator().manual_seed(1))
    if form in ("dense", "eager-int8"):
        from transformers import AutoModelForCausalLM

        from acip.default_model import load_default_model

        model = load_default_model(torch.float32)[0] if form == "dense" else AutoModelForCausalLM.from_pretrained(
            root / form, trust_remote_code=True).eval()  # fmt: skip

        def generate(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def prefill():
            return model(long, logits_to_keep=1)
    else:
        from acip.aot import PackagedLM

        lm = PackagedLM(root / f"{form}.pt2")

        def generate(n):
            return lm.generate(ids, n)

        def prefill():
            return lm(long)

    generate(2)  # warm-up
    start = time.perf_counter()
    generate(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate(NEW_TOKENS + 1)
    decode = NEW_TOKENS / (time.perf_counter() - start - one)
    prefill()
    start = time.perf_counter()
    prefill()
    return {"decode": decode, "prefill": PREFILL / (time.perf_counter() - start), "rss_mib": rss_bytes() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a trained ACIP model folder (acip compress)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("FORM", "ROOT"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="acip-package-decode-") as tmp:
        root = Path(tmp)
        build(args.model_dir, args.ratio, root)
        runs = {form: [] for form in FORMS}
        for _ in range(args.repeats):
            for form in FORMS:
                out = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir, "--measure", form,
                                      str(root)], capture_output=True, text=True, check=True).stdout  # fmt: skip
                runs[form].append(json.loads(out.strip().splitlines()[-1]))
    decode = {form: [r["decode"] for r in values] for form, values in runs.items()}
    dense, fused = statistics.median(decode["dense"]), statistics.median(decode["float32"])
    print("| form | decode b1 t/s | × dense eager | × fused float32 package | prefill 128 t/s | RSS MiB |\n"
          "|---|---:|---:|---:|---:|---:|")
    names = {"dense": "dense, eager", "float32": f"{args.ratio:g} fused package, float32", "eager-int8":
             f"{args.ratio:g} fused int8, eager", "int8": f"{args.ratio:g} fused package, int8",
             "int4": f"{args.ratio:g} fused package, int4"}  # fmt: skip
    for form, values in decode.items():
        median = statistics.median(values)
        prefill = statistics.median(r["prefill"] for r in runs[form])
        rss = statistics.median(r["rss_mib"] for r in runs[form])
        print(f"| {names[form]} | {median:.1f} [{min(values):.1f}-{max(values):.1f}] | {median / dense:.2f} | "
              f"{median / fused:.2f} | {prefill:.0f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
