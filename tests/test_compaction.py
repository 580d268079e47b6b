"""Slicing dead ranks out of SVD layers during training, and putting them back exactly (acip/compaction.py)."""

import copy

import pytest
import torch
from conftest import tiny_acip_model, token_ids
from peft import LoraConfig, get_peft_model

from acip.compaction import PrefixSlicer, RankCompactor, best_first, rank_slots, rounded_rank


def _lora_model(fused=False):
    model = tiny_acip_model("qwen2")
    model.requires_grad_(False)
    layers = model.acip_layers()
    factors = [f"model.{name}.{part}" for name in layers for part in ("sv", "u")]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=factors, init_lora_weights=False))
    peft_model.eval()
    for layer in layers.values():
        layer.mask.requires_grad_(True)
    params = [layer.mask for layer in layers.values()] + [p for n, p in peft_model.named_parameters() if "lora_" in n]
    return model, peft_model, layers, torch.optim.AdamW(params, lr=1e-3, fused=fused)


def _logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


@pytest.mark.parametrize("multiple", [1, 4])
def test_compacted_model_computes_the_same_and_restores_exactly(multiple):
    model, peft_model, layers, optimizer = _lora_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():  # kill about half of every layer's masks
            layer.mask.copy_(torch.where(torch.rand(layer.rank, generator=generator) < 0.5, -0.01, 0.02))
    # One step so that the optimizer holds state to be sliced along.
    peft_model(input_ids=token_ids(), labels=token_ids()).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = {name: {k: t.detach().clone() for k, t, _ in rank_slots(layer)} for name, layer in layers.items()}
    reference = _logits(peft_model)

    alive = {name: int(layer.kept.sum()) for name, layer in layers.items()}
    compactor = RankCompactor(layers, optimizer, multiple=multiple)
    assert compactor.compact_dead() == len(layers)
    assert 0.3 < compactor.computed_fraction() < 0.7
    for name, layer in layers.items():
        assert layer.rank == layer.mask.numel() == layer.sv.out_features == layer.u.in_features
        assert layer.rank == rounded_rank(alive[name], compactor.full_rank[name], multiple)
        assert int(layer.kept.sum()) == alive[name]  # the extra computed ranks are dead ones
        for value in optimizer.state[layer.mask].values():
            assert value.dim() == 0 or value.shape == layer.mask.shape
    torch.testing.assert_close(_logits(peft_model), reference, atol=1e-5, rtol=0)

    # A further step runs on the small shapes.
    peft_model(input_ids=token_ids(), labels=token_ids()).loss.backward()
    optimizer.zero_grad(set_to_none=True)

    compactor.restore()
    for name, layer in layers.items():
        for key, tensor, _ in rank_slots(layer):
            assert torch.equal(tensor, before[name][key]), (name, key)
    torch.testing.assert_close(_logits(peft_model), reference, atol=0, rtol=0)
    merged = peft_model.merge_and_unload()
    assert merged.acip_layers()["model.layers.0.self_attn.q_proj"].rank == 48


def test_full_view_matches_restore():
    model, peft_model, layers, optimizer = _lora_model()
    compactor = RankCompactor(layers, optimizer)
    name, layer = next(iter(layers.items()))
    keep = torch.ones(layer.rank, dtype=torch.bool)
    keep[[1, 4, 9]] = False
    compactor.compact(name, keep)
    keep = torch.ones(layer.rank, dtype=torch.bool)
    keep[[0, 2]] = False  # positions among the remaining ranks: full positions 0 and 3
    compactor.compact(name, keep)
    assert compactor.alive[name][:4].tolist() == [2, 5, 6, 7]
    full = compactor.full(name)
    compactor.restore()
    for key, tensor, _ in rank_slots(layer):
        assert torch.equal(full[key], tensor)


def test_restore_can_keep_the_optimizer_state_of_the_computed_ranks():
    model, peft_model, layers, optimizer = _lora_model()
    peft_model(input_ids=token_ids(), labels=token_ids()).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    name, layer = next(iter(layers.items()))
    moments = optimizer.state[layer.mask]["exp_avg"].clone()
    compactor = RankCompactor(layers, optimizer)
    keep = torch.ones(layer.rank, dtype=torch.bool)
    keep[[1, 4]] = False
    compactor.compact(name, keep)
    compactor.restore(keep_optimizer_state=True)
    restored = optimizer.state[layer.mask]["exp_avg"]
    assert restored.shape == moments.shape
    assert torch.equal(restored[keep], moments[keep]) and not restored[~keep].any()
    optimizer.step()  # the widened state fits the full-rank tensors again


def _slot(layer, key):
    return next(tensor for name, tensor, _ in rank_slots(layer) if name == key)


def _step(peft_model, optimizer):
    loss = peft_model(input_ids=token_ids(), labels=token_ids()).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.mark.parametrize("multiple", [1, 16])
def test_a_step_on_a_prefix_of_best_first_ranks_trains_only_that_prefix(multiple):
    # As in any-size post-tuning: masks frozen at c, ranks ordered by score, a step computes the first k of each layer
    # (with a multiple: k rounded up, the extra ranks masked).
    model, peft_model, layers, optimizer = _lora_model(fused=True)  # the loop's fused AdamW (see PrefixSlicer)
    generator = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.mask.requires_grad_(False)
        layer.score.copy_(torch.randn(layer.rank, generator=generator))
    _step(peft_model, optimizer)  # LoRA has optimizer state to narrow along
    compactor = RankCompactor(layers, optimizer)
    for name, layer in layers.items():
        compactor.reorder(name, best_first(layer.score))
        assert torch.equal(compactor.alive[name], best_first(layer.score))
    ranks = {name: int(torch.randint(1, layer.rank, (1,), generator=generator)) for name, layer in layers.items()}
    computed = {name: rounded_rank(k, layers[name].rank, multiple) for name, k in ranks.items()}

    masked, masked_optimizer = copy.deepcopy((peft_model, optimizer))  # the reference: full rank, masked
    masked_layers = masked.base_model.model.acip_layers()
    for name, layer in masked_layers.items():
        layer.mask.data[ranks[name]:] = 0.0
    before = {name: {k: t.detach().clone() for k, t, _ in rank_slots(layer)} for name, layer in layers.items()}
    moments = {name: optimizer.state[_slot(layer, "u.lora_A.default.weight")]["exp_avg"].clone()
               for name, layer in layers.items()}

    slicer = PrefixSlicer(layers, optimizer, multiple=multiple)
    slicer.narrow(ranks)
    for name, layer in layers.items():
        assert layer.rank == layer.mask.numel() == layer.u.in_features == computed[name]
        assert int(layer.kept.sum()) == ranks[name]
    loss = _step(peft_model, optimizer)
    slicer.widen()
    torch.testing.assert_close(loss, _step(masked, masked_optimizer), atol=1e-5, rtol=0)

    for name, layer in layers.items():
        k = computed[name]
        assert layer.rank == layer.mask.numel() == layer.u.in_features == compactor.full_rank[name]
        for key, tensor, dim in rank_slots(layer):
            parts = [k, tensor.shape[dim] - k]
            trained, untouched = tensor.detach().split(parts, dim)
            old, old_untouched = before[name][key].split(parts, dim)
            assert torch.equal(untouched, old_untouched), (name, key)
            if "lora" in key:  # the computed part took the masked model's step
                expected = _slot(masked_layers[name], key).detach().split(parts, dim)[0]
                torch.testing.assert_close(trained, expected, atol=1e-6, rtol=0)
                assert not torch.equal(trained, old)
            else:  # frozen, masks included
                assert torch.equal(trained, old), (name, key)
        lora_a = _slot(layer, "u.lora_A.default.weight")
        state = optimizer.state[lora_a]["exp_avg"]
        assert state.shape == lora_a.shape and torch.equal(state[:, k:], moments[name][:, k:])
    _step(peft_model, optimizer)  # full rank again, state included


@pytest.mark.parametrize(("needed", "rank", "multiple", "computed"), [
    (100, 576, 64, 128), (500, 576, 64, 512), (520, 576, 64, 576), (576, 576, 64, 576), (0, 576, 64, 0),
    (10, 48, 64, 12),  # a small layer steps by an eighth of its rank
    (5, 7, 64, 5), (30, 192, 1, 30),
])  # fmt: skip
def test_rounded_rank(needed, rank, multiple, computed):
    assert rounded_rank(needed, rank, multiple) == computed


def test_forced_compaction_takes_any_dead_rank_but_keeps_the_multiple():
    model, peft_model, layers, optimizer = _lora_model()
    name, layer = next(iter(layers.items()))  # rank 48
    with torch.no_grad():
        layer.mask[:5] = -0.01  # 5 dead: below the threshold
    compactor = RankCompactor(layers, optimizer, min_dead_fraction=0.2, multiple=4)
    assert compactor.compact_dead() == 0
    assert compactor.compact_dead(force=True) == 1
    assert layer.rank == 44 and int(layer.kept.sum()) == 43  # one dead rank pads 43 up to a multiple of 4
