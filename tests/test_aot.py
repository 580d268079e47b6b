"""acip.aot: ahead-of-time compiled packages decode what the model decodes; bad input writes nothing."""

import copy

import pytest
import torch
from conftest import greedy, needs_compiler, tiny_acip_model, token_ids

from acip.aot import PackagedLM, build_package


@pytest.mark.parametrize(
    "kind, dtype",  # llama unfused: tests/test_cli.py
    [("qwen2", torch.float32), pytest.param("mistral", torch.bfloat16, marks=pytest.mark.slow)],
)
@needs_compiler
def test_package_decodes_what_the_model_decodes(tmp_path, kind, dtype):
    model = tiny_acip_model(kind).prune_model_by_score(0.6).compress().fuse().to(dtype)
    # bfloat16: the compiled kernels sum in another order than eager ones; a near-tie may then pick another token
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    before = copy.deepcopy(model.state_dict())
    layouts = {n: getattr(m, "layout", None) for n, m in model.model.named_modules()}
    path = build_package(model, tmp_path / "model.pt2", batch_size=2, max_cache_len=24)
    # nothing left beside it but the lock file, as beside every output of acip (acip.folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt2.acip-lock", "model.pt2"]
    # the model is as it was: weights, layout, generation settings
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert layouts == {n: getattr(m, "layout", None) for n, m in model.model.named_modules()}
    assert model.generation_config.cache_implementation is None

    lm = PackagedLM(path)
    assert (lm.batch_size, lm.max_cache_len) == (2, 24)
    ids = token_ids(2, 7)
    if dtype == torch.float32:
        assert torch.equal(lm.generate(ids, 9), greedy(model, ids, 9))
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    assert lm(ids).dtype == dtype
    torch.testing.assert_close(lm(ids), expected, **tolerance)
    # a step continues from the cache the previous call filled
    more = token_ids(2, 3, seed=1)
    with torch.no_grad():
        expected = model(torch.cat([ids, more], 1)).logits[:, -1]
    torch.testing.assert_close(lm(more, start=7), expected, **tolerance)

    # EOS: a row that produced it goes on with pad_token_id; decoding stops once every row has
    free = lm.generate(ids, 8)
    eos = int(free[0, 8])  # row 0's second new token
    out = lm.generate(ids, 8, eos_token_id=eos, pad_token_id=0)
    for row in range(2):
        hits = (free[row, 7:] == eos).nonzero()
        if len(hits):
            stop = 7 + int(hits[0])
            assert torch.equal(out[row, : stop + 1], free[row, : stop + 1]) and (out[row, stop + 1 :] == 0).all()
        else:
            assert torch.equal(out[row], free[row, : out.shape[1]])

    with pytest.raises(ValueError, match="batch_size=2"):
        lm.generate(token_ids(1, 7), 4)
    with pytest.raises(ValueError, match="max_cache_len=24"):
        lm.generate(ids, 19)
    with pytest.raises(ValueError, match="start="):
        lm(ids, start=20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, 0)
    with pytest.raises(ValueError, match="input_ids"):
        lm.generate(ids.float(), 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [(dict(path="model.bin"), ValueError, "path must end in .pt2"),
     (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
     (dict(max_cache_len=1), ValueError, "max_cache_len must be an integer >= 2"),
     (dict(max_cache_len=129), ValueError, "max_position_embeddings"),
     (dict(path="missing/model.pt2"), FileNotFoundError, "folder of path"),
     (dict(path="taken.pt2"), FileExistsError, "overwrite=True")],  # fmt: skip
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, error, match):
    (tmp_path / "taken.pt2").write_bytes(b"a user's file")
    model = tiny_acip_model("llama").prune_model_by_score(0.6).compress()
    kwargs = {"path": "model.pt2", "max_cache_len": 24, **kwargs}
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(error, match=match):
        build_package(model, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt2"]
    assert (tmp_path / "taken.pt2").read_bytes() == b"a user's file"


def test_sliding_window_bounds_the_cache(tmp_path):
    model = tiny_acip_model("mistral").prune_model_by_score(0.6).compress()  # sliding_window=32
    with pytest.raises(ValueError, match="sliding_window"):
        build_package(model, tmp_path / "m.pt2", max_cache_len=33)


def test_not_an_acip_model_or_package(tmp_path):
    with pytest.raises(TypeError, match="ACIPModel"):
        build_package(torch.nn.Linear(2, 2), tmp_path / "m.pt2")
    with pytest.raises(FileNotFoundError, match="no package"):
        PackagedLM(tmp_path / "none.pt2")


@needs_compiler
@pytest.mark.parametrize("quant_type", ["int4", "int8"])
def test_int_package_computes_what_the_model_computes(quant_type, tmp_path):
    model = tiny_acip_model("qwen2").prune_model_by_score(0.6).compress().fuse().quantize(quant_type)
    before = copy.deepcopy(model.state_dict())
    lm = PackagedLM(build_package(model, tmp_path / "model.pt2", batch_size=2, max_cache_len=24))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = token_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    # the same kernels on the same bfloat16 activations; only the order of the float32 sums around them differs
    torch.testing.assert_close(lm(ids), expected, atol=1e-3, rtol=1e-3)
