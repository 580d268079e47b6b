"""The ACIP config (configuration_acip.py): config.json alone rebuilds it, base model config nested as text_config,
the auto classes mapped to the Hub files; settings a model cannot have are refused by name."""

import pytest
from conftest import tiny_base_model

from acip import ACIPConfig
from acip.hub.configuration_acip import AUTO_MAP


def test_config_json_alone_rebuilds_it(tmp_path):
    base = tiny_base_model("qwen2").config
    config = ACIPConfig(text_config=base.to_dict(), target_modules=["model.layers.0.mlp.up_proj"], mask_constant=0.05,
                        base_model_name_or_path="org/base", basis="whitened")  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = ACIPConfig.from_pretrained(tmp_path)
    assert type(loaded.text_config) is type(base) and loaded.text_config.hidden_size == base.hidden_size
    assert loaded.get_text_config() is loaded.text_config  # where generate() looks for the decoder's config
    assert (loaded.target_modules, loaded.mask_constant, loaded.basis) == (["model.layers.0.mlp.up_proj"], 0.05,
                                                                           "whitened")  # fmt: skip
    assert loaded.base_model_name_or_path == "org/base" and not loaded.compressed
    assert (loaded.lora_rank, loaded.selection, loaded.rank_cost) == (0, "ranked", "aligned")  # acip's own defaults
    assert loaded.auto_map == AUTO_MAP and set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


def test_a_compressed_config_lists_each_layer_once():
    targets = ["a", "b", "c"]
    config = ACIPConfig(target_modules=targets, compressed=True, layer_ranks={"a": 4, "b": "2"}, dense_modules=["c"],
                        fused_groups=[["a", "b"]])  # fmt: skip
    assert config.layer_ranks == {"a": 4, "b": 2} and config.fused_groups == [["a", "b"]]
    for bad in (dict(layer_ranks={"a": 4}, dense_modules=["c"]), dict(layer_ranks={"a": 4, "b": 2, "c": 1},
                dense_modules=["c"])):  # fmt: skip
        with pytest.raises(ValueError, match="every target module exactly once"):
            ACIPConfig(target_modules=targets, compressed=True, **bad)


@pytest.mark.parametrize("settings, match", [
    (dict(basis="qr"), "basis must be one of"),
    (dict(mask_constant=0.0), "mask_constant must be > 0"),
    (dict(target_modules=["a"], fused_groups=[["a"]]), "fused_groups must list compressed target modules"),
    (dict(lora_rank=-1), "lora_rank must be an integer >= 0"),
    (dict(lora_rank=2.5), "lora_rank must be an integer >= 0"),
    (dict(selection="nearest"), "selection must be one of"),
])  # fmt: skip
def test_settings_a_model_cannot_have_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        ACIPConfig(**settings)
