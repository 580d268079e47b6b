"""Held-out perplexity against size: ACIP (quick preset, SmolLM2-135M) vs SVD truncation of the same base model.

Uses the ACIP model in --model-dir, or runs `acip compress --preset quick` there first (about 14 min on 2 cores).
Every method is scored on the same windows of each text (built-in Wikipedia validation split and Lee news). Prints
the perplexity table, then PPL(ACIP) / PPL(SVD) at 0.9 ... 0.5 for both SVD baselines (below 1 = ACIP better), and
writes eval_perplexity.{json,csv,png} into the model folder (the README's plot).

    python benchmarks/quality.py [--model-dir runs/quality] [--max-blocks 16]
"""

import argparse
import time
from pathlib import Path

from acip import preset, run_acip
from acip.evaluation import DEFAULT_DATA, evaluate_perplexity
from acip.report import write_report
from acip.records import RUN_FILE

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
COMPARED = (0.9, 0.8, 0.7, 0.6, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="runs/quality", help="ACIP model to evaluate (made if missing)")
    parser.add_argument("--max-blocks", type=int, default=16, help="windows of 512 tokens per text")
    args = parser.parse_args()

    if not (Path(args.model_dir) / RUN_FILE).exists():
        start = time.perf_counter()
        run_acip(preset("quick"), args.model_dir)
        print(f"ACIP run (quick preset): {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    report = evaluate_perplexity(args.model_dir, DEFAULT_DATA, RATIOS, max_blocks=args.max_blocks, baselines=True)
    print(f"evaluation: {time.perf_counter() - start:.0f} s")
    print(report.table())
    for data, by_method in report.results.items():
        print(f"\nPPL(ACIP) / PPL(SVD) on {data}")
        baselines = {m: ppl for m, ppl in by_method.items() if m != "ACIP"}
        print(f"{'ratio':>6}" + "".join(f"{m:>14}" for m in baselines))
        for ratio in COMPARED:
            acip = by_method["ACIP"][ratio]
            print(f"{ratio:>6.2f}" + "".join(f"{acip / ppl[ratio]:>14.2e}" for ppl in baselines.values()))
    paths = write_report(report, args.model_dir)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
