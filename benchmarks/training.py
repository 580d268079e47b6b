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
from acip.training import ACIPTrainer


def timed_steps(trainer: ACIPTrainer, data, steps: int) -> list[float]:
    """tokens/s of ``steps`` optimizer steps with the L1 penalty on, after one untimed warm-up step."""
    trainer._train_step(data, trainer.config.lam(0))
    return [trainer._train_step(data, trainer.config.lam(0))["tokens_per_s"] for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = ACIPTrainer(preset("quick"), tmp)
        data = trainer._micro_batches()
        start = timed_steps(trainer, data, args.steps)
        with torch.no_grad():
            for layer in trainer.layers.values():
                layer.mask[layer.rank // 2 :] = -trainer.config.mask_constant  # the lower half of the spectrum
        trainer.compactor.compact_dead(force=True)
        half = timed_steps(trainer, data, args.steps)
        computed = trainer.compactor.computed_fraction()

    first, later = statistics.median(start), statistics.median(half)
    print(f"ACIP step, {trainer.config.batch_size} x {trainer.config.block_size} tokens, median of {args.steps}:")
    steps = lambda figures: ", ".join(f"{t:.0f}" for t in figures)  # noqa: E731
    print(f"  {'full rank (start of a run):':<34}{first:7.1f} tokens/s   (steps: {steps(start)})")
    print(f"  {f'{computed:.0%} of the ranks computed:':<34}{later:7.1f} tokens/s   (steps: {steps(half)})")
    print(f"  speed-up once half the ranks died: {later / first:.2f}x")


if __name__ == "__main__":
    main()
