"""The ``acip`` command line: ``acip compress`` (the ACIP run), ``acip eval`` (perplexity across size ratios,
zero-shot tasks, size and speed), ``acip finetune`` (LoRA on a compressed model), ``acip export`` (a folder
ready for the Hub, optionally pushed), ``acip package`` (a compressed model compiled ahead of time) and ``acip
convert`` (a checkpoint of the original ACIP implementation as an acip model folder).

A mistake on the command line ends in one line on stderr, ``acip COMMAND: error: MESSAGE``, as argparse words its own:
exit status 2 for bad arguments (what acip's checks refuse: the library raises ValueError, FileNotFoundError and
their kin with a message naming the argument), 1 for a failure at run time (another process holds the folder, the
disk is full, an export does not load, an interrupt: 130). ``--debug`` or ``ACIP_DEBUG=1`` adds the traceback.
Anything else is a bug of acip: its traceback is shown, with a line saying where to report it.
"""

import argparse
import dataclasses
import dis
import json
import os
import sys
import time
import traceback
import typing
from pathlib import Path

import torch

from . import hub
from .distributed import Processes
from .evaluation import DEFAULT_DATA, DEFAULT_RATIOS
from .export import CALIBRATION, CALIBRATION_BLOCKS
from .finetune import FinetuneConfig, finetune
from .folders import check_not_busy
from .hub.modeling_acip import QUANT_TYPES
from .inputs import check_data_source
from .records import CONVERT_FILE, EXPORT_FILE, FINETUNE_FILE, RUN_FILE
from .runs import recorded_settings
from .sizes import check_acip_model, check_ratio_suits, check_ratios, load_at_size
from .training import PRESETS, ACIPRunConfig, preset, run_acip


def _add_config_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One option per field of a config dataclass, with the field's help text; unset options keep the default."""
    for f in dataclasses.fields(config_class):
        option = f"--{f.name.replace('_', '-')}"
        if f.type is bool:  # --name / --no-name
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
            continue
        kind = typing.get_args(f.type)[0] if typing.get_origin(f.type) is not None else f.type
        kind = kind if kind in (int, float) else str
        parser.add_argument(
            option, type=kind, default=None, choices=f.metadata.get("choices"),
            help=f.metadata.get("help", ""),
        )  # fmt: skip


def _add_run_options(parser: argparse.ArgumentParser, result: str, config_class) -> None:
    """The options of a training command: where it writes, resume, overwrite, and one per config field."""
    parser.add_argument("--output-dir", required=True, help=f"where {result}, log and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint "
                        "(options given must equal the recorded ones)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a previous acip result in --output-dir, "
                        "once the new one is complete")  # fmt: skip
    _add_config_options(parser, config_class)


def _config_overrides(args: argparse.Namespace, config_class) -> dict:
    """The config fields given on the command line."""
    fields = dataclasses.fields(config_class)
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None}


def _resumed_config(args: argparse.Namespace, config_class, record_file: str):
    """For ``--resume``: the recorded settings with the options given on the command line applied (only those are
    compared with the record; the run refuses any that differ). None when there is no run to resume."""
    if not args.resume:
        return None
    return recorded_settings(args.output_dir, record_file, config_class, **_config_overrides(args, config_class))


def compress_main(args: argparse.Namespace) -> None:
    """acip compress: run ACIP and save a full, prunable ACIP model."""
    config = _resumed_config(args, ACIPRunConfig, RUN_FILE) if args.preset is None else None
    if config is None:
        config = preset(args.preset or "paper", **_config_overrides(args, ACIPRunConfig))
    start = time.perf_counter()
    model = run_acip(config, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    if Processes().is_main:
        print(
            f"saved {args.output_dir} in {time.perf_counter() - start:.0f} s: {len(model.config.target_modules)} "
            "parametrized layers; prune it with model.prune_model_by_score(compression_ratio=...)"
        )


def finetune_main(args: argparse.Namespace) -> None:
    """acip finetune: prune, compress, optionally quantize, LoRA fine-tune, save merged model or adapter."""
    config = _resumed_config(args, FinetuneConfig, FINETUNE_FILE)
    config = config or FinetuneConfig(**_config_overrides(args, FinetuneConfig))
    start = time.perf_counter()
    finetune(args.model_dir, args.output_dir, config, resume=args.resume, overwrite=args.overwrite)
    if not Processes().is_main:
        return
    record = json.loads((Path(args.output_dir) / FINETUNE_FILE).read_text())
    before, after = record.get("perplexity_before"), record.get("perplexity_after")
    held_out = f"; held-out perplexity {before:.2f} -> {after:.2f}" if before is not None else ""
    print(f"saved {args.output_dir} ({record['config']['save']}) in {time.perf_counter() - start:.0f} s at size ratio "
          f"{record['size_ratio']:.3f}{held_out}")  # fmt: skip


def export_main(args: argparse.Namespace) -> None:
    """acip export: a Hub-ready folder (model card, requirements, code), checked offline; optionally pushed."""
    from .export import export_model, push_to_hub

    if args.push_to_hub and not args.repo_id:
        raise ValueError("--push-to-hub needs --repo-id ORG/NAME")
    start = time.perf_counter()
    out = export_model(
        args.model_dir, args.out_dir, repo_id=args.repo_id, license=args.license, ratio=args.ratio,
        quantize=args.quantize, dtype=args.dtype, overwrite=args.overwrite, validate=not args.no_validate,
        calibration=None if args.calibration == "none" else args.calibration,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    checked = "" if args.no_validate else ", loads offline through trust_remote_code"
    print(f"exported {out} ({size / 2**20:.1f} MiB{checked}) in {time.perf_counter() - start:.0f} s")
    replaced = json.loads((out / EXPORT_FILE).read_text()).get("local_paths_replaced") or []
    if replaced:
        print("local paths replaced by their last component (the folder names no file of this machine):")
        print("".join(f"  {line}\n" for line in replaced), end="")
    if args.push_to_hub:
        url = push_to_hub(out, args.repo_id, private=args.private, validate=False)  # just checked above
        print(f"pushed to {url}")


def package_main(args: argparse.Namespace) -> None:
    """acip package: prune to --ratio, compress, fuse and compile ahead of time into one .pt2 file (acip.aot)."""
    from .aot import build_package, check_package_target

    check_ratio_suits("model_dir", args.model_dir, args.ratio)
    if Path(args.model_dir).is_dir():
        check_not_busy(args.model_dir, "model_dir")
    check_package_target(Path(args.out), args.batch_size, args.max_cache_len, args.overwrite)
    start = time.perf_counter()
    model = load_at_size(args.model_dir, args.ratio, getattr(torch, args.dtype))
    if args.fuse and not model.config.fused_groups:
        model.fuse()
    path = build_package(model, args.out, args.batch_size, args.max_cache_len, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; size ratio {model.get_size_ratio():.3f}, batch "
          f"{args.batch_size}, up to {args.max_cache_len} tokens) in {time.perf_counter() - start:.0f} s; run it with "
          "acip.aot.PackagedLM(path).generate(input_ids, max_new_tokens)")  # fmt: skip


def convert_main(args: argparse.Namespace) -> None:
    """acip convert: a checkpoint of the original ACIP implementation as an acip model folder (acip.convert)."""
    from .convert import convert

    start = time.perf_counter()
    out = convert(args.src, args.out, base_model=args.base_model, dtype=args.dtype, overwrite=args.overwrite,
                  max_shard_size=args.max_shard_size)  # fmt: skip
    record = json.loads((out / CONVERT_FILE).read_text())
    lora = record.get("lora")
    held = f"; its LoRA (rank {lora['rank']}, alpha {lora['alpha']:g}) is added at every size" if lora else ""
    print(f"converted {args.src} into {out} in {time.perf_counter() - start:.0f} s: {record['layers']} parametrized "
          f"layers, {record['dtype']}{held}; prune it with model.prune_model_by_score(compression_ratio=...), as "
          "the original did")  # fmt: skip


def eval_main(args: argparse.Namespace) -> None:
    """acip eval: held-out perplexity across size ratios (default), zero-shot tasks (--tasks) or size, memory and
    speed (--efficiency) of a saved ACIP model; tables are printed and written next to the model."""
    check_ratios(args.ratios)
    for source in args.data:
        check_data_source("data", source)
    check_acip_model("model_dir", args.model_dir)
    if Path(args.model_dir).is_dir():
        check_not_busy(args.model_dir, "model_dir")  # a run or export is writing it
    out_dir = Path(args.output_dir or (args.model_dir if Path(args.model_dir).is_dir() else "."))
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output_dir must be a folder, but {out_dir} is a file")
    if args.efficiency:
        _efficiency(args, out_dir)
    elif args.tasks:
        _zero_shot(args, out_dir)
    else:
        _perplexity(args, out_dir)


def _perplexity(args: argparse.Namespace, out_dir: Path) -> None:
    """The perplexity sweep of acip eval."""
    from .evaluation import evaluate_perplexity
    from .report import write_report

    report = evaluate_perplexity(
        args.model_dir, args.data, args.ratios, args.block_size, args.max_blocks, args.batch_size,
        baselines=args.svd_baseline, base_model=args.base_model,
    )  # fmt: skip
    print(report.table())
    paths = write_report(report, out_dir)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _efficiency(args: argparse.Namespace, out_dir: Path) -> None:
    """The efficiency report of acip eval: dense vs each ratio below 1, compressed and compressed + 4-bit."""
    from .efficiency import efficiency_report, format_rows, write_rows

    ratios = [r for r in args.ratios if r < 1.0] or [0.4]
    rows = efficiency_report(args.model_dir, ratios, quant_type=None if args.no_quantize else "nf4")
    print(format_rows(rows))
    paths = write_rows(rows, out_dir)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _zero_shot(args: argparse.Namespace, out_dir: Path) -> None:
    """The lm-eval sweep of acip eval."""
    from .folders import write_json
    from .zeroshot import ACIPLM, zero_shot_sweep

    lm = ACIPLM(args.model_dir, batch_size=args.batch_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # lm-eval: int = count
    results = zero_shot_sweep(lm, args.tasks, args.ratios, args.num_fewshot, limit, args.include_path)
    metrics = sorted({(task, m) for by_task in results.values() for task, ms in by_task.items() for m in ms})
    print(f"{'ratio':>6}" + "".join(f"{task + ' ' + m:>24}" for task, m in metrics))
    for ratio, by_task in results.items():
        print(f"{ratio:>6.2f}" + "".join(f"{by_task[task].get(m, float('nan')):>24.4f}" for task, m in metrics))
    record = {"model": args.model_dir, "tasks": args.tasks, "num_fewshot": args.num_fewshot, "limit": limit,
              "results": {repr(r): v for r, v in results.items()}}  # fmt: skip
    path = write_json(out_dir / "eval_zeroshot.json", record)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``acip`` command."""
    parser = Parser(prog="acip", description="Any Compression via Iterative Pruning")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_compress, _add_finetune, _add_export, _add_eval, _add_package, _add_convert):
        add_command(commands)
    commands.metavar = "{" + ",".join(commands.choices) + "}"  # argparse's own, so that its error names them too
    for command in commands.choices.values():  # also after the command's name; unset, it keeps acip --debug's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parser.commands = commands.choices
    return parser


DEBUG_HELP = "on an error, show its traceback too (also: environment variable ACIP_DEBUG=1)"


def _add_compress(commands) -> None:
    """``acip compress``: the ACIP run."""
    compress = commands.add_parser("compress", help="run ACIP on a base model and save a prunable ACIP model")
    compress.add_argument("--preset", choices=sorted(PRESETS), default=None,
                          help="settings to start from (default: paper; with --resume: the recorded settings)")
    _add_run_options(compress, "the ACIP model", ACIPRunConfig)
    compress.set_defaults(main=compress_main)


def _add_finetune(commands) -> None:
    """``acip finetune``: prune, compress and LoRA-tune a saved ACIP model."""
    tune = commands.add_parser(
        "finetune", help="prune a saved ACIP model to a size, compress (and 4-bit quantize), then LoRA fine-tune it"
    )
    tune.add_argument("model_dir", help="a saved ACIP model (e.g. the output of acip compress)")
    _add_run_options(tune, "the fine-tuned model", FinetuneConfig)
    tune.set_defaults(main=finetune_main)


def _add_export(commands) -> None:
    """``acip export``: a Hub-ready folder."""
    export = commands.add_parser(
        "export", help="write a Hub-ready folder (model card, requirements, code, tokenizer), checked; optionally push"
    )
    export.add_argument("model_dir", help="a saved ACIP model (prunable, compressed or fine-tuned)")
    export.add_argument("out_dir", help="the folder to write")
    export.add_argument("--repo-id", default=None, help="ORG/NAME on the Hub: named in the model card, pushed to")
    export.add_argument("--license", default=None, help="Hub license id (apache-2.0, mit, other...); "
                        "needed unless the base model's is known")  # fmt: skip
    export.add_argument("--ratio", type=float, default=None, help="prune to this size ratio and compress first")
    export.add_argument("--quantize", choices=QUANT_TYPES, default=None, help="store the layers in 4 bits (nf4, fp4: "
                        "bitsandbytes; int4: torch's CPU kernels) or 8 bits (int8)")
    export.add_argument("--calibration", default=CALIBRATION, metavar="SOURCE", help="int4: text whose activations "
                        f"guide the rounding (GPTQ, {CALIBRATION_BLOCKS} x 512 tokens; default {CALIBRATION}; a file, "
                        "corpus or Hub dataset as for --data), or 'none' to round to nearest")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weight dtype")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir once the new one passed")
    export.add_argument("--no-validate", action="store_true", help="skip loading the folder in a fresh process")
    export.add_argument("--push-to-hub", action="store_true", help="upload to --repo-id (token: HF_TOKEN or hf login)")
    export.add_argument("--private", action="store_true", help="create the Hub repository as private")
    export.set_defaults(main=export_main)


def _add_package(commands) -> None:
    """``acip package``: a compressed model compiled ahead of time."""
    package = commands.add_parser(
        "package", help="prune a saved ACIP model to a size, compress, fuse and compile it ahead of time (one .pt2 "
        "file, run by acip.aot.PackagedLM without a compiler in the serving process; minutes on a CPU)"
    )  # fmt: skip
    package.add_argument("model_dir", help="a saved ACIP model (prunable: give --ratio; or compressed)")
    package.add_argument("out", help="the package to write (NAME.pt2)")
    package.add_argument("--ratio", type=float, default=None, help="prune to this size ratio and compress first")
    package.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights")
    package.add_argument("--no-fuse", dest="fuse", action="store_false", help="compile the unfused compressed form")
    package.add_argument("--batch-size", type=int, default=1, help="sequences per call (fixed in the package)")
    package.add_argument("--max-cache-len", type=int, default=1024, help="prompt + generated tokens at most")
    package.add_argument("--overwrite", action="store_true", help="replace an existing package when done")
    package.set_defaults(main=package_main)


CONVERT_HELP = ("convert a checkpoint of the original ACIP implementation (e.g. MerantixMomentum/acip_llama2_7b) "
                "into an acip model folder: the same model, prunable, on today's transformers")


def _add_convert(commands) -> None:
    """``acip convert``: a checkpoint of the original implementation as an acip model folder."""
    convert = commands.add_parser("convert", help=CONVERT_HELP)
    convert.add_argument("src", metavar="SRC", help="the original checkpoint: a folder, or a Hub id")
    convert.add_argument("out", metavar="OUT", help="the folder to write")
    convert.add_argument("--base-model", default=None, help="where the base model's config comes from (a folder or "
                         "a Hub id; default: the repository the checkpoint names, often gated)")  # fmt: skip
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="weight dtype (default: as in src; masks and scores stay float32)")  # fmt: skip
    convert.add_argument("--max-shard-size", default="5GB", help="largest weight file written (e.g. 5GB)")
    convert.add_argument("--overwrite", action="store_true", help="replace a previous acip result in out, once "
                         "the new one is complete")  # fmt: skip
    convert.set_defaults(main=convert_main)


def _add_eval(commands) -> None:
    """``acip eval``: perplexity, zero-shot tasks or efficiency across sizes."""
    evaluate = commands.add_parser(
        "eval", help="perplexity across size ratios (default), zero-shot tasks, or size/memory/speed of an ACIP model"
    )
    evaluate.add_argument("model_dir", help="a saved ACIP model (e.g. the output of acip compress)")
    evaluate.add_argument(
        "--data", nargs="+", default=list(DEFAULT_DATA), help="texts to score (built-in corpus, file, hf:...)"
    )
    evaluate.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="size ratios")
    evaluate.add_argument("--block-size", type=int, default=512, help="tokens per non-overlapping window")
    evaluate.add_argument("--max-blocks", type=int, default=None, help="score at most this many windows per text")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows (or lm-eval requests) per forward pass")
    evaluate.add_argument(
        "--svd-baseline",
        action="store_true",
        help="also score the dense base model and SVD truncation without training (uniform per layer and global)",
    )
    evaluate.add_argument("--base-model", default=None, help="base model for the baseline (default: the run's)")
    evaluate.add_argument("--output-dir", default=None, help="where eval_*.json/csv/png go (default: the model's)")
    mode = evaluate.add_mutually_exclusive_group()
    mode.add_argument(
        "--efficiency",
        action="store_true",
        help="instead of perplexity: parameters, bytes, resident memory and prefill/decode tokens/s of the dense "
        "model and of each ratio below 1 compressed and compressed + 4-bit (each in a fresh process)",
    )
    mode.add_argument(
        "--tasks", nargs="+", default=None, help="instead of perplexity: lm-eval tasks (needs acip[eval] and the data)"
    )
    evaluate.add_argument("--no-quantize", action="store_true", help="--efficiency without the 4-bit rows")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples in the prompt")
    evaluate.add_argument("--limit", type=float, default=None, help="--tasks: documents per task (count or fraction)")
    evaluate.add_argument("--include-path", default=None, help="--tasks: folder of extra lm-eval task YAML files")
    evaluate.set_defaults(main=eval_main)


BUG_REPORT = ("this is a bug in acip: please report it to the acip maintainers (the issue tracker of the repository "
              "acip came from) with the command line and the traceback above")
# What acip's checks raise for bad input (docs/guarantees.md); raised by anything else, these types are not a user's
# mistake (a wrong unpacking in acip, a check inside torch) and count as bugs.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
_ACIP_CODE = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(hub.__file__))}


def _raised_by_acip(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement of acip's own code (the package or its Hub files)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    ours = os.path.dirname(os.path.abspath(code.co_filename)) in _ACIP_CODE
    return ours and code.co_code[tb.tb_lasti] == dis.opmap["RAISE_VARARGS"]


def exit_status(error: BaseException) -> int | None:
    """The exit status of the command that ``error`` ended: 2 bad input, 1 failure at run time, 130 interrupted;
    None for a bug (an exception acip did not expect)."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    if _raised_by_acip(error):
        if isinstance(error, BAD_INPUT):
            return 2
        if isinstance(error, RuntimeError):  # e.g. FolderBusy, ExportError
            return 1
    # The machine's, wherever raised: a full disk, a missing optional package, too little memory
    if isinstance(error, (OSError, ImportError, MemoryError, torch.OutOfMemoryError)):
        return 1
    return None


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the rest of acip's: one line, ``acip COMMAND: error: MESSAGE``, exit status 2."""

    def error(self, message: str):
        """Print the one line and exit with status 2 (``acip COMMAND --help`` shows the options)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``acip`` command (see the module's docstring for how it ends on an error)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser, which names the command (the top one would say only "acip")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = f"acip {args.command}"
    try:
        args.main(args)
    except (Exception, KeyboardInterrupt) as error:
        _fail(prog, error, args.debug or os.environ.get("ACIP_DEBUG", "") not in ("", "0"))


def _fail(prog: str, error: BaseException, debug: bool) -> typing.NoReturn:
    """End the command on ``error``: one line (with its traceback first for a bug, or with ``debug``)."""
    status = exit_status(error)
    if status is None or debug:
        traceback.print_exception(error)
    if status is None:
        print(f"{prog}: internal error: {type(error).__name__}: {error}\n{prog}: {BUG_REPORT}", file=sys.stderr)
        raise SystemExit(1) from None
    message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status) from None


if __name__ == "__main__":
    main(sys.argv[1:])
