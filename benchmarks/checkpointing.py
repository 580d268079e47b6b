"""Gradient checkpointing in the ACIP run on SmolLM2-135M: peak memory of a training step and tokens/s, without and
with it (``ACIPRunConfig.gradient_checkpointing``).

Each mode runs in a fresh process: the quick preset's trainer (SVD parametrization, LoRA, AdamW) with longer
sequences, one untimed warm-up step, then --steps timed steps. The peak resident memory is counted from after the
trainer was built (model, LoRA, data), so it is what the steps add: activations, gradients, optimizer state.

    python benchmarks/checkpointing.py [--steps 2] [--batch-size 4] [--block-size 512]
"""

import argparse
import json
import subprocess
import sys
import tempfile

MIB = 2**20


def child(args: argparse.Namespace) -> dict:
    """One mode in this process: what the training steps add to resident memory, and their speed."""
    from acip import preset
    from acip.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from acip.loop import Runtime, TrainingLoop
    from acip.training import ACIPTask

    config = preset("quick", batch_size=args.batch_size, block_size=args.block_size,
                    gradient_checkpointing=args.child == "on")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(compute_dtype=config.compute_dtype)
        loop = TrainingLoop(ACIPTask(config, runtime), tmp, runtime)
        data = loop.batches.batches()
        built = rss_bytes()
        reset_peak_rss()
        loop.train_step(data)
        speeds = [loop.train_step(data)["tokens_per_s"] for _ in range(args.steps)]
        return {"step_peak_mib": (peak_rss_bytes() - built) / MIB, "tokens_per_s": sum(speeds) / len(speeds),
                "compute_dtype": str(runtime.compute_dtype).removeprefix("torch.")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in ("off", "on"):
        command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--block-size", str(args.block_size)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"ACIP step of the quick preset on SmolLM2-135M, {args.batch_size} x {args.block_size} tokens, "
          f"{off['compute_dtype']} matrix products, mean of {args.steps}:")  # fmt: skip
    print("| gradient checkpointing | memory added by a step (MiB) | tokens/s |")
    print("|---|---:|---:|")
    for mode in ("off", "on"):
        print(f"| {mode} | {results[mode]['step_peak_mib']:.0f} | {results[mode]['tokens_per_s']:.0f} |")
    print(f"memory: {on['step_peak_mib'] / off['step_peak_mib']:.2f}x, speed: "
          f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x with checkpointing")  # fmt: skip


if __name__ == "__main__":
    main()
