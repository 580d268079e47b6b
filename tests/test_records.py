"""What acip leaves next to a result (acip/records.py): records read safely, the record that says what a folder
holds, the files acip did not write (what --overwrite refuses to delete), the base model an ACIP run started from."""

import json

import pytest

from acip.records import (
    EXPORT_FILE, FINETUNE_FILE, RUN_FILE, folder_record, foreign_files, read_record, recorded_base_model,
)  # fmt: skip


def folder_with(path, **files):
    """A folder holding ``files`` (relative path -> text; a dict is written as JSON)."""
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(text) if isinstance(text, dict) else text)
    return path


def test_a_record_is_a_json_object_or_nothing(tmp_path):
    folder_with(tmp_path, **{RUN_FILE: {"finished": True}, FINETUNE_FILE: "[1, 2]", EXPORT_FILE: "{torn"})
    assert read_record(tmp_path, RUN_FILE) == {"finished": True}
    assert read_record(tmp_path, FINETUNE_FILE) is None and read_record(tmp_path, EXPORT_FILE) is None
    assert read_record(tmp_path, "absent.json") is None and read_record(tmp_path / "absent", RUN_FILE) is None


def test_the_most_specific_record_says_what_a_folder_holds(tmp_path):
    assert folder_record(tmp_path) is None
    folder_with(tmp_path, **{RUN_FILE: {}})
    assert folder_record(tmp_path) == RUN_FILE
    folder_with(tmp_path, **{FINETUNE_FILE: {}})  # a fine-tuned model carries its ACIP run's record
    assert folder_record(tmp_path) == FINETUNE_FILE
    folder_with(tmp_path, **{EXPORT_FILE: {}})  # an export copies both
    assert folder_record(tmp_path) == EXPORT_FILE


def test_foreign_files_are_those_no_record_lists(tmp_path):
    user = folder_with(tmp_path / "user", notes="mine", **{"sub/photo.jpg": ""})
    assert foreign_files(user) == ["notes", "sub/photo.jpg"]
    (tmp_path / "empty-sub" / "sub").mkdir(parents=True)
    assert foreign_files(tmp_path / "empty-sub") == ["sub"]  # no files, but not empty either
    files = [RUN_FILE, "config.json", "model.safetensors"]
    run = folder_with(tmp_path / "run", **{RUN_FILE: {"files": files}, "config.json": "{}", "model.safetensors": ""})
    (run / "eval_perplexity.csv").write_text("")  # acip eval's report, added later
    assert foreign_files(run) == []
    (run / "notes.txt").write_text("mine")
    assert foreign_files(run) == ["notes.txt"]


def test_a_run_in_progress_owns_its_log_and_checkpoints(tmp_path):
    # Its record lists no files until the run is finished: what it has written is the log and the checkpoints.
    run = folder_with(tmp_path, **{RUN_FILE: {"finished": False}, "run_log.jsonl": "", "checkpoints/latest.json": "{}",
                                   "checkpoints/step-0000002/state.safetensors": ""})  # fmt: skip
    assert foreign_files(run) == []
    folder_with(run, **{"model.safetensors": "", "finetune_log.jsonl": ""})  # not what an ACIP run in progress writes
    assert foreign_files(run) == ["finetune_log.jsonl", "model.safetensors"]


def test_the_base_model_of_an_acip_run(tmp_path):
    folder_with(tmp_path, **{RUN_FILE: {"config": {"base_model": "org/base"}}})
    assert recorded_base_model(tmp_path) == "org/base"
    with pytest.raises(FileNotFoundError, match="has no acip_run.json; name the base model"):
        recorded_base_model(tmp_path / "elsewhere")
