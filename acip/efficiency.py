"""What a size buys: parameters, bytes, resident memory and tokens/s of an ACIP model, dense vs pruned-and-compressed
vs compressed + 4-bit (``acip eval --efficiency``). The timing and memory helpers serve benchmarks/inference.py too.

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


def resident(folder) -> tuple[int, int]:
    """(the process's own resident bytes and those mapping ``folder``'s files, its whole resident set): the first
    leaves out shared libraries, whose code pages the first matmuls bring in whatever the model (see
    acip.memory.own_rss_bytes); where it cannot be told apart, both are the whole."""
    whole = rss_bytes()
    own = own_rss_bytes(folder)
    return (whole if own is None else own), whole


def added_mib(before: tuple[int, int], folder) -> tuple[float, float]:
    """MiB added since ``before`` (a :func:`resident` reading): to the model's own memory, to the process's."""
    own, whole = resident(folder)
    return (own - before[0]) / _MIB, (whole - before[1]) / _MIB


def _timed(fn) -> float:
    """Wall seconds of one call (CUDA work included: kernels run asynchronously)."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_time(fn, best_of: int) -> float:
    """The shortest of ``best_of`` timed calls: on a shared machine the least disturbed one."""
    return min(_timed(fn) for _ in range(best_of))


def decode_rate(generate, batch: int, new_tokens: int, best_of: int) -> float:
    """Decoded tokens/s of ``generate(n)`` (n new tokens for ``batch`` sequences). Generating one token is the
    prompt's forward pass: the difference to ``new_tokens`` leaves the new_tokens - 1 decode steps."""
    steps = best_time(lambda: generate(new_tokens), best_of) - best_time(lambda: generate(1), best_of)
    return batch * (new_tokens - 1) / max(steps, 1e-9)


@torch.inference_mode()
def measure(folder: str | os.PathLike, prompt_tokens: int = 256, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Load a saved ACIP model and measure it in this process; returns an EfficiencyRow's fields but name/ratio."""
    gc.collect()
    before = resident(folder)
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
    prefill = best_time(lambda: model(ids, logits_to_keep=1), repeats)
    decode = decode_rate(generate, 1, new_tokens, repeats)
    rss_mib, process_rss_mib = added_mib(before, folder)
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


def main(argv: list[str] | None = None) -> None:
    """Measure one saved model in this process and print its figures as one JSON line (used by the report)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import acip  # noqa: F401  (registers the auto classes, as a user's import would)

    print(json.dumps(measure(args.folder, args.prompt_tokens, args.new_tokens, args.repeats)))


if __name__ == "__main__":
    main()
