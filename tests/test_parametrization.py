"""The SVD layer and the global pruning planner (parametrization.py)."""

import math

import pytest
import torch
from torch import nn

import acip.hub.parametrization as parametrization
from acip.hub.parametrization import LowRankLinear, SVDLinear, plan_pruning, rank_cost


def _dense(in_features=24, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_svd_layer_reproduces_the_dense_layer(shape, bias):
    dense = _dense(*shape, bias=bias)
    layer = SVDLinear.from_linear(dense)
    x = torch.randn(3, 5, shape[0])
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert layer.rank == min(shape)
    assert layer.mask.dtype == layer.score.dtype == torch.float32


def test_forward_never_builds_the_dense_weight(monkeypatch):
    layer = SVDLinear.from_linear(_dense())
    shapes = []
    original = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return original(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    layer(torch.randn(2, 24))
    assert shapes == [(24, 24), (40, 24)]  # (k, in) then (out, k): no (out, in) matrix


def test_straight_through_mask():
    layer = SVDLinear.from_linear(_dense())
    with torch.no_grad():
        layer.mask[:3] = torch.tensor([0.5, -0.1, 1e-6])
    value = layer.mask_value()
    assert value[0] == value[2] == layer.mask_constant and value[1] == 0
    # The gradient reaches the mask as if the forward pass had been relu(mask).
    weights = torch.randn_like(value)
    (value * weights).sum().backward()
    expected = torch.where(layer.mask.detach() > 0, weights, torch.zeros_like(weights))
    torch.testing.assert_close(layer.mask.grad, expected)


def test_set_kept_is_revertible_and_compressed_matches():
    dense = _dense()
    layer = SVDLinear.from_linear(dense)
    x = torch.randn(4, 24)
    keep = torch.zeros(24, dtype=torch.bool)
    keep[[0, 2, 5, 7]] = True
    layer.set_kept(keep)
    pruned = layer(x)
    small = layer.compressed()
    assert isinstance(small, LowRankLinear) and small.rank == 4
    torch.testing.assert_close(small(x), pruned, atol=1e-5, rtol=1e-5)
    assert small.num_params() == layer.num_params() == 4 * (24 + 40) + 40
    layer.set_kept(torch.ones(24, dtype=torch.bool))
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_no_grad_forward_computes_only_the_kept_ranks(monkeypatch):
    layer = SVDLinear.from_linear(_dense())
    x = torch.randn(2, 3, 24)
    for keep_first in (24, 10, 3, 0):
        layer.set_kept(torch.arange(24) < keep_first)
        masked = layer(x)  # with gradients: the full-rank, masked computation
        with torch.no_grad():
            sliced = layer(x)
        torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    layer.set_kept(torch.arange(24) < 7)
    shapes = []
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: shapes.append(w.shape) or original(x, w, b))
    with torch.no_grad():
        layer(x)
    assert shapes == [(7, 24), (40, 7)]


def test_compressed_goes_dense_when_factors_are_not_smaller():
    dense = _dense(24, 40)
    layer = SVDLinear.from_linear(dense)
    keep = torch.ones(24, dtype=torch.bool)
    keep[-5:] = False  # 19 * 64 >= 24 * 40: factors would not be smaller
    layer.set_kept(keep)
    small = layer.compressed()
    assert type(small) is nn.Linear
    x = torch.randn(4, 24)
    torch.testing.assert_close(small(x), layer(x), atol=1e-5, rtol=1e-5)
    assert layer.num_params() == 24 * 40 + 40


def test_low_rank_to_dense():
    layer = SVDLinear.from_linear(_dense())
    keep = torch.arange(24) < 6
    layer.set_kept(keep)
    small = layer.compressed()
    x = torch.randn(4, 24)
    torch.testing.assert_close(small.to_dense()(x), small(x), atol=1e-5, rtol=1e-5)


def test_masks_and_scores_stay_float32_when_cast():
    layer = SVDLinear.from_linear(_dense())
    layer.score.copy_(torch.linspace(-3, 0.02, 24))
    before = layer.score.clone()
    layer.to(torch.bfloat16)
    assert layer.sv.weight.dtype == torch.bfloat16
    assert layer.mask.dtype == layer.score.dtype == torch.float32
    assert isinstance(layer.mask, nn.Parameter)
    torch.testing.assert_close(layer.score, before, rtol=0, atol=0)
    layer.half()
    assert layer.mask.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# The planner, against a direct reference: sort everything, walk the prefix.
# ---------------------------------------------------------------------------------------------------------------------


def reference_plan(scores, shapes, budget):
    """Full lexicographic sort by (score desc, relative position asc, layer asc), then the first prefix at budget."""
    items = []
    for layer, s in enumerate(scores):
        k = s.numel()
        for i in range(k):
            items.append((-float(s[i]), (i << 30) // k, layer, i))
    items.sort()
    budget = min(max(budget, 0), sum(i * o for i, o in shapes))
    counts = [0] * len(scores)
    cost = lambda: sum(rank_cost(c, i, o) for c, (i, o) in zip(counts, shapes))  # noqa: E731
    chosen = []
    for item in items:
        if cost() >= budget:
            break
        counts[item[2]] += 1
        chosen.append(item)
    keep = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    for _, _, layer, i in chosen:
        keep[layer][i] = True
    for layer, (c, (i, o)) in enumerate(zip(counts, shapes)):
        if c * (i + o) >= i * o:
            keep[layer][:] = True
    return keep, cost()


SHAPES = [(12, 20), (20, 12), (16, 16), (12, 6), (30, 12)]


def _score_maps():
    g = torch.Generator().manual_seed(0)
    k = [min(s) for s in SHAPES]
    yield "random", [torch.randn(n, generator=g) for n in k]
    yield "untrained", [torch.full((n,), 0.02) for n in k]
    yield "death steps", [torch.randint(-6, 1, (n,), generator=g).float() for n in k]
    yield "signed zeros and inf", [torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -1.0] * 6)[:n] for n in k]


@pytest.mark.parametrize("sort_below", [1 << 16, 0], ids=["sort", "radix rounds"])
@pytest.mark.parametrize("name,scores", list(_score_maps()), ids=[n for n, _ in _score_maps()])
def test_plan_matches_reference(name, scores, sort_below, monkeypatch):
    monkeypatch.setattr(parametrization, "_SORT_BELOW", sort_below)
    monkeypatch.setattr(parametrization, "_BLOCK", 7)  # several blocks even on a small map
    total = sum(i * o for i, o in SHAPES)
    for budget in [0, 1, 100, total // 3, total // 2, total - 1, total, total + 5]:
        keep, cost = plan_pruning(scores, SHAPES, budget)
        expected_keep, expected_cost = reference_plan(scores, SHAPES, budget)
        assert cost == expected_cost
        for got, want in zip(keep, expected_keep):
            assert torch.equal(got, want), (name, budget)


def test_plan_is_nested_and_tight():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(min(s), generator=g) for s in SHAPES]
    total = sum(i * o for i, o in SHAPES)
    previous = None
    for budget in range(0, total + 1, 37):
        keep, cost = plan_pruning(scores, SHAPES, budget)
        assert cost >= budget
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


def test_plan_leaves_the_scores_untouched():
    scores = [torch.tensor([-0.0, 1.0, -2.0])]
    before = scores[0].clone()
    plan_pruning(scores, [(3, 3)], 4)
    assert torch.equal(scores[0], before) and torch.signbit(scores[0][0])
