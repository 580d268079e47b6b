"""The cost rule, byte accounting, budgets and the global planner (pruning.py), against direct references."""

import math

import pytest
import torch

import acip.hub.pruning as pruning
from acip.hub.pruning import (
    RANK_COSTS,
    check_ratio,
    check_scores,
    first_dense_rank,
    is_dense_rank,
    layer_bytes,
    parse_bytes,
    plan_memory,
    plan_pruning,
    rank_cost,
    tensor_bytes,
)

SHAPES = [(12, 20), (20, 12), (16, 16), (12, 6), (30, 12)]


# ---------------------------------------------------------------------------------------------------------------------
# The cost rule and bytes: ints and tensors agree
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RANK_COSTS)
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, "nf4", "fp4"])
def test_costs_of_ints_and_tensors_agree(storage, rule):
    shapes = SHAPES + [(64, 176), (7, 3)]
    for in_features, out_features in shapes:
        ranks = torch.arange(min(in_features, out_features) + 1)
        costs = rank_cost(ranks, in_features, out_features, rule)
        dense = is_dense_rank(ranks, in_features, out_features, rule)
        sizes = layer_bytes(ranks, in_features, out_features, storage, rule)
        for r in range(ranks.numel()):
            assert int(costs[r]) == rank_cost(r, in_features, out_features, rule)
            assert bool(dense[r]) == is_dense_rank(r, in_features, out_features, rule)
            assert int(sizes[r]) == layer_bytes(r, in_features, out_features, storage, rule)
        full = min(in_features, out_features)
        assert rank_cost(full, in_features, out_features, rule) == in_features * out_features  # full rank is dense
        assert layer_bytes(0, in_features, out_features, storage, rule) == 0
        assert (costs[1:] >= costs[:-1]).all()  # a rank more never costs fewer weights
        first = int(dense.int().argmax())
        assert dense[first:].all() and not dense[:first].any()  # dense from one rank on
    ins, outs = torch.tensor([i for i, _ in shapes]), torch.tensor([o for _, o in shapes])
    expected = [int(is_dense_rank(torch.arange(min(i, o) + 1), i, o, rule).int().argmax()) for i, o in shapes]
    assert first_dense_rank(ins, outs, rule).tolist() == expected


def test_rank_cost_aligned_saves_at_every_rank_below_full():
    # r·(in + out − r): the aligned pair holds the identity on r output rows
    assert rank_cost(3, 12, 20) == 3 * 29 and not is_dense_rank(3, 12, 20)
    assert rank_cost(10, 12, 20) == 10 * 22 and not is_dense_rank(10, 12, 20)  # saves (12-10)·(20-10) = 20 = out
    assert rank_cost(11, 12, 20) == 240 and is_dense_rank(11, 12, 20)  # would save 9 < 20, the row order's size
    bytes_at_3 = layer_bytes(3, 12, 20, torch.float32)
    assert bytes_at_3 == 4 * (3 * 12 + 17 * 3) + 8 * 20  # V' (3, 12), U'' (17, 3), the int64 row order


def test_rank_cost_factors_is_factors_or_dense_when_not_larger():
    assert rank_cost(3, 12, 20, "factors") == 3 * 32 and not is_dense_rank(3, 12, 20, "factors")
    assert rank_cost(8, 12, 20, "factors") == 12 * 20 and is_dense_rank(8, 12, 20, "factors")  # 8 * 32 >= 240
    assert is_dense_rank(5, 10, 10, "factors")  # 5 * 20 = 100: equal cost, stored dense
    assert layer_bytes(3, 12, 20, torch.float32, "factors") == 4 * 3 * 32


def test_tensor_bytes():
    assert tensor_bytes(100, torch.float32) == 400 and tensor_bytes(100, torch.bfloat16) == 200
    assert tensor_bytes(128, "nf4") == 64 + 2 * 4  # two values per byte, one float32 absmax per 64 weights
    assert tensor_bytes(129, "fp4") == 65 + 3 * 4
    assert tensor_bytes(torch.tensor([128, 129]), "nf4").tolist() == [72, 77]


# ---------------------------------------------------------------------------------------------------------------------
# User input
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_bytes():
    assert parse_bytes(1234) == 1234
    assert parse_bytes("300MB") == 300 * 10**6 and parse_bytes(" 1.5 GiB ") == int(1.5 * 2**30)
    assert parse_bytes("2e3") == 2000 and parse_bytes("4kib") == 4096
    for bad in ("300 parsecs", "-5MB", 0, -1, True, "MB", None, "0.1"):
        with pytest.raises(ValueError, match="memory_budget must be"):
            parse_bytes(bad)


def test_check_ratio():
    assert check_ratio(0.5, None) == check_ratio(None, 0.5) == check_ratio(0.5, 0.5) == 0.5
    with pytest.raises(ValueError, match="disagree"):
        check_ratio(0.5, 0.4)
    with pytest.raises(TypeError, match="compression_ratio"):
        check_ratio(None, None)
    with pytest.raises(TypeError, match="size_ratio must be a number"):
        check_ratio(None, "0.5")
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\]"):
        check_ratio(math.nan, None)


def test_check_scores():
    shape = torch.Size([3])
    assert check_scores("a", [1, 2, 3], shape).dtype == torch.float32
    assert check_scores("a", torch.tensor([math.inf, -math.inf, -0.0]), shape).isinf().sum() == 2
    with pytest.raises(TypeError, match=r"score_map\['a'\] must hold real numbers"):
        check_scores("a", torch.ones(3, dtype=torch.complex64), shape)
    with pytest.raises(ValueError, match=r"score_map\['a'\] must have shape \(3,\)"):
        check_scores("a", torch.ones(4), shape)
    with pytest.raises(ValueError, match=r"score_map\['a'\] contains NaN"):
        check_scores("a", torch.tensor([1.0, math.nan, 0.0]), shape)


# ---------------------------------------------------------------------------------------------------------------------
# The planner, against a direct reference: sort everything, walk the prefix.
# ---------------------------------------------------------------------------------------------------------------------


def reference_order(scores):
    """Every item as (layer, i), sorted by (score desc, relative position asc, layer asc)."""
    items = []
    for layer, s in enumerate(scores):
        k = s.numel()
        items += [(-float(s[i]) + 0.0, (i << 30) // k, layer, i) for i in range(k)]  # + 0.0: -0.0 ties +0.0
    return [(layer, i) for _, _, layer, i in sorted(items)]


def reference_keep(scores, shapes, prefix, rule):
    """Keep masks of the first ``prefix`` items, every layer that reached its dense cost kept whole."""
    keep = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    for layer, i in prefix:
        keep[layer][i] = True
    for k, (i, o) in zip(keep, shapes):
        if is_dense_rank(int(k.sum()), i, o, rule):
            k[:] = True
    return keep


def reference_plan(scores, shapes, budget, rule):
    """The shortest prefix of the global order whose cost reaches the budget."""
    order = reference_order(scores)
    budget = min(max(budget, 0), sum(i * o for i, o in shapes))
    counts = [0] * len(scores)
    cost = lambda: sum(rank_cost(c, i, o, rule) for c, (i, o) in zip(counts, shapes))  # noqa: E731
    taken = 0
    while cost() < budget:
        counts[order[taken][0]] += 1
        taken += 1
    return reference_keep(scores, shapes, order[:taken], rule), cost()


def reference_memory_plan(scores, shapes, budget, storage, rule):
    """The longest prefix of the global order whose layers' bytes fit the budget (shorter ones need not)."""
    order = reference_order(scores)
    counts, longest = [0] * len(scores), 0
    for taken in range(1, len(order) + 1):
        counts[order[taken - 1][0]] += 1
        if sum(layer_bytes(c, i, o, storage, rule) for c, (i, o) in zip(counts, shapes)) <= budget:
            longest = taken
    return reference_keep(scores, shapes, order[:longest], rule)


def _score_maps():
    g = torch.Generator().manual_seed(0)
    k = [min(s) for s in SHAPES]
    yield "random", [torch.randn(n, generator=g) for n in k]
    yield "untrained", [torch.full((n,), 0.02) for n in k]
    yield "death steps", [torch.randint(-6, 1, (n,), generator=g).float() for n in k]
    yield "signed zeros and inf", [torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -1.0] * 6)[:n] for n in k]


@pytest.mark.parametrize("rule", RANK_COSTS)
@pytest.mark.parametrize("name,scores", list(_score_maps()), ids=[n for n, _ in _score_maps()])
def test_plan_matches_reference(name, scores, rule):
    total = sum(i * o for i, o in SHAPES)
    for budget in [0, 1, 100, total // 3, total // 2, total - 1, total, total + 5]:
        keep, cost = plan_pruning(scores, SHAPES, budget, rule=rule)
        expected_keep, expected_cost = reference_plan(scores, SHAPES, budget, rule)
        assert cost == expected_cost
        for got, want in zip(keep, expected_keep):
            assert torch.equal(got, want), (name, budget)


@pytest.mark.parametrize("rule", RANK_COSTS)
@pytest.mark.parametrize("storage", [torch.float32, "nf4"])
@pytest.mark.parametrize("name,scores", list(_score_maps()), ids=[n for n, _ in _score_maps()])
def test_memory_plan_matches_reference(name, scores, storage, rule):
    full = sum(layer_bytes(min(i, o), i, o, storage, rule) for i, o in SHAPES)
    previous = None
    for budget in sorted([0, 1, 333, full // 3, full // 2, full - 1, full, full + 5]):
        keep, size = plan_memory(scores, SHAPES, budget, storage, rule=rule)
        assert size <= budget
        for got, want in zip(keep, reference_memory_plan(scores, SHAPES, budget, storage, rule)):
            assert torch.equal(got, want), (name, budget)
        if previous is not None:  # a larger budget keeps a superset
            assert all(not bool((p & ~k).any()) for p, k in zip(previous, keep))
        previous = keep
    assert all(k.all() for k in plan_memory(scores, SHAPES, full, storage, rule=rule)[0])  # the full model fits


def test_plan_is_nested_and_tight():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    total = sum(i * o for i, o in SHAPES)
    widest = max(i + o for i, o in SHAPES)
    previous = None
    for budget in range(0, total + 1, 37):
        keep, cost = plan_pruning(scores, SHAPES, budget)
        assert budget <= cost < budget + widest  # exact from above, within one rank
        if previous is not None:
            assert all(bool((p & ~k).any()) is False for p, k in zip(previous, keep))
        previous = keep


def test_plan_on_untrained_scores_cuts_every_layer_evenly():
    shapes = [(64, 64), (64, 16), (64, 176)]
    scores = [torch.full((min(s),), 0.02) for s in shapes]
    keep, _ = plan_pruning(scores, shapes, sum(i * o for i, o in shapes) // 4)
    fractions = [float(k.float().mean()) for k in keep]
    assert max(fractions) - min(fractions) < 0.1
    for k in keep:  # the largest singular values (lowest indices) are the ones kept
        assert torch.equal(k, torch.arange(k.numel()) < int(k.sum()))


def test_plan_rejects_bad_maps():
    with pytest.raises(ValueError, match="NaN"):
        plan_pruning([torch.tensor([1.0, math.nan])], [(2, 3)], 3)
    with pytest.raises(ValueError, match="does not fit"):
        plan_pruning([torch.ones(3)], [(2, 3)], 3)
    with pytest.raises(ValueError, match="2 score vectors for 1 layer shapes"):
        plan_pruning([torch.ones(2), torch.ones(2)], [(2, 3)], 3)


def test_plan_leaves_the_scores_untouched():
    scores = [torch.tensor([-0.0, 1.0, -2.0])]
    before = scores[0].clone()
    plan_pruning(scores, [(3, 3)], 4)
    assert torch.equal(scores[0], before) and torch.signbit(scores[0][0])


# ---------------------------------------------------------------------------------------------------------------------
# Sort once: the ranking is cached per score map and rebuilt whenever the scores change
# ---------------------------------------------------------------------------------------------------------------------


def test_the_ranking_is_sorted_once_per_score_map():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    first = pruning.ranking(scores, SHAPES)
    assert pruning.ranking(scores, SHAPES) is first
    assert pruning.ranking(list(scores), SHAPES) is first  # the same tensors in another list
    assert pruning.ranking([s.clone() for s in scores], SHAPES) is not first  # other tensors: sorted anew


@pytest.mark.parametrize(
    "change",
    [
        lambda scores: scores[2].copy_(-scores[2]),  # in place
        lambda scores: scores[0].__setitem__(slice(None), torch.arange(12.0)),  # indexed assignment
        lambda scores: scores.__setitem__(1, torch.randn(12)),  # a new tensor
        lambda scores: scores[3].set_(torch.randn(6)),  # new storage behind the same tensor
    ],
)
def test_a_changed_score_map_is_ranked_again(change):
    g = torch.Generator().manual_seed(6)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    budget = sum(i * o for i, o in SHAPES) // 2
    plan_pruning(scores, SHAPES, budget)
    with torch.no_grad():
        change(scores)
    keep, cost = plan_pruning(scores, SHAPES, budget)
    expected_keep, expected_cost = reference_plan(scores, SHAPES, budget, "aligned")
    assert cost == expected_cost and all(torch.equal(a, b) for a, b in zip(keep, expected_keep))


def test_the_cache_drops_rankings_of_deleted_score_maps():
    for seed in range(6):
        plan_pruning([torch.randn(min(s)) for s in SHAPES], SHAPES, 100)  # each map is garbage right after
    assert len(pruning._RANKINGS) <= pruning._KEPT_RANKINGS
    assert all(ranking.alive() for ranking in pruning._RANKINGS[:-1])  # the newest goes at the next insert


# ---------------------------------------------------------------------------------------------------------------------
# Rank rounding: every kept rank a multiple of m (or full), still the smallest plan >= the budget, still nested
# ---------------------------------------------------------------------------------------------------------------------


def rounded_reference(scores, shapes, multiple, prefix_items):
    """Per-layer ranks of a prefix rounded up to a multiple (capped at full rank; dense layers keep everything)."""
    counts = [0] * len(scores)
    for layer, _ in prefix_items:
        counts[layer] += 1
    ranks = []
    for c, s, (i, o) in zip(counts, scores, shapes):
        r = min(-(-c // multiple) * multiple, s.numel())
        ranks.append(s.numel() if is_dense_rank(r, i, o) else r)
    return ranks


@pytest.mark.parametrize("multiple", [2, 4, 8])
def test_rounded_plan_is_the_smallest_rounded_plan_reaching_the_budget(multiple):
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    order = reference_order(scores)
    total = sum(i * o for i, o in SHAPES)
    costs = [sum(rank_cost(r, i, o) for r, (i, o) in zip(rounded_reference(scores, SHAPES, multiple, order[:p]),
                                                          SHAPES)) for p in range(len(order) + 1)]  # fmt: skip
    for budget in [0, 1, 100, total // 3, total // 2, total - 1, total]:
        keep, cost = plan_pruning(scores, SHAPES, budget, rank_multiple=multiple)
        prefix = next(p for p, c in enumerate(costs) if c >= budget)
        ranks = rounded_reference(scores, SHAPES, multiple, order[:prefix])
        assert cost == costs[prefix] >= budget
        assert [int(k.sum()) for k in keep] == ranks
        for k, s, r in zip(keep, scores, ranks):  # each layer keeps its best values by the global order
            ranked = [i for layer, i in order if s is scores[layer]]
            assert set(torch.nonzero(k).flatten().tolist()) == set(ranked[:r])


def test_rounded_plans_are_nested_and_fit_a_memory_budget():
    g = torch.Generator().manual_seed(6)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    total = sum(i * o for i, o in SHAPES)
    previous = None
    for budget in range(0, total + 1, 41):
        keep, cost = plan_pruning(scores, SHAPES, budget, rank_multiple=4)
        assert all(int(k.sum()) % 4 == 0 or bool(k.all()) for k in keep)
        if previous is not None:
            assert all(not bool((p & ~k).any()) for p, k in zip(previous, keep))
        previous = keep
    for storage in (torch.float32, "nf4"):
        full = sum(layer_bytes(min(i, o), i, o, storage) for i, o in SHAPES)
        for budget in [0, 333, full // 3, full // 2, full]:
            keep, size = plan_memory(scores, SHAPES, budget, storage, rank_multiple=4)
            ranks = [int(k.sum()) for k in keep]
            assert size == sum(layer_bytes(r, i, o, storage) for r, (i, o) in zip(ranks, SHAPES)) <= budget
            assert all(r % 4 == 0 or bool(k.all()) for r, k in zip(ranks, keep))


def test_rank_multiple_one_is_the_plain_plan_and_bad_values_are_rejected():
    scores = [torch.randn(min(s), generator=torch.Generator().manual_seed(7)) for s in SHAPES]
    for budget in (0, 500, 1000):
        plain, rounded = plan_pruning(scores, SHAPES, budget), plan_pruning(scores, SHAPES, budget, rank_multiple=1)
        assert plain[1] == rounded[1] and all(torch.equal(a, b) for a, b in zip(plain[0], rounded[0]))
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="rank_multiple"):
            plan_pruning(scores, SHAPES, 500, rank_multiple=bad)


# ---------------------------------------------------------------------------------------------------------------------
# The threshold selection (the original implementation's): score > t for a threshold t, ties kept or pruned together
# ---------------------------------------------------------------------------------------------------------------------


def threshold_reference(scores, shapes, budget, rule):
    """Keep masks of the sets ``score > t`` (t: every score value, the lowest block always pruned), as the original
    chooses them: the one of fewest parameters costing at least ``budget`` (of those, the highest threshold: the
    original prunes as many as it can), else the largest such set."""
    flat = torch.cat(scores)
    values = sorted(set(flat.tolist()))
    plans = []
    for t in values:  # ascending thresholds: descending sizes
        keep = [s > t for s in scores]
        cost = sum(rank_cost(int(k.sum()), i, o, rule) for k, (i, o) in zip(keep, shapes))
        plans.append((cost, keep))
    reaching = [plan for plan in plans if plan[0] >= budget]
    return min(reversed(reaching), key=lambda p: p[0]) if reaching else plans[0]


@pytest.mark.parametrize("rule", RANK_COSTS)
def test_the_threshold_selection_keeps_whole_tie_blocks(rule):
    g = torch.Generator().manual_seed(3)
    k = [min(s) for s in SHAPES]
    tied = [torch.randint(-6, 3, (n,), generator=g).float() for n in k]  # scores of masks dead at the same step
    distinct = [torch.randn(n, generator=g) for n in k]
    total = sum(i * o for i, o in SHAPES)
    for scores in (tied, distinct):
        for budget in [0, 1, 100, total // 3, total // 2, total - 1, total]:
            keep, cost = plan_pruning(scores, SHAPES, budget, rule=rule, selection="threshold")
            expected_cost, expected = threshold_reference(scores, SHAPES, budget, rule)
            assert cost == expected_cost, budget
            assert all(torch.equal(a, b) for a, b in zip(keep, expected)), budget
            kept = torch.cat([s[m] for s, m in zip(scores, keep)])
            pruned = torch.cat([s[~m] for s, m in zip(scores, keep)])
            assert pruned.numel() and (not kept.numel() or kept.min() > pruned.max())  # a threshold set
    with pytest.raises(ValueError, match="selection must be one of"):
        plan_pruning(distinct, SHAPES, 10, selection="nearest")


def test_threshold_memory_plans_fit_and_are_nested():
    g = torch.Generator().manual_seed(4)
    scores = [torch.randint(-4, 2, (min(s),), generator=g).float() for s in SHAPES]
    full = sum(layer_bytes(min(i, o), i, o, torch.float32, "factors") for i, o in SHAPES)
    previous = None
    for budget in sorted([0, 333, full // 3, full // 2, full - 1, full]):
        keep, size = plan_memory(scores, SHAPES, budget, torch.float32, rule="factors", selection="threshold")
        ranks = [int(k.sum()) for k in keep]
        assert size == sum(layer_bytes(r, i, o, torch.float32, "factors") for r, (i, o) in zip(ranks, SHAPES))
        assert size <= budget
        kept = torch.cat([s[m] for s, m in zip(scores, keep)])
        pruned = torch.cat([s[~m] for s, m in zip(scores, keep)])
        assert not kept.numel() or not pruned.numel() or kept.min() > pruned.max()
        if previous is not None:
            assert all(not bool((p & ~k).any()) for p, k in zip(previous, keep))
        previous = keep
    assert all(k.all() for k in previous)  # the full model fits the full budget


def test_a_strict_budget_exceeds_the_ratio():
    assert pruning.ratio_budget(0.5, 100, 0, False) == 50
    assert pruning.ratio_budget(0.5, 100, 0, False, strict=True) == 51  # the original wants a size above the target
    assert pruning.ratio_budget(0.7, 86016, 0, False, strict=True) == 60212  # 60211/86016 = 0.69999... fails
    assert pruning.ratio_budget(0.3, 10, 1, False, strict=True) == 3  # (3 + 1) / 10 > 0.3, (2 + 1) / 10 is not


def test_stored_rank_adds_the_extra_ranks_up_to_full():
    assert pruning.stored_rank(5, 12, 20) == 5 and pruning.stored_rank(5, 12, 20, 4) == 9
    assert pruning.stored_rank(10, 12, 20, 4) == 12
    ranks = torch.tensor([0, 5, 10])
    assert pruning.stored_rank(ranks, torch.tensor(12), torch.tensor(20), 4).tolist() == [4, 9, 12]
