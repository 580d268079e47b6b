"""The SVD layer: built from a dense layer or from SVD outputs, its mask, pruning, compression (parametrization.py)."""

import pytest
import torch
from torch import nn

from acip.hub.parametrization import (
    AlignedLowRankLinear,
    FactorCorrection,
    LayerLoRA,
    LowRankLinear,
    SVDLinear,
    dominant_rows,
)


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


def test_from_svd_builds_the_factors_in_place_from_the_given_tensors():
    dense = _dense(24, 40)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)  # float32, as the layer
    pointers = (u.data_ptr(), vh.data_ptr())
    layer = SVDLinear.from_svd(u, s, vh, dense.bias, mask_constant=0.1)
    assert (layer.u.weight.data_ptr(), layer.sv.weight.data_ptr()) == pointers  # no copies
    assert layer.bias.data_ptr() == dense.bias.data_ptr()  # the bias is shared
    assert torch.equal(layer.score, torch.full((24,), 0.1)) and layer.mask_constant == 0.1
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_from_svd_casts_and_takes_scores():
    dense = _dense(24, 40)
    u, s, vh = torch.linalg.svd(dense.weight.double(), full_matrices=False)
    layer = SVDLinear.from_svd(u, s, vh, None, score=s, dtype=torch.bfloat16)
    assert layer.sv.weight.dtype == layer.u.weight.dtype == torch.bfloat16 and layer.bias is None
    assert layer.score.dtype == layer.mask.dtype == torch.float32
    torch.testing.assert_close(layer.score, s.float())


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda u, s, vh: (u, s[:-1], vh), "not a thin SVD"),
        (lambda u, s, vh: (u, s, vh[:, :-1]), "not a thin SVD"),
        (lambda u, s, vh: (u[:, :-2], s[:-2], vh[:-2]), "not a thin SVD"),
    ],
)
def test_from_svd_rejects_shapes_that_are_not_a_thin_svd(change, match):
    u, s, vh = torch.linalg.svd(_dense().weight.detach(), full_matrices=False)
    with pytest.raises(ValueError, match=match):
        SVDLinear.from_svd(*change(u, s, vh))
    with pytest.raises(ValueError, match="mask_constant must be > 0"):
        SVDLinear.from_svd(u, s, vh, mask_constant=0.0)


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
    small = layer.compressed("factors")
    assert type(small) is LowRankLinear and small.rank == 4
    torch.testing.assert_close(small(x), pruned, atol=1e-5, rtol=1e-5)
    assert small.num_params() == layer.num_params("factors") == 4 * (24 + 40) + 40
    aligned = layer.compressed()
    assert type(aligned) is AlignedLowRankLinear and aligned.rank == 4
    torch.testing.assert_close(aligned(x), pruned, atol=1e-5, rtol=1e-5)
    assert aligned.num_params() == layer.num_params() == 4 * (24 + 40 - 4) + 40
    assert sum(p.numel() for p in aligned.parameters()) == aligned.num_params()
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


@pytest.mark.parametrize("rule, dropped", [("factors", 5), ("aligned", 1)])
def test_compressed_goes_dense_when_factors_are_not_smaller(rule, dropped):
    # factors: 19 * 64 >= 24 * 40; aligned: a rank-23 pair would save (24-23)·(40-23) = 17 < 40 weights, less than
    # its row order holds
    dense = _dense(24, 40)
    layer = SVDLinear.from_linear(dense)
    keep = torch.ones(24, dtype=torch.bool)
    keep[-dropped:] = False
    layer.set_kept(keep)
    small = layer.compressed(rule)
    assert type(small) is nn.Linear
    x = torch.randn(4, 24)
    torch.testing.assert_close(small(x), layer(x), atol=1e-5, rtol=1e-5)
    assert layer.num_params(rule) == 24 * 40 + 40
    keep[-2:] = False  # aligned at rank 22: saves 2·18 = 36 < 40, still dense; factors still dense
    layer.set_kept(keep)
    assert type(layer.compressed(rule)) is nn.Linear
    keep[-3:] = False  # aligned at rank 21: saves 3·19 = 57 weights
    layer.set_kept(keep)
    assert type(layer.compressed(rule)) is (nn.Linear if rule == "factors" else AlignedLowRankLinear)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_aligned_layer_equals_the_plain_factors(shape, bias):
    dense = _dense(*shape, bias=bias)
    layer = SVDLinear.from_linear(dense)
    x = torch.randn(3, 5, shape[0])
    k = min(shape)
    for rank in (0, 1, k // 3, k // 2, k - 6):  # all stored aligned: (in - r)·(out - r) >= out
        layer.set_kept(torch.randperm(k, generator=torch.Generator().manual_seed(rank)) < rank)
        plain, aligned = layer.compressed("factors"), layer.compressed("aligned")
        assert type(aligned) is AlignedLowRankLinear and aligned.rank == rank
        torch.testing.assert_close(aligned(x), plain(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(aligned.to_dense()(x), plain(x), atol=1e-4, rtol=0)
        assert aligned.num_params() == rank * (sum(shape) - rank) + (shape[1] if bias else 0)


def test_dominant_rows_bound_the_coefficients():
    torch.manual_seed(0)
    u = torch.randn(60, 12) * torch.logspace(0, -3, 12)  # columns of very different scale, as U·diag(s) has
    rows = dominant_rows(u)
    assert sorted(rows.tolist()) == list(range(60))
    top = u[rows[:12]].double()
    coef = torch.linalg.solve(top, u.double(), left=False)  # u = coef @ u[Q]
    assert float(coef.abs().max()) <= 1.05 + 1e-9  # every row a combination of the chosen ones, |coefficients| <= 1.05
    torch.testing.assert_close(coef[rows[:12]], torch.eye(12, dtype=torch.float64))


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


def _corrected(shape=(24, 40), ramp=0.25, seed=0):
    """An SVD layer with a random factor correction of rank 3."""
    layer = SVDLinear.from_linear(_dense(*shape, seed=seed))
    k = layer.rank
    correction = FactorCorrection(shape[0], shape[1], k, 3, ramp)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in correction.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    layer.correction = correction
    return layer


def test_a_correction_applies_only_to_a_pruned_layer_by_its_pruned_share():
    layer, dense = _corrected(), _dense()
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)  # kept whole: the dense layer exactly
    assert layer.correction_strength() == 0.0
    for pruned, strength in ((3, 0.5), (6, 1.0), (12, 1.0)):  # share 1/8, 1/4, 1/2 of 24 ranks; ramp 0.25
        keep = torch.ones(24, dtype=torch.bool)
        keep[-pruned:] = False
        layer.set_kept(keep)
        assert layer.correction_strength() == pytest.approx(strength)
        c = layer.correction
        u = (layer.u.weight + strength * c.u_b @ c.u_a)[:, keep] * layer.mask_constant
        sv = (layer.sv.weight + strength * c.sv_b @ c.sv_a)[keep]
        expected = x @ (u @ sv).T + layer.bias
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # kept ranks only
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # the training path, all ranks
        for rule in ("aligned", "factors"):
            torch.testing.assert_close(layer.compressed(rule)(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="correction_ramp must be > 0"):
        FactorCorrection(24, 40, 24, 3, 0.0)


def _with_lora(in_features=24, out_features=40, rank=3, seed=0):
    """An SVD layer with a whole-layer LoRA term of non-zero weights."""
    layer = SVDLinear.from_linear(_dense(in_features, out_features, seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lora = LayerLoRA(in_features, out_features, rank)
        lora.a.copy_(0.3 * torch.randn(lora.a.shape, generator=generator))
        lora.b.copy_(0.3 * torch.randn(lora.b.shape, generator=generator))
    layer.layer_lora = lora
    return layer


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("rule", ["aligned", "factors"])
def test_a_layer_lora_is_added_at_every_size_and_compressed_as_extra_ranks(shape, rule):
    layer, dense = _with_lora(*shape), _dense(*shape)
    x = torch.randn(3, shape[0])
    lora = layer.layer_lora
    assert layer.lora_rank == 3 and not isinstance(lora, nn.Linear) and not any(
        isinstance(m, nn.Linear) for m in lora.modules())  # peft "all-linear" and quantize() leave it alone
    for pruned in (0, 5, 12, 20, 24):
        keep = torch.ones(min(shape), dtype=torch.bool)
        keep[min(shape) - pruned:] = False
        layer.set_kept(keep)
        u, sv = layer.effective_factors(keep)
        expected = x @ (u @ sv + lora.b @ lora.a).T + layer.bias
        if not pruned:
            torch.testing.assert_close(expected, dense(x) + x @ (lora.b @ lora.a).T, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # kept ranks only
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # the training path
        small = layer.compressed(rule)
        torch.testing.assert_close(small(x), expected, atol=1e-4, rtol=1e-4)
        stored = min(shape) - pruned + 3
        if isinstance(small, nn.Linear):  # merged: a layer whose stored rank is not smaller dense
            assert stored >= min(shape) or small.weight.numel() <= stored * sum(shape)
        else:
            assert small.rank == stored
        counted = layer.num_params(rule)
        layer.layer_lora = None
        assert layer.num_params(rule) == counted  # the term is not counted by the size ratio, as in the original
        layer.layer_lora = lora
