"""The package's build entry (acip/build.py): checks first, low-memory conversion, and no half-converted base."""

import pytest
import torch
from conftest import VOCAB, tiny_base_model, token_ids

import acip.whitening as whitening
from acip import ACIPModel
from acip.build import parametrize
from acip.hub.parametrization import SVDLinear


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, error, names",
    [
        (dict(basis="pca"), ValueError, "basis"),
        (dict(basis="whitened"), ValueError, "calibration"),
        (dict(basis="whitened", calibration=torch.zeros(5, dtype=torch.long)), ValueError, "calibration"),
        (dict(basis="whitened", calibration=torch.zeros(2, 5)), ValueError, "calibration"),
        (dict(basis="whitened", calibration=torch.full((2, 5), VOCAB)), ValueError, "calibration"),
        (dict(mask_constant=0.0), ValueError, "mask_constant"),
        (dict(target_modules="nothing"), ValueError, "target_modules"),
    ],
)
def test_bad_arguments_leave_the_base_model_alone(kwargs, error, names):
    base = tiny_base_model("llama")
    before = state(base)
    with pytest.raises(error, match=names):
        parametrize(base, **kwargs)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, SVDLinear) for m in base.modules())


def test_a_failure_midway_puts_the_dense_layers_back(monkeypatch):
    base = tiny_base_model("llama")
    ids = token_ids()
    with torch.no_grad():
        reference = base(ids).logits
    calls = {"n": 0}
    original = whitening.whitened_layer

    def fails_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise MemoryError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr("acip.build.whitened_layer", fails_on_the_fourth)
    with pytest.raises(MemoryError):
        parametrize(base, "whitened", token_ids(4, 16))
    assert not any(isinstance(m, SVDLinear) for m in base.modules())
    assert all(type(m) is torch.nn.Linear for n, m in base.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, reference, atol=1e-4, rtol=1e-4)


def test_weight_basis_reproduces_the_base_model():
    base = tiny_base_model("qwen2")
    ids = token_ids()
    with torch.no_grad():
        reference = base(ids).logits
    model = parametrize(base).eval()
    assert isinstance(model, ACIPModel) and model.config.basis == "weight"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
