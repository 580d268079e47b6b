"""Tokens/s of an ACIP training step on SmolLM2-135M: float32 against bf16 matrix products, at full rank and once half
the ranks are dead, interleaved in one run; and where the time of a step goes.

Builds one quick-preset task per configuration (SVD parametrization in the weight basis, LoRA, AdamW; 4 x 128 tokens
per step; the basis does not change the cost), then alternates their steps: --repeats rounds of one step each, at full
rank, then again after the lower half of every layer's singular values was killed (masks set to a dead value, as the
L1 penalty would) and sliced out. Prints median [min - max] tokens/s, then a profile of one full-rank step per
configuration by phase (forward and loss, backward, optimizer, after-step bookkeeping: the loop's profiler labels) and
by kind of operation.

    python benchmarks/training.py [--repeats 5]
"""

import argparse
import copy
import statistics
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from acip import preset
from acip.base_model import load_base_model
from acip.loop import Runtime, TrainingLoop
from acip.training import ACIPTask

CONFIGS = {  # name -> overrides of the quick preset
    "float32 (today)": dict(compute_dtype="float32", lora_dropout=0.05, distill_alpha=0.0),  # 2026-11-25's preset
    "bf16": dict(compute_dtype="bfloat16", lora_dropout=0.05, distill_alpha=0.0),
    "bf16, no LoRA dropout": dict(compute_dtype="bfloat16", lora_dropout=0.0, distill_alpha=0.0),
    "new: bf16, no dropout, distill": dict(compute_dtype="bfloat16", lora_dropout=0.0, distill_alpha=0.5),
}
REFERENCE = "float32 (today)"
PHASES = ("forward and loss", "backward", "optimizer", "after step")
KINDS = {  # operator name fragments -> kind of work
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product",),
    "dropout (random numbers)": ("bernoulli", "aten::rand", "native_dropout"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to"),
    "softmax / cross entropy": ("softmax", "nll_loss", "cross_entropy"),
    "optimizer kernels": ("adam",),
}


def build(base, tokenizer, overrides: dict) -> TrainingLoop:
    """A quick-preset ACIP training loop on a copy of the base model."""
    config = preset("quick", basis="weight", **overrides)
    runtime = Runtime(compute_dtype=config.compute_dtype)
    task = ACIPTask(config, runtime, copy.deepcopy(base), tokenizer)
    return TrainingLoop(task, tempfile.mkdtemp(prefix="acip-bench-"), runtime)


def interleaved(loops: dict, streams: dict, repeats: int) -> dict[str, list[float]]:
    """tokens/s of ``repeats`` steps per loop, one step of each loop per round, after one untimed step each."""
    for name, loop in loops.items():
        loop.train_step(streams[name])
    speeds = defaultdict(list)
    for _ in range(repeats):
        for name, loop in loops.items():
            speeds[name].append(loop.train_step(streams[name])["tokens_per_s"])
    return speeds


def breakdown(loop: TrainingLoop, stream) -> tuple[dict, dict, float]:
    """Seconds of one profiled step by loop phase and by kind of operation (self time), and the step's wall time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = loop.train_step(stream)["seconds"]
    phases, kinds = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        if event.key in PHASES:
            phases[event.key] = event.cpu_time_total / 1e6
            continue
        kind = next((k for k, names in KINDS.items() if any(n in event.key for n in names)), "other")
        kinds[kind] += event.self_cpu_time_total / 1e6
    return phases, kinds, seconds


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} [{min(values):.1f} - {max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration and phase")
    args = parser.parse_args()

    base, tokenizer = load_base_model("smollm2", torch.float32)
    loops = {name: build(base, tokenizer, overrides) for name, overrides in CONFIGS.items()}
    streams = {name: loop.batches.batches() for name, loop in loops.items()}
    full = interleaved(loops, streams, args.repeats)
    profiles = {name: breakdown(loop, streams[name]) for name, loop in loops.items()}
    with torch.no_grad():
        for loop in loops.values():
            for layer in loop.task.layers.values():
                layer.mask[layer.rank // 2 :] = -loop.task.config.mask_constant  # the lower half of the spectrum
            loop.task.compactor.compact_dead(force=True)
    half = interleaved(loops, streams, args.repeats)

    print(f"ACIP step, quick preset (4 x 128 tokens), SmolLM2-135M, {torch.get_num_threads()} threads; "
          f"tokens/s, median [min - max] of {args.repeats} interleaved steps")  # fmt: skip
    print(f"{'configuration':<28}{'full rank':>22}{'half the ranks dead':>24}{'x today':>11}{'x today':>11}")
    print(f"{'':<74}{'(full)':>11}{'(half)':>11}")
    for name in CONFIGS:
        ratios = [statistics.median(by[name]) / statistics.median(by[REFERENCE]) for by in (full, half)]
        print(f"{name:<28}{summary(full[name]):>22}{summary(half[name]):>24}{ratios[0]:>10.2f}x{ratios[1]:>10.2f}x")
    for name, loop in loops.items():
        if loop.task.teacher is not None:
            teacher = loop.task.teacher  # parameters() counts tied weights once
            mib = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()]) / 2**20
            print(f"{name}: the teacher (frozen copy of the base model) holds {mib:.0f} MiB")
    for name, (phases, kinds, seconds) in profiles.items():
        print(f"\none full-rank step, {name}: {seconds:.2f} s (profiled)")
        print("  by phase: " + ", ".join(f"{p} {phases[p]:.2f} s" for p in PHASES))
        print("  by kind:  " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
