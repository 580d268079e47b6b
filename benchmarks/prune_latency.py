"""Prune planning latency on a LLaMA-7B-shaped score map (no weights needed): the planner of pruning.py (sort once
per score map, then one binary search over the cumulative prefix costs) against the radix select it replaced, in
the same run.

32 layers x (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008) = 224 layers, 917,504 scores, on three
maps: random scores, a trained-like map (60% of the values dead with integer death-step scores: long runs of ties)
and an untrained one (every score equal). For each planner and map: the first call on a new score map (the radix
select has no per-map state; sort-once sorts here), the cold first call (shape-only tables built too), and every
prune after it at ratios 0.4 ... 0.9, as median [min - max] over ratios x repeats. Both planners must return the
same keep sets. Then a memory-budget prune (the largest plan that fits a byte budget): one search over the cached
order against the old bisection that re-planned ~27 times. Last, ``model.prune_model_by_score`` end to end on a
SmolLM2-shaped model (210 layers; weights left uninitialised: planning never reads them).
Targets: a prune <= 2 ms after the first call on a map, first call <= 150 ms; end to end on SmolLM2 <= 5 ms.
On a machine whose cores other processes keep busy, torch's multi-threaded ops wait for their slowest thread (a
scheduler tick, ~8 ms, per op): compare ``--threads 1`` with the default there.

    python benchmarks/prune_latency.py [--repeats 15] [--threads N]
"""

import argparse
import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

import acip.hub.pruning as pruning
from acip import ACIPConfig, ACIPModel
from acip.hub.pruning import layer_bytes, plan_memory, plan_pruning

RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def llama7b_shapes() -> list[tuple[int, int]]:
    """(in_features, out_features) of the 224 linear layers of LLaMA-2-7B."""
    block = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    return block * 32


def trained_like(shapes, generator) -> list[torch.Tensor]:
    """Scores as an ACIP run leaves them: alive masks small positive floats, dead ones -steps since death."""
    out = []
    for i, o in shapes:
        k = min(i, o)
        alive = torch.rand(k, generator=generator) < 0.4
        dead_for = torch.randint(0, 500, (k,), generator=generator).float()
        out.append(torch.where(alive, 0.02 * torch.rand(k, generator=generator), -dead_for))
    return out


# --------------------------------------------------------------------------------------------------------------------
# The radix-select planner of parametrization.py as of 2026-11-24 (commit b5899d8), kept here as the comparison.
# --------------------------------------------------------------------------------------------------------------------

_TOP_BITS, _LOW_ROUNDS, _SORT_BELOW, _BLOCK = 10, ((11, 11), (0, 11)), 1 << 16, 1024


@functools.lru_cache(maxsize=8)
def _radix_tables(ranks: tuple[int, ...]):
    """Each item's layer id, the tie-break order and each item's place in it (shape-only, cached)."""
    layer_ids = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32), torch.tensor(ranks))
    relative = torch.cat([torch.div(torch.arange(k) << 30, k, rounding_mode="floor") for k in ranks])
    tie_order = torch.sort(relative.to(torch.int32), stable=True).indices
    tie_place = torch.empty_like(tie_order)
    tie_place[tie_order] = torch.arange(tie_order.numel())
    return layer_ids, tie_order, tie_place


def _where(items, mask):
    return items.index_select(0, torch.nonzero(mask).squeeze(1))


class _Costs:
    """Capped cost of per-layer kept counts, and where along a ranking it first reaches the budget."""

    def __init__(self, shapes, budget):
        self.width = torch.tensor([i + o for i, o in shapes], dtype=torch.int64)
        self.dense = torch.tensor([i * o for i, o in shapes], dtype=torch.int64)
        self.budget = min(max(int(budget), 0), int(self.dense.sum()))

    def of(self, counts):
        return torch.minimum(counts * self.width, self.dense).sum(-1)

    def crossing_bucket(self, digit, layers, n_buckets, before):
        n_layers = before.numel()
        index = digit * n_layers
        index += layers
        counts = torch.bincount(index, minlength=n_buckets * n_layers).view(n_buckets, n_layers).cumsum(0) + before
        bucket = int(torch.searchsorted(self.of(counts), self.budget))
        return bucket, (counts[bucket - 1] if bucket > 0 else before)

    def crossing_item(self, layers, before):
        position = torch.arange(layers.numel(), dtype=torch.int32) // _BLOCK
        block, before = self.crossing_bucket(position, layers, max(1, math.ceil(layers.numel() / _BLOCK)), before)
        inside = F.one_hot(layers[block * _BLOCK : (block + 1) * _BLOCK].long(), before.numel()).cumsum(0) + before
        return block * _BLOCK + int(torch.searchsorted(self.of(inside), self.budget)) + 1


def _narrow(key, layer_ids, costs, before):
    """Radix rounds: the items kept for sure, the candidates around the crossing, and their unresolved low bits."""
    digit = (key >> (32 - _TOP_BITS)) + (1 << (_TOP_BITS - 1))
    bucket, before = costs.crossing_bucket(digit, layer_ids, 1 << _TOP_BITS, before)
    keep, members, unresolved = digit < bucket, torch.nonzero(digit == bucket).squeeze(1), 32 - _TOP_BITS
    for shift, bits in _LOW_ROUNDS:
        member_keys = key.index_select(0, members)
        if members.numel() <= _SORT_BELOW or member_keys.min() == member_keys.max():
            break
        digit = (member_keys >> shift) & ((1 << bits) - 1)
        bucket, before = costs.crossing_bucket(digit, layer_ids.index_select(0, members), 1 << bits, before)
        keep.index_fill_(0, _where(members, digit < bucket), True)
        members, unresolved = _where(members, digit == bucket), shift
    return keep, members, unresolved, before


def radix_plan(scores, shapes, budget):
    """The radix-select planner: same contract and results as pruning.plan_pruning, no per-map state."""
    ranks = tuple(int(s.numel()) for s in scores)
    flat = torch.cat([s.detach().to(device="cpu", dtype=torch.float32).flatten() for s in scores])
    costs = _Costs(shapes, budget)
    layer_ids, tie_order, tie_place = _radix_tables(ranks)
    key = pruning._descending_key(flat)
    before = torch.zeros(len(ranks), dtype=torch.int64)
    if costs.budget == 0:
        keep = torch.zeros(key.numel(), dtype=torch.bool)
    else:
        keep, members, unresolved, before = _narrow(key, layer_ids, costs, before)
        if members.numel() == tie_order.numel():
            members = tie_order
        elif members.numel() > tie_order.numel() // 16:
            in_run = torch.zeros_like(keep)
            in_run[members] = True
            members = _where(tie_order, in_run.index_select(0, tie_order))
        else:
            members = members.index_select(0, torch.argsort(tie_place.index_select(0, members)))
        low_bits = key.index_select(0, members) & ((1 << unresolved) - 1)
        if unresolved and low_bits.min() != low_bits.max():
            members = members.index_select(0, torch.sort(low_bits, stable=True).indices)
        member_layers = layer_ids.index_select(0, members)
        taken = costs.crossing_item(member_layers, before)
        keep.index_fill_(0, members[:taken], True)
        before = before + torch.bincount(member_layers[:taken], minlength=len(ranks))
    keep |= (before * costs.width >= costs.dense).index_select(0, layer_ids)
    return list(keep.split(list(ranks))), int(costs.of(before))


def radix_memory_plan(scores, shapes, budget, storage):
    """The old memory-budget search: bisect the weight budget, re-planning (and re-counting bytes) at every probe."""

    def plan(weights):
        keep, _ = radix_plan(scores, shapes, weights)
        return keep, sum(layer_bytes(int(k.sum()), i, o, storage) for k, (i, o) in zip(keep, shapes))

    low, high = 0, sum(i * o for i, o in shapes)
    keep, size = plan(high)
    if size > budget:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if plan(middle)[1] <= budget else (low, middle)
        keep, size = plan(low)
    return keep, size


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def milliseconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):7.2f} [{min(times):.2f} - {max(times):.2f}]"


def time_planner(plan, scores, shapes, repeats: int, forget) -> tuple[float, list[float]]:
    """The first call on this score map (after ``forget``), then every prune after it."""
    total = sum(i * o for i, o in shapes)
    forget()
    first = milliseconds(lambda: plan(scores, shapes, int(0.5 * total)))
    times = [milliseconds(lambda: plan(scores, shapes, int(r * total))) for _ in range(repeats) for r in RATIOS]
    return first, times


def check_same_plans(scores, shapes) -> None:
    total = sum(i * o for i, o in shapes)
    for ratio in RATIOS:
        (new, new_cost), (old, old_cost) = plan_pruning(scores, shapes, int(ratio * total)), radix_plan(
            scores, shapes, int(ratio * total))  # fmt: skip
        assert new_cost == old_cost and all(torch.equal(a, b) for a, b in zip(new, old)), ratio


def planners(maps, shapes, repeats: int) -> None:
    print(f"{'map':<13} {'planner':<10} {'cold first':>10} {'first':>8}   prune ms: median [min - max]")
    for name, scores in maps.items():
        check_same_plans(scores, shapes)
        for label, plan, tables in (("sort-once", plan_pruning, pruning._shape_tables),
                                    ("radix", radix_plan, _radix_tables)):  # fmt: skip
            tables.cache_clear()
            cold, _ = time_planner(plan, scores, shapes, 0, pruning._RANKINGS.clear)
            first, times = time_planner(plan, scores, shapes, repeats, pruning._RANKINGS.clear)
            print(f"{name:<13} {label:<10} {cold:>10.1f} {first:>8.1f}   {spread(times)}", flush=True)


def memory_budgets(scores, shapes, repeats: int) -> None:
    full = sum(layer_bytes(min(i, o), i, o, torch.bfloat16) for i, o in shapes)
    budgets = [int(r * full) for r in RATIOS]
    plan_memory(scores, shapes, budgets[0], torch.bfloat16)  # the first call on this map sorts it
    new = [milliseconds(lambda: plan_memory(scores, shapes, b, torch.bfloat16)) for _ in range(repeats)
           for b in budgets]  # fmt: skip
    old = [milliseconds(lambda: radix_memory_plan(scores, shapes, b, torch.bfloat16)) for b in budgets[:2]]
    for budget in budgets[:2]:
        (a, size_a), (b, size_b) = plan_memory(scores, shapes, budget, torch.bfloat16), radix_memory_plan(
            scores, shapes, budget, torch.bfloat16)  # fmt: skip
        assert size_a == size_b and all(torch.equal(x, y) for x, y in zip(a, b))
    print(f"memory budget (bf16, random map): sort-once {spread(new)} ms; radix bisection {spread(old)} ms")


def end_to_end(repeats: int) -> None:
    with torch.device("meta"):
        base = LlamaConfig(**SMOLLM2)
        names = [f"model.layers.{i}.{p}" for i in range(30) for p in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
        model = ACIPModel(ACIPConfig(text_config=base, target_modules=names))
    model.to_empty(device="cpu")  # uninitialised (untouched) weights: planning reads scores and shapes only
    generator = torch.Generator().manual_seed(2)
    model.score_map = {n: torch.randn(s.shape, generator=generator) for n, s in model.score_map.items()}
    first = milliseconds(lambda: model.prune_model_by_score(0.5))
    times = [milliseconds(lambda: model.prune_model_by_score(r)) for _ in range(repeats) for r in RATIOS]
    scores = sum(s.numel() for s in model.score_map.values())
    print(f"model.prune_model_by_score, SmolLM2 shape ({len(names)} layers, {scores:,} scores): first "
          f"{first:.1f} ms, then {spread(times)} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = llama7b_shapes()
    random = [torch.randn(min(i, o)) for i, o in shapes]
    maps = {"random": random, "trained-like": trained_like(shapes, torch.Generator().manual_seed(1)),
            "all-equal": [torch.full((min(i, o),), 0.02) for i, o in shapes]}  # fmt: skip
    print(f"LLaMA-7B shape: {len(shapes)} layers, {sum(s.numel() for s in random):,} scores; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms")
    planners(maps, shapes, args.repeats)
    memory_budgets(random, shapes, max(1, args.repeats // 3))
    end_to_end(args.repeats)


if __name__ == "__main__":
    main()
