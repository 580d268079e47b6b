"""The ``acip`` command line: ``acip compress`` (the ACIP run) and ``acip eval`` (perplexity across size ratios)."""

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

import torch

from .training import PRESETS, RUN_FILE, ACIPRunConfig, load_base_model, preset, run_acip

DEFAULT_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ACIPRunConfig field, with the field's help text; unset options keep the preset's value."""
    for f in dataclasses.fields(ACIPRunConfig):
        kind = typing.get_args(f.type)[0] if typing.get_origin(f.type) is not None else f.type
        kind = kind if kind in (int, float) else str
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"{f.metadata.get('help', '')}"
        )


def compress_main(args: argparse.Namespace) -> None:
    """acip compress: run ACIP and save a full, prunable ACIP model."""
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ACIPRunConfig)
        if getattr(args, f.name, None) is not None
    }
    config = preset(args.preset, **overrides)
    start = time.perf_counter()
    model = run_acip(config, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    print(
        f"saved {args.output_dir} in {time.perf_counter() - start:.0f} s: {len(model.config.target_modules)} "
        "parametrized layers; prune it with model.prune_model_by_score(compression_ratio=...)"
    )


def eval_main(args: argparse.Namespace) -> None:
    """acip eval: held-out perplexity of a saved ACIP model at several size ratios (and SVD truncation)."""
    from transformers import AutoTokenizer

    from .data import load_blocks
    from .evaluation import perplexity, ratio_sweep, singular_value_scores, uniform_scores
    from .hub.modeling_acip import ACIPModel

    model = ACIPModel.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    blocks = load_blocks(args.data, tokenizer, args.block_size, max_blocks=args.max_blocks)
    rows = {"acip": ratio_sweep(model, blocks, args.ratios, args.batch_size, desc="ACIP")}
    dense = None
    if args.svd_baseline:
        model_config = model.config
        del model  # one model in memory at a time
        base_name = args.base_model or _run_base_model(args.model_dir)
        base, _ = load_base_model(base_name, torch.float32)
        dense = perplexity(base, blocks, args.batch_size, desc="dense base model")
        baseline = ACIPModel.from_base_model(base, target_modules=list(model_config.target_modules)).eval()
        baseline.score_map = uniform_scores(baseline)
        rows["svd uniform"] = ratio_sweep(baseline, blocks, args.ratios, args.batch_size, desc="SVD uniform")
        baseline.score_map = singular_value_scores(baseline)
        rows["svd global"] = ratio_sweep(baseline, blocks, args.ratios, args.batch_size, desc="SVD global")
    print(f"perplexity on {args.data}: {len(blocks)} windows of {args.block_size} tokens")
    if dense is not None:
        print(f"dense base model: {dense:.2f}")
    print(f"{'ratio':>6}" + "".join(f"{name:>14}" for name in rows))
    for ratio in args.ratios:
        print(f"{ratio:>6.2f}" + "".join(f"{rows[name][ratio]:>14.2f}" for name in rows))


def _run_base_model(model_dir: str) -> str:
    """The base model an ACIP run in ``model_dir`` started from."""
    run_file = Path(model_dir) / RUN_FILE
    if not run_file.exists():
        raise SystemExit(f"{model_dir} has no {RUN_FILE}; pass --base-model for the SVD baseline")
    return json.loads(run_file.read_text())["config"]["base_model"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``acip`` command."""
    parser = argparse.ArgumentParser(prog="acip", description="Any Compression via Iterative Pruning")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="run ACIP on a base model and save a prunable ACIP model")
    compress.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="settings to start from")
    compress.add_argument("--output-dir", required=True, help="where the ACIP model, log and checkpoints go")
    compress.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    compress.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    _add_config_options(compress)
    compress.set_defaults(main=compress_main)

    evaluate = commands.add_parser("eval", help="held-out perplexity of a saved ACIP model across size ratios")
    evaluate.add_argument("model_dir", help="a saved ACIP model (e.g. the output of acip compress)")
    evaluate.add_argument("--data", default="wiki-validation", help="text to score (built-in corpus, file, hf:...)")
    evaluate.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="size ratios")
    evaluate.add_argument("--block-size", type=int, default=512, help="tokens per non-overlapping window")
    evaluate.add_argument("--max-blocks", type=int, default=None, help="score at most this many windows")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    evaluate.add_argument(
        "--svd-baseline",
        action="store_true",
        help="also score the dense base model and SVD truncation without training (uniform per layer and global)",
    )
    evaluate.add_argument("--base-model", default=None, help="base model for the baseline (default: the run's)")
    evaluate.set_defaults(main=eval_main)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``acip`` command."""
    args = build_parser().parse_args(argv)
    args.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
