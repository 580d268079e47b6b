"""The whitened singular basis (acip/whitening.py, whitened_layer): exact at full rank, equal to
the plain basis for white inputs, robust to dead input dimensions, and the same block by block as all at once."""

import pytest
import torch
from conftest import VOCAB, tiny_base_model, token_ids
from torch import nn

from acip import ACIPModel
from acip.hub.parametrization import SVDLinear
from acip.build import parametrize
from acip.whitening import GramCollector, whitened_layer, whitening_factor


def calibration(n: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


def dense_weight(layer: SVDLinear) -> torch.Tensor:
    """The (out, in) weight an unpruned SVD layer applies (at full rank compress() stores it dense)."""
    return layer.compressed().weight.detach()


def test_white_inputs_give_the_plain_factors():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    plain = SVDLinear.from_linear(linear)
    whitened = whitened_layer(linear, whitening_factor(4.0 * torch.eye(24)))  # XᵀX = 4 I
    # The same directions up to sign (singular values are distinct for a random matrix) ...
    signs = torch.sign((plain.u.weight * whitened.u.weight).sum(0))  # (k,)
    # (plain: float32 SVD; whitened: float64)
    torch.testing.assert_close(whitened.u.weight * signs, plain.u.weight, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(whitened.sv.weight * signs[:, None], plain.sv.weight, atol=1e-4, rtol=1e-3)
    # ... and scores that are the (whitened) singular values over their norm, in decreasing order.
    s = torch.linalg.svdvals(linear.weight.double())
    torch.testing.assert_close(whitened.score, (s / s.norm()).float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(plain.score, torch.full_like(plain.score, plain.mask_constant))


def test_dead_input_dimensions_fall_back_to_a_ridge_and_reproduce_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 20, bias=False)
    x = torch.randn(200, 32)
    x[:, [3, 7, 11]] = 0  # dead inputs: XᵀX is singular, plain Cholesky fails
    x[:, 20] = x[:, 21]  # and two collinear ones
    gram = x.double().T @ x.double()
    assert int(torch.linalg.cholesky_ex(gram)[1]) != 0
    layer = whitened_layer(linear, whitening_factor(gram))
    torch.testing.assert_close(dense_weight(layer), linear.weight, atol=2e-5, rtol=1e-4)
    assert bool(torch.isfinite(layer.sv.weight).all())
    # What matters on these inputs sits in the leading directions: the live input subspace has rank 28.
    assert int((layer.score > 1e-3 * layer.score[0]).sum()) == 20
    with pytest.raises(RuntimeError, match="not positive definite"):
        whitening_factor(torch.full((4, 4), float("nan")))


def test_layers_reading_one_input_share_one_gram_matrix():
    base = tiny_base_model("llama")
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "layers.0." in n]
    with torch.no_grad(), GramCollector(base, names) as grams:
        grams.new_batch()
        base(input_ids=calibration(), use_cache=False)
    leader = {n.rsplit(".", 1)[-1]: grams.leader[n].rsplit(".", 1)[-1] for n in names}
    assert leader == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                      "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}  # fmt: skip
    assert len(grams.grams) == 4 and all(g.dtype == torch.float64 for g in grams.grams.values())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_whitened_model_reproduces_the_dense_logits(kind):
    ids = token_ids(2, 16)
    with torch.no_grad():
        dense = tiny_base_model(kind)(ids).logits
    model = parametrize(tiny_base_model(kind), "whitened", calibration(), batch_size=3).eval()
    assert model.config.basis == "whitened"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-4, rtol=1e-4)
    # Scores are the whitened singular values: positive, decreasing within each layer.
    for score in model.score_map.values():
        assert bool((score > 0).all()) and bool((score[:-1] >= score[1:]).all())
    model.prune_model_by_score(0.6)
    assert 0.6 <= model.get_size_ratio() < 0.65
    reloaded_config = type(model.config).from_dict(model.config.to_dict())
    assert reloaded_config.basis == "whitened"


def test_block_by_block_calibration_equals_all_at_once():
    sequential = parametrize(tiny_base_model("llama"), "whitened", calibration(), sequential=True)
    at_once = parametrize(tiny_base_model("llama"), "whitened", calibration(), sequential=False)
    for name, layer in sequential.acip_layers().items():
        other = at_once.acip_layers()[name]
        torch.testing.assert_close(layer.score, other.score, atol=1e-4, rtol=1e-4)
        signs = torch.sign((layer.u.weight * other.u.weight).sum(0))
        torch.testing.assert_close(other.u.weight * signs, layer.u.weight, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(other.sv.weight * signs[:, None], layer.sv.weight, atol=1e-3, rtol=1e-3)


def test_acip_run_from_the_whitened_basis(tmp_path):
    from conftest import tiny_tokenizer, words_file

    from acip.training import ACIPRunConfig, run_acip

    words = words_file(tmp_path / "words.txt", 4000)
    config = ACIPRunConfig(data=words, basis="whitened", calibration_blocks=6, calibration_block_size=16,
                           block_size=32, lr=1e-3, lambda_init=1e-2, lambda_growth=1.1, lambda_every=1, stop_ratio=0.5,
                           post_tune_steps=2, checkpoint_every=0, lora_r=4, lora_alpha=8)  # fmt: skip
    model = run_acip(config, tmp_path / "run", base_model=tiny_base_model("llama"), tokenizer=tiny_tokenizer())
    assert model.config.basis == "whitened"
    reloaded = ACIPModel.from_pretrained(tmp_path / "run")
    assert reloaded.config.basis == "whitened"
    assert reloaded.prune_model_by_score(0.6).get_size_ratio() >= 0.6
    with pytest.raises(ValueError, match="basis must be one of"):
        ACIPRunConfig(basis="pca").validate()
