"""Perplexity, ratio sweeps and the SVD-truncation baselines (acip/evaluation.py)."""

import math

import torch
import torch.nn.functional as F
from conftest import tiny_acip_model, token_ids

from acip.evaluation import perplexity, ratio_sweep, singular_value_scores, uniform_scores


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    model = tiny_acip_model("llama").eval()
    blocks = token_ids(batch=5, length=16)
    with torch.no_grad():
        logits = model(blocks).logits
    nll = [F.cross_entropy(logits[b, t], blocks[b, t + 1]) for b in range(5) for t in range(15)]
    expected = math.exp(sum(float(x) for x in nll) / len(nll))
    assert math.isclose(perplexity(model, blocks, batch_size=2), expected, rel_tol=1e-5)


def test_sweep_restores_the_pruning_state():
    model = tiny_acip_model("qwen2").eval()
    model.prune_model_by_score(0.7)
    before = {name: layer.mask.clone() for name, layer in model.acip_layers().items()}
    result = ratio_sweep(model, token_ids(batch=3, length=16), [1.0, 0.5], batch_size=2)
    assert set(result) == {1.0, 0.5} and result[0.5] != result[1.0]
    for name, layer in model.acip_layers().items():
        assert torch.equal(layer.mask, before[name])


def test_baseline_scores():
    model = tiny_acip_model("llama", random_scores=False)
    model.score_map = singular_value_scores(model)
    for layer in model.acip_layers().values():
        s = torch.linalg.svdvals(layer.u.weight.double() @ layer.sv.weight.double() * layer.mask_constant)
        torch.testing.assert_close(layer.score.double(), s, rtol=1e-4, atol=1e-5)
    model.score_map = uniform_scores(model)
    model.prune_model_by_score(0.5)
    fractions = [layer.num_params() / (layer.in_features * layer.out_features + (layer.bias is not None) *
                 layer.out_features) for layer in model.acip_layers().values()]
    # every layer at the same share of its parameters, within one rank's cost
    assert max(fractions) - min(fractions) < 0.2
