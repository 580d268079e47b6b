"""Held-out perplexity against size for ACIP runs of the quick preset on SmolLM2-135M, and the peer baseline.

Each configuration is one ACIP run (``acip compress --preset quick`` with some fields changed), evaluated at every
ratio on the same windows of the built-in Wikipedia validation split and the Lee news corpus (16 windows of 512
tokens each, float32). Runs, their wall-clock and their evaluation are kept under --root and reused, so the table can
be built over several sittings (every run takes minutes to a quarter of an hour on 2 cores).

The peer baseline is SVD-LLM's recipe: the whitened uniform truncation (every layer keeps the same share of its
rank, largest whitened singular values first) at one size, then a LoRA fine-tune (acip finetune) of as many training
tokens as the ACIP run it is compared with: one fine-tune per size, where ACIP serves every size from one run.

    python benchmarks/quality.py                      # every run below, then the table
    python benchmarks/quality.py --runs today new     # some of them
    python benchmarks/quality.py --runs new dec06 --plot docs/eval_perplexity  # their rows and the dense model's
"""

import argparse
import json
import time
from pathlib import Path

import torch

from acip import preset, run_acip
from acip.runs import latest_checkpoint
from acip.evaluation import DEFAULT_DATA, evaluate_perplexity, perplexity, uniform_scores
from acip.finetune import FinetuneConfig, finetune
from acip.records import RUN_FILE
from acip.report import REPORT_STEM, write_report

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
# Every row names all it changes from the quick preset of its day, so that it still means that run when the preset
# moves on. The preset of 2026-12-06 (issue 31's "today"): the original's cost rule r·(in + out), LoRA merged into
# every size.
DEC06 = dict(rank_cost="factors", correction_ramp=0.0, post_tune_steps=140, block_size=128, batch_size=4)
# The quick preset as it was on the morning of 2026-11-25 (float32 compute), the reference of issue 16.
TODAY = dict(DEC06, compute_dtype="float32", lambda_init=5e-3, lambda_growth=1.035, post_tune_steps=60,
             post_tune_sizes="stop", distill_alpha=0.0, lora_dropout=0.05, lora_alpha=16)  # fmt: skip
# The quick preset from the evening of 2026-11-25 to 2026-12-06: bf16, distillation α 0.5, any-size post-tuning.
NOV25 = dict(DEC06, distill_alpha=0.5, lora_alpha=16, post_tune_steps=120)
RUNS = {
    "today": TODAY,
    "bf16": {**TODAY, "compute_dtype": "auto"},
    "bf16+any-size": {**TODAY, "compute_dtype": "auto", "post_tune_sizes": "any"},
    "bf16+distill": {**TODAY, "compute_dtype": "auto", "distill_alpha": 0.5},
    "bf16+slow-lambda": {**TODAY, "compute_dtype": "auto", "lambda_growth": 1.0175},
    "bf16+paced": {**TODAY, "compute_dtype": "auto", "lambda_schedule": "paced", "pruning_steps": 120},
    # combinations tried on the way to the 2026-11-25 preset
    "bf16+distill+any+slow": {
        **TODAY,
        "compute_dtype": "auto",
        "distill_alpha": 0.5,
        "post_tune_sizes": "any",
        "lambda_growth": 1.0175,
    },
    "nov25+lambda-1.025": {**NOV25, "lambda_growth": 1.025, "post_tune_stop_share": 0.0},
    "nov25-stop-share": {**NOV25, "post_tune_stop_share": 0.0},  # every post-tune step at a drawn size
    "nov25": NOV25,
    "nov25@0.8": {**NOV25, "stop_ratio": 0.8, "post_tune_sizes": "stop"},  # dedicated: stop and post-tune there
    "nov25@0.5": {**NOV25, "stop_ratio": 0.5, "post_tune_sizes": "stop"},
    # levers tried on the 2026-11-25 preset (2026-12-06)
    "nov25+paced": {**NOV25, "lambda_schedule": "paced", "pruning_steps": 71},  # an even pace over its 71 steps
    "nov25+T2": {**NOV25, "distill_temperature": 2.0},
    "nov25+alpha0.9": {**NOV25, "distill_alpha": 0.9},
    "nov25+cosine": {**NOV25, "post_tune_lr_schedule": "cosine"},  # post-tune learning rate decays to 0
    "nov25+lora-x4": {**NOV25, "lora_alpha": 64},  # LoRA scale alpha/r 2 instead of 0.5 (fine-tuning's)
    "nov25+a0.9+x4": {**NOV25, "distill_alpha": 0.9, "lora_alpha": 64},
    "nov25+a0.9+x8": {**NOV25, "distill_alpha": 0.9, "lora_alpha": 128},
    # α 0.9 reaches the stop ratio in fewer steps: the time saved goes to post-tuning (140 steps instead of 120)
    "nov25+a0.9+x8+pt140": {**NOV25, "distill_alpha": 0.9, "lora_alpha": 128, "post_tune_steps": 140},
    # the 2026-12-06 preset ("new" until 2026-12-07): α 0.9, LoRA scale 8, 140 post-tune steps
    "dec06": DEC06,
    "dec06-seed1": {**DEC06, "seed": 1},  # another draw of data, LoRA init and post-tune sizes: the spread of one row
    "dec06+share0.6": {**DEC06, "post_tune_stop_share": 0.6},
    "dec06+weight-basis": {**DEC06, "basis": "weight"},  # the paper's basis (benchmarks/basis.py reuses this run)
    "dec06@0.8": {**DEC06, "stop_ratio": 0.8, "post_tune_sizes": "stop"},
    "dec06@0.5": {**DEC06, "stop_ratio": 0.5, "post_tune_sizes": "stop"},
    "dec06@0.8-seed1": {**DEC06, "stop_ratio": 0.8, "post_tune_sizes": "stop", "seed": 1},
    "dec06@0.5-seed1": {**DEC06, "stop_ratio": 0.5, "post_tune_sizes": "stop", "seed": 1},
    # the same wall-clock as today's: 90 post-tune steps instead of 140 (each costs its size since 2026-12-06)
    "dec06-pt90": {**DEC06, "post_tune_steps": 90},
    "dec06-pt90-seed1": {**DEC06, "post_tune_steps": 90, "seed": 1},
    # issue 31 (2026-12-07): the aligned cost rule and size-dependent corrections, then the preset they became
    "dec06+aligned": {**DEC06, "rank_cost": "aligned"},
    "dec06+aligned+ramp": {**DEC06, "rank_cost": "aligned", "correction_ramp": 0.25},
    "dec06+aligned+ramp+factors": {**DEC06, "rank_cost": "aligned", "correction_ramp": 0.25,
                                   "post_tune_factors_lr": 1e-4},  # fmt: skip  (nested consolidation)
    "new": {},  # the quick preset as it is now
    "new-seed1": {"seed": 1},
    "new@0.8": {"stop_ratio": 0.8, "post_tune_sizes": "stop"},
    "new@0.5": {"stop_ratio": 0.5, "post_tune_sizes": "stop"},
    # the original implementation's reset_layers / reset_adapters: its cost rule, its LoRA at full strength in every
    # layer that is stored factorized, the original weight (no LoRA) in every layer stored dense
    "original-reset": {"rank_cost": "factors", "correction_ramp": 1e-6},
}
PEERS = {"peer@0.8": 0.8, "peer@0.5": 0.5}  # whitened uniform truncation + fine-tune, per size
PEER_TOKENS_OF = "new"  # the ACIP run whose training tokens each peer fine-tune gets
# FlexRank's recipe (benchmarks/flexrank_peer.py) with the new preset's data, batches, distillation and sizes, for
# the steps that give it the new preset's training tokens; the learning rate of its factors
FLEXRANK = {"flexrank-style": 1e-4, "flexrank-style-lr3e-4": 3e-4}


def acip_run(name: str, root: Path, max_blocks: int) -> dict:
    """The ACIP run ``name`` (trained unless on disk) and its perplexity at every ratio."""
    folder = root / name
    result_file = folder / "bench.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    record, wall = finished_record(folder), None
    if record is None:  # a run whose evaluation was cut short is evaluated, not trained again
        # a run killed mid-training goes on from its last checkpoint (its wall-clock is then unknown)
        resume = latest_checkpoint(folder) is not None
        start = time.perf_counter()
        run_acip(preset("quick", **RUNS[name]), folder, resume=resume, overwrite=not resume)
        if not resume:
            wall = time.perf_counter() - start
        record = finished_record(folder)
    report = evaluate_perplexity(folder, DEFAULT_DATA, RATIOS, max_blocks=max_blocks)
    write_report(report, folder)
    result = {
        "wall_seconds": wall,
        "train_seconds": record["train_seconds"],
        "steps": record["steps"],
        "tokens": record_tokens(name, record),
        "perplexity": {data: {repr(r): p for r, p in by["ACIP"].items()} for data, by in report.results.items()},
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def finished_record(folder: Path) -> dict | None:
    """The run record in ``folder`` once its training finished, else None."""
    record_file = folder / RUN_FILE
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    return record if record.get("finished") else None


def record_tokens(name: str, record: dict) -> int:
    """Training tokens of the finished ACIP run ``name``."""
    return record["steps"] * record["global_batch"] * preset("quick", **RUNS[name]).block_size


def training_tokens(name: str, root: Path, max_blocks: int) -> int:
    """Training tokens of the ACIP run ``name``: from its record once trained (its evaluation may still be running
    elsewhere), else from running it."""
    record = finished_record(root / name)
    return record_tokens(name, record) if record else acip_run(name, root, max_blocks)["tokens"]


def peer_run(name: str, root: Path, tokens: int, max_blocks: int) -> dict:
    """Whitened uniform truncation to one ratio, fine-tuned with ``tokens`` training tokens (unless on disk)."""
    folder = root / name
    result_file = folder / "bench.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    from transformers import AutoTokenizer

    from acip.build import parametrize
    from acip.data import TrainBatches
    from acip.default_model import load_default_model

    ratio = PEERS[name]
    start = time.perf_counter()
    base, tokenizer = load_default_model(torch.float32)
    quick = preset("quick")
    calibration = next(
        TrainBatches(
            quick.data, tokenizer, quick.calibration_block_size, quick.calibration_blocks, quick.seed
        ).batches()
    )  # fmt: skip  (as the ACIP run draws it)
    model = parametrize(base, "whitened", calibration)
    model.score_map = uniform_scores(model)
    model.save_pretrained(folder / "truncated")
    tokenizer.save_pretrained(folder / "truncated")
    steps = max(1, round(tokens / (4 * 128)))
    tune = FinetuneConfig(ratio=ratio, steps=steps, block_size=128, batch_size=4, eval_blocks=0, checkpoint_every=0)
    tuned = finetune(folder / "truncated", folder / "tuned", tune, overwrite=True)
    wall = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(folder / "tuned")
    from acip.data import load_blocks

    by_data = {}
    for data in DEFAULT_DATA:
        windows = load_blocks(data, tokenizer, 512, max_blocks)
        by_data[data] = {repr(ratio): perplexity(tuned.float(), windows, desc=f"{name}, {data}")}
    result = {"wall_seconds": wall, "steps": steps, "tokens": steps * 4 * 128, "perplexity": by_data}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def flexrank_run(name: str, root: Path, tokens: int, max_blocks: int) -> dict:
    """The FlexRank-style peer ``name`` (benchmarks/flexrank_peer.py), ``tokens`` training tokens; reused if on disk."""
    from acip.loop import train
    from flexrank_peer import FlexRankStyleTask

    folder = root / name
    result_file = folder / "bench.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    quick = preset("quick")
    steps = max(1, round(tokens / (quick.batch_size * quick.block_size)))
    # sizes drawn uniformly from the smallest to the full model, as FlexRank's sampler walks its budgets
    config = preset("quick", post_tune_factors_lr=FLEXRANK[name], post_tune_steps=steps, post_tune_stop_share=0.0,
                    correction_ramp=0.0)  # fmt: skip
    start = time.perf_counter()
    train(lambda config, runtime: FlexRankStyleTask(config, runtime), config, folder, RUN_FILE, resume=False,
          overwrite=True)  # fmt: skip
    wall = time.perf_counter() - start
    report = evaluate_perplexity(folder, DEFAULT_DATA, RATIOS, max_blocks=max_blocks)
    write_report(report, folder)
    result = {
        "wall_seconds": wall,
        "train_seconds": finished_record(folder)["train_seconds"],
        "steps": steps,
        "tokens": steps * quick.batch_size * quick.block_size,
        "perplexity": {data: {repr(r): p for r, p in by["ACIP"].items()} for data, by in report.results.items()},
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, dict]) -> str:
    """Perplexity per ratio and text, one row per run, with its wall-clock and training tokens."""
    lines = []
    for data in DEFAULT_DATA:
        lines.append(f"\n{data} (perplexity, 16 windows of 512 tokens)")
        lines.append(f"{'run':<24}{'train s':>8}{'tokens':>9}" + "".join(f"{r:>9.1f}" for r in RATIOS))
        for name, result in results.items():
            ppl = result["perplexity"][data]
            cells = "".join(f"{ppl[repr(r)]:>9.2f}" if repr(r) in ppl else f"{'':>9}" for r in RATIOS)
            seconds = result.get("train_seconds", result["wall_seconds"])  # a peer's: truncation and fine-tune
            lines.append(f"{name:<24}{seconds:>8.0f}{result['tokens']:>9}{cells}")
    reference = next((name for name in ("dec06", "today") if name in results), None)
    if reference is not None:
        lines.append(f"\nperplexity / {reference}'s (below 1 = better)")
        for data in DEFAULT_DATA:
            today = results[reference]["perplexity"][data]
            for name, result in results.items():
                ppl = result["perplexity"][data]
                cells = "".join(f"{ppl[repr(r)] / today[repr(r)]:>9.3f}" if repr(r) in ppl else f"{'':>9}"
                                for r in RATIOS)  # fmt: skip
                lines.append(f"{data[:8] + ' ' + name:<35}{cells}")
    return "\n".join(lines)


def plot(results: dict[str, dict], out: Path, max_blocks: int) -> None:
    """Write ``out``.{csv,json,png} (acip.report's files): every run's perplexity by ratio as one line per run, and the
    dense base model's on the same windows as the dashed line."""
    from acip.data import load_blocks
    from acip.default_model import load_default_model
    from acip.report import PerplexityReport, write_report

    base, tokenizer = load_default_model(torch.float32)
    report = PerplexityReport("SmolLM2-135M, quick preset", 512, list(RATIOS))
    for data in DEFAULT_DATA:
        windows = load_blocks(data, tokenizer, 512, max_blocks)
        report.windows[data] = len(windows)
        report.dense[data] = perplexity(base.eval(), windows, desc=f"dense, {data}")
        report.results[data] = {
            name: {float(r): p for r, p in result["perplexity"][data].items()} for name, result in results.items()
        }
    write_report(report, out.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/quality", help="where runs and their results are kept")
    parser.add_argument("--runs", nargs="+", default=[*RUNS, *PEERS, *FLEXRANK], choices=[*RUNS, *PEERS, *FLEXRANK])
    parser.add_argument("--max-blocks", type=int, default=16, help="windows of 512 tokens per text")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also write FOLDER/eval_perplexity.{csv,json,png}: the runs' rows and the dense model's")
    args = parser.parse_args()
    if args.plot is not None and args.plot.name != REPORT_STEM:  # checked before hours of runs, not after
        parser.error(f"--plot must be FOLDER/{REPORT_STEM}, got {args.plot}")
    root = Path(args.root)
    results = {}
    for name in args.runs:
        if name in RUNS:
            results[name] = acip_run(name, root, args.max_blocks)
        elif name in FLEXRANK:
            tokens = training_tokens(PEER_TOKENS_OF, root, args.max_blocks)
            results[name] = flexrank_run(name, root, tokens, args.max_blocks)
        else:
            tokens = training_tokens(PEER_TOKENS_OF, root, args.max_blocks)
            results[name] = peer_run(name, root, tokens, args.max_blocks)
        print(f"{name}: {results[name].get('train_seconds', results[name]['wall_seconds']):.0f} s training", flush=True)
    print(table(results))
    if args.plot is not None:
        plot(results, args.plot, args.max_blocks)


if __name__ == "__main__":
    main()
