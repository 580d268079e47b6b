"""A saved ACIP model at a size (acip/sizes.py): ratios checked, a folder told apart from a plain model and a
compressed one before anything is loaded, and the model loaded pruned and compressed as a user would do it."""

import json

import pytest
import torch
from conftest import save_tiny_run, token_ids

from acip.hub.modeling_acip import ACIPModel
from acip.sizes import check_acip_model, check_ratio_suits, check_ratios, check_size_ratio, load_at_size


def test_ratios_are_fractions_kept_in_zero_to_one():
    assert check_ratios([1, 0.25]) == [1.0, 0.25] and check_size_ratio(0.5) == 0.5
    for bad in (0, 1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            check_size_ratio(bad)
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\].*got 2"):
        check_ratios([0.5, 2])
    with pytest.raises(ValueError, match="at least one"):
        check_ratios([])


def test_a_folder_is_told_apart_before_loading(tmp_path):
    acip_dir, base_dir = save_tiny_run(tmp_path)
    assert check_acip_model("model_dir", acip_dir)["model_type"] == "acip"
    assert check_acip_model("model_dir", "org/some-acip-model") is None  # a Hub id: read when loaded
    with pytest.raises(ValueError, match=rf"model_dir {base_dir} is a llama model, not an ACIP model: make one with "
                                         rf"acip compress --base-model {base_dir}"):  # fmt: skip
        check_acip_model("model_dir", base_dir)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model of no known type"):
        check_acip_model("model_dir", tmp_path / "odd")
    (tmp_path / "odd" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_dir: .*config.json is not a model's config"):
        check_acip_model("model_dir", tmp_path / "odd")
    with pytest.raises(FileNotFoundError, match="model_dir: no such folder"):
        check_acip_model("model_dir", tmp_path / "missing")


def test_a_ratio_must_suit_the_model(tmp_path):
    acip_dir, _ = save_tiny_run(tmp_path)
    load_at_size(acip_dir, 0.5).save_pretrained(tmp_path / "small")
    check_ratio_suits("model_dir", acip_dir, 0.5)
    check_ratio_suits("model_dir", acip_dir, None, needed=False)  # exported as it is: prunable
    check_ratio_suits("model_dir", tmp_path / "small", None)
    with pytest.raises(ValueError, match="model_dir .*acip is a prunable ACIP model: give the size ratio"):
        check_ratio_suits("model_dir", acip_dir, None)
    with pytest.raises(ValueError, match="model_dir .*small is already compressed; leave out ratio"):
        check_ratio_suits("model_dir", tmp_path / "small", 0.5, needed=False)
    with pytest.raises(ValueError, match="already compressed"):
        load_at_size(tmp_path / "small", 0.5)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        check_ratio_suits("model_dir", tmp_path / "missing", 1.7)  # the ratio is checked first


def test_loaded_at_a_size_is_what_pruning_and_compressing_give(tmp_path):
    acip_dir, _ = save_tiny_run(tmp_path)
    model = load_at_size(acip_dir, 0.6, torch.float32)
    expected = ACIPModel.from_pretrained(acip_dir).eval().prune_model_by_score(compression_ratio=0.6).compress()
    assert model.config.compressed and not model.training
    assert model.get_size_ratio() == expected.get_size_ratio() < 0.7
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits)
    as_saved = load_at_size(acip_dir)
    assert not as_saved.config.compressed and as_saved.get_size_ratio() == 1.0
