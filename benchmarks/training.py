"""Tokens/s of an ACIP training step on SmolLM2-135M: at the start of a run, and once half the ranks are dead.

Builds the quick preset's trainer (SVD parametrization, LoRA, AdamW; 4 x 128 tokens per step), times --steps steps
at full rank, then kills the lower half of every layer's singular values (their masks set to a dead value, as the
L1 penalty would), lets the compactor slice them out and times --steps more. The original implementation computes
full rank throughout, so its step costs what the first figure is for the whole run.

    python benchmarks/training.py [--steps 5]
"""

import argparse
import statistics
import tempfile

import torch

from acip import preset
from acip.loop import Runtime, TrainingLoop
from acip.training import ACIPTask


def timed_steps(loop: TrainingLoop, data, steps: int) -> list[float]:
    """tokens/s of ``steps`` pruning steps (L1 penalty on), after one untimed warm-up step."""
    loop.train_step(data)
    return [loop.train_step(data)["tokens_per_s"] for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime()
        task = ACIPTask(preset("quick"), runtime)
        loop = TrainingLoop(task, tmp, runtime)
        data = loop.batches.batches()
        start = timed_steps(loop, data, args.steps)
        with torch.no_grad():
            for layer in task.layers.values():
                layer.mask[layer.rank // 2 :] = -task.config.mask_constant  # the lower half of the spectrum
        task.compactor.compact_dead(force=True)
        half = timed_steps(loop, data, args.steps)
        computed = task.compactor.computed_fraction()
        config = task.config

    first, later = statistics.median(start), statistics.median(half)
    print(f"ACIP step, {config.batch_size} x {config.block_size} tokens, median of {args.steps}:")
    steps = lambda figures: ", ".join(f"{t:.0f}" for t in figures)  # noqa: E731
    print(f"  {'full rank (start of a run):':<34}{first:7.1f} tokens/s   (steps: {steps(start)})")
    print(f"  {f'{computed:.0%} of the ranks computed:':<34}{later:7.1f} tokens/s   (steps: {steps(half)})")
    print(f"  speed-up once half the ranks died: {later / first:.2f}x")


if __name__ == "__main__":
    main()
