"""Prune planning latency on a LLaMA-7B-shaped score map (random scores, no weights needed).

32 layers x (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008) = 224 layers, 917,504 scores.
Prints the median time of `plan_pruning` at ratios 0.4 ... 0.9 on random scores, next to a naive planner (binary
search over k with kthvalue, recounting every layer per probe, as the original implementation does); the first
call, which also builds the cached shape-only tables; and two harder maps: a trained-like one (60% of the values
dead with integer death-step scores, so long runs of ties) and an untrained one (every score equal).
Target: <= 20 ms per ratio on random scores.

    python benchmarks/prune_latency.py [--repeats 15]
"""

import argparse
import statistics
import time

import torch

from acip.hub.parametrization import _shape_tables, plan_pruning, rank_cost

RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def llama7b_shapes() -> list[tuple[int, int]]:
    """(in_features, out_features) of the 224 linear layers of LLaMA-2-7B."""
    block = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    return block * 32


def naive_plan(scores, shapes, budget):
    """The original planner: binary search on the number pruned, kthvalue threshold + full recount per probe."""
    flat = torch.cat(scores)
    lo, hi = 0, flat.numel()
    while lo < hi:  # largest k (values pruned) whose cost still reaches the budget
        mid = (lo + hi + 1) // 2
        threshold = torch.kthvalue(flat, mid).values if mid > 0 else -torch.inf
        cost = sum(rank_cost(int((s > threshold).sum()), i, o) for s, (i, o) in zip(scores, shapes))
        if cost >= budget:
            lo = mid
        else:
            hi = mid - 1
    threshold = torch.kthvalue(flat, lo).values if lo > 0 else -torch.inf
    return [s > threshold for s in scores]


def trained_like(shapes, generator) -> list[torch.Tensor]:
    """Scores as an ACIP run leaves them: alive masks small positive floats, dead ones -steps since death."""
    out = []
    for i, o in shapes:
        k = min(i, o)
        alive = torch.rand(k, generator=generator) < 0.4
        dead_for = torch.randint(0, 500, (k,), generator=generator).float()
        out.append(torch.where(alive, 0.02 * torch.rand(k, generator=generator), -dead_for))
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--naive-repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    shapes = llama7b_shapes()
    scores = [torch.randn(min(i, o)) for i, o in shapes]
    total = sum(i * o for i, o in shapes)
    print(f"score map: {len(shapes)} layers, {sum(s.numel() for s in scores):,} scores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    _shape_tables.cache_clear()
    start = time.perf_counter()
    plan_pruning(scores, shapes, int(0.5 * total))
    cold = (time.perf_counter() - start) * 1e3
    print(f"first call (builds the cached tie-break order from the shapes): {cold:.1f} ms")

    print(f"{'ratio':>6} {'plan (ms)':>10} {'naive (ms)':>11} {'speed-up':>9} {'achieved':>9}")
    for ratio in RATIOS:
        budget = int(ratio * total)
        plan_ms = median_ms(lambda: plan_pruning(scores, shapes, budget), args.repeats)
        naive_ms = median_ms(lambda: naive_plan(scores, shapes, budget), args.naive_repeats)
        keep, cost = plan_pruning(scores, shapes, budget)
        print(f"{ratio:>6.1f} {plan_ms:>10.1f} {naive_ms:>11.1f} {naive_ms / plan_ms:>8.0f}x {cost / total:>9.5f}")

    generator = torch.Generator().manual_seed(1)
    untrained = [s * 0 + 0.02 for s in scores]
    for name, other in (("trained-like", trained_like(shapes, generator)), ("untrained", untrained)):
        times = [median_ms(lambda: plan_pruning(other, shapes, int(r * total)), args.repeats) for r in RATIOS]
        print(f"{name} map: median over ratios {statistics.median(times):.1f} ms, worst {max(times):.1f} ms")


if __name__ == "__main__":
    main()
