"""Plain vs whitened singular basis on SmolLM2-135M: held-out perplexity at 0.9 … 0.5 for (a) truncation in the
weight's SVD basis, (b) truncation in the whitened basis, (c) ACIP from the weight basis, (d) ACIP from the whitened
basis — (c) and (d) with the quick preset (same data, same settings). Target: (d) ≤ 0.7 × (c) at every ratio ≤ 0.8.

Truncation without training keeps the same share of every layer's parameters ("uniform", as SVD-LLM does); the
whitened basis is also pruned globally by its initial scores (the normalized whitened singular values), which is what
``prune_model_by_score`` does on a freshly whitened model. Calibration: 32 random sequences of 256 tokens from the
Wikipedia train split; held-out: the first 16 windows of 512 tokens of the validation split. Also prints the time and
the extra peak memory (RSS) of parametrizing in each basis.

    python benchmarks/basis.py [--runs runs/basis] [--no-acip]   # makes the two ACIP runs when missing (~15 min each)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from acip import ACIPModel, parametrize, preset, run_acip
from acip.data import TrainBatches, load_blocks
from acip.default_model import load_default_model
from acip.evaluation import perplexity, ratio_sweep, uniform_scores
from acip.memory import model_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from acip.records import RUN_FILE

RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)
MIB = 2**20


def parametrized(basis: str, calibration: torch.Tensor) -> ACIPModel:
    """A fresh SmolLM2 parametrized in ``basis``."""
    base, _ = load_default_model(torch.float32)
    return parametrize(base, basis, calibration if basis == "whitened" else None).eval()


def parametrization_cost(basis: str) -> dict:
    """Seconds and peak resident MiB above the loaded base model of parametrizing in ``basis`` (in this process:
    call it in a fresh one, see --cost)."""
    base, tokenizer = load_default_model(torch.float32)
    calibration = calibration_blocks(tokenizer)
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    model = parametrize(base, basis, calibration if basis == "whitened" else None)
    return {"seconds": time.perf_counter() - start, "peak_mib": (peak_rss_bytes() - before) / MIB,
            "model_mib": model_bytes(model) / MIB}  # fmt: skip


def calibration_blocks(tokenizer) -> torch.Tensor:
    """32 random sequences of 256 tokens from the Wikipedia train split (the ACIP run's default calibration)."""
    return next(TrainBatches("wiki-train", tokenizer, 256, 32, seed=0).batches())  # (32, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/basis", help="folder of the two ACIP runs (made when missing)")
    parser.add_argument("--no-acip", action="store_true", help="truncation rows (a), (b) only: no ACIP runs")
    parser.add_argument("--cost", choices=("weight", "whitened"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.cost:
        print(json.dumps(parametrization_cost(args.cost)))
        return

    costs = {}
    for basis in ("weight", "whitened"):  # each in a fresh process: peak memory is not blurred by earlier models
        done = subprocess.run([sys.executable, __file__, "--cost", basis], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        costs[basis] = json.loads(done.stdout.strip().splitlines()[-1])

    _, tokenizer = load_default_model(torch.float32)
    calibration = calibration_blocks(tokenizer)
    held_out = load_blocks("wiki-validation", tokenizer, 512, max_blocks=16)
    rows = {}
    for basis in ("weight", "whitened"):
        model = parametrized(basis, calibration)
        if basis == "weight":
            dense = perplexity(model, held_out)  # ratio 1.0 is the dense model
        initial = {name: score.clone() for name, score in model.score_map.items()}
        model.score_map = uniform_scores(model)
        rows[f"({'a' if basis == 'weight' else 'b'}) {basis} basis, uniform truncation"] = ratio_sweep(
            model, held_out, RATIOS, desc=basis
        )
        if basis == "whitened":
            model.score_map = initial
            rows["(b') whitened basis, global by initial score"] = ratio_sweep(model, held_out, RATIOS, desc=basis)
        del model

    runs = (("(c) ACIP from the weight basis", "weight"), ("(d) ACIP from the whitened basis", "whitened"))
    for label, basis in runs if not args.no_acip else ():
        folder = Path(args.runs) / basis
        if not (folder / RUN_FILE).exists() or not (folder / "model.safetensors").exists():
            run_acip(preset("quick", basis=basis), folder, overwrite=True)
        model = ACIPModel.from_pretrained(folder).eval()
        rows[label] = ratio_sweep(model, held_out, RATIOS, desc=basis)
        del model

    print(f"SmolLM2-135M, held-out perplexity (wiki-validation, 16 x 512 tokens); dense {dense:.2f}\n")
    print("| method | " + " | ".join(f"{r:.1f}" for r in RATIOS) + " |")
    print("|---|" + "---:|" * len(RATIOS))
    for label, by_ratio in rows.items():
        print(f"| {label} | " + " | ".join(f"{by_ratio[r]:.1f}" for r in RATIOS) + " |")
    if not args.no_acip:
        c, d = rows["(c) ACIP from the weight basis"], rows["(d) ACIP from the whitened basis"]
        print("| (d) / (c) | " + " | ".join(f"{d[r] / c[r]:.2f}" for r in RATIOS) + " |")
        met = all(d[r] <= 0.7 * c[r] for r in RATIOS if r <= 0.8)
        print(f"\ntarget (d) <= 0.7 x (c) at every ratio <= 0.8: {'met' if met else 'NOT met'}")
    for basis, cost in costs.items():
        print(f"parametrizing, {basis} basis (fresh process): {cost['seconds']:.0f} s, peak {cost['peak_mib']:.0f} MiB "
              f"above the loaded base model; the parametrized model holds {cost['model_mib']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
