"""What a command reads (acip/inputs.py): model and data sources checked without loading them (errors name the
argument), local paths told from Hub ids, sequence lengths against a model's positions, and the fingerprints that
tell a resumed run whether its inputs changed."""

import os

import pytest
from conftest import tiny_base_model, tiny_tokenizer

from acip.inputs import (
    changed_inputs, check_data_source, check_model_source, check_positions, fingerprint, is_local_path, local_inputs,
    max_positions,
)  # fmt: skip


def saved_base(folder):
    """A tiny saved base model (128 positions) and its tokenizer."""
    tiny_base_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_local_paths_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    for local in ("./model", "~/model", "/abs/model", "a/b/c", "org", "win\\path"):
        assert is_local_path(local), local
    for remote in ("org/model", "gpt2", "smollm2"):
        assert not is_local_path(remote), remote
    named = {"a": str(tmp_path / "org"), "b": "org/model", "c": None, "d": ""}
    assert local_inputs(named) == {"a": str(tmp_path / "org")}


def test_a_model_source_is_a_built_in_name_a_saved_folder_or_a_hub_id(tmp_path):
    check_model_source("base_model", "smollm2", builtin=("smollm2",))
    check_model_source("base_model", "org/model")
    check_model_source("base_model", saved_base(tmp_path / "base"))
    for bad, error, match in (
        ("", ValueError, "base_model must be a model folder or a Hub id"),
        ("no such name!", ValueError, "base_model must be"),
        (tmp_path / "missing", FileNotFoundError, "base_model: no such folder"),
        (tmp_path / "base" / "config.json", NotADirectoryError, "base_model must be a folder"),
        (tmp_path, FileNotFoundError, "is not a saved model"),
    ):
        with pytest.raises(error, match=match):
            check_model_source("base_model", bad)


def test_a_data_source_is_a_corpus_a_hub_dataset_or_files_with_text(tmp_path):
    check_data_source("data", "wiki-train")
    check_data_source("data", "hf:allenai/c4:en:train")
    (tmp_path / "a.txt").write_text("w3 w4")
    (tmp_path / "b.txt").write_text("")
    check_data_source("data", str(tmp_path / "a.txt"))
    check_data_source("data", str(tmp_path / "*.txt"))  # one of the two holds text
    for bad, error, match in (
        ("hf:", ValueError, r"data must be hf:NAME\[:CONFIG\[:SPLIT\]\]"),
        ("hf:a:b:c:d", ValueError, "data must be hf:NAME"),
        (str(tmp_path), IsADirectoryError, "is a folder; pass a file, or a glob"),
        (str(tmp_path / "nope.txt"), FileNotFoundError, "data: no such file"),
        (str(tmp_path / "b.txt"), ValueError, r"holds no text \(the file is empty or blank\)"),
        (str(tmp_path / "b*.txt"), ValueError, r"holds no text \(all 1 files are empty or blank\)"),
    ):
        with pytest.raises(error, match=match):
            check_data_source("data", bad)


def test_sequence_lengths_must_fit_the_models_positions(tmp_path):
    base = saved_base(tmp_path / "base")
    assert max_positions(base) == max_positions(tiny_base_model()) == 128
    assert max_positions("smollm2") == 8192
    assert max_positions("org/never-downloaded") is None  # nothing is fetched to check
    check_positions("base_model", base, {"block_size": 128})
    check_positions("base_model", "org/never-downloaded", {"block_size": 10**6})
    with pytest.raises(ValueError, match=r"calibration_block_size must be at most the max_position_embeddings of "
                                         r"base_model .*base \(128\), got 129"):  # fmt: skip
        check_positions("base_model", base, {"block_size": 64, "calibration_block_size": 129})


def test_fingerprints_tell_what_changed(tmp_path):
    base = saved_base(tmp_path / "base")
    text = tmp_path / "words.txt"
    text.write_text("w3 w4 w5")
    recorded = {name: {"path": str(path), "fingerprint": fingerprint(path)} for name, path in
                (("base_model", base), ("data", text))}  # fmt: skip
    assert set(recorded["base_model"]["fingerprint"]) == {"config.json", "model.safetensors"}  # not the tokenizer
    (base / "eval_perplexity.csv").write_text("a report added later")
    assert changed_inputs(recorded, {"base_model": str(base), "data": str(text)}) == []
    text.write_text("w3 w4 w6")
    other = tmp_path / "other.txt"
    other.write_text("w3")
    changes = changed_inputs(recorded, {"base_model": str(tmp_path / "base"), "data": str(text), "new": str(other)})
    assert changes == [f"data: {text} changed since the run started (its files differ)"]
    assert changed_inputs(recorded, {"data": str(other)}) == [
        f"data: the run started from {text}, given {os.path.abspath(other)}"
    ]
