"""A training run's folder (acip/runs.py): the pointer names only complete checkpoints, leftovers of killed writes are
ignored and cleared, a torn last log line does not break resume; where a run lives, what resuming it checks and the
recorded settings it reads."""

import dataclasses
import json

import pytest
import torch

from acip.loop import TrainingConfig
from acip.records import FINETUNE_FILE, RUN_FILE
from acip.runs import RunFolder, latest_checkpoint, load_checkpoint, recorded_settings, save_checkpoint, truncate_log


def test_the_latest_checkpoint_is_the_last_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    first = save_checkpoint(tmp_path, 4, {"x": torch.ones(3)}, {"step": 4})
    assert latest_checkpoint(tmp_path) == first
    # A later write killed between its rename and the pointer update: the pointer still names step 4, complete.
    (tmp_path / "checkpoints" / "step-0000008").mkdir()
    (tmp_path / "checkpoints" / "step-0000012.tmp").mkdir()  # killed inside the write
    assert latest_checkpoint(tmp_path) == first
    tensors, meta = load_checkpoint(first)
    assert torch.equal(tensors["x"], torch.ones(3)) and meta == {"step": 4}
    # The next checkpoint replaces the leftovers (the same step written again included) and the old checkpoint.
    second = save_checkpoint(tmp_path, 8, {"x": torch.zeros(2)}, {"step": 8})
    assert latest_checkpoint(tmp_path) == second
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-0000008"]


def test_a_pointer_to_a_missing_or_incomplete_checkpoint_is_no_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 4, {"x": torch.ones(1)}, {"step": 4})
    (tmp_path / "checkpoints" / "step-0000004" / "trainer.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "latest.json").write_text('{"checkpoint": ')  # not JSON
    assert latest_checkpoint(tmp_path) is None


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "run_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # the disk filled up inside step 6's line
    truncate_log(log, 4)
    assert log.read_text() == "\n".join(lines[:4]) + "\n"
    log.write_text("\n".join(lines) + "\n\x00\x00\x00")  # a power loss left zeros at the end
    truncate_log(log, 5)
    assert log.read_text() == "\n".join(lines) + "\n"


def started(folder, record_file=RUN_FILE, checkpoint=True, **record):
    """A run that was started in ``folder`` (and checkpointed once), as its record and checkpoint leave it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"config": dataclasses.asdict(TrainingConfig(lr=1e-3)), "processes": 1, "finished": False, **record}
    (folder / record_file).write_text(json.dumps(record))
    if checkpoint:
        save_checkpoint(folder, 2, {"x": torch.ones(1)}, {"step": 2})
    return folder


def test_where_a_run_lives(tmp_path):
    out = tmp_path / "out"
    assert RunFolder(out, RUN_FILE).check(resume=False, overwrite=False) == out  # absent: the run lives there
    out.mkdir()
    assert RunFolder(out, RUN_FILE).check(resume=False, overwrite=False) == out  # empty: there too
    started(out, finished=True, files=[RUN_FILE, "checkpoints/latest.json"], checkpoint=False)
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        RunFolder(out, RUN_FILE).check(resume=False, overwrite=False)
    new = tmp_path / ".out.acip-new"
    assert RunFolder(out, RUN_FILE).check(resume=False, overwrite=True) == new  # beside it, until complete
    started(new)
    folder = RunFolder(out, RUN_FILE)
    assert folder.work == new and folder.check(resume=True, overwrite=False) == new
    with pytest.raises(FileExistsError, match=r"has an unfinished run in .*acip-new; pass resume=True"):
        folder.check(resume=False, overwrite=False)
    folder.prepare(new, resume=False)  # a new run over the unfinished one: it starts from nothing
    assert list(new.iterdir()) == [] and (out / RUN_FILE).exists()


def test_resuming_needs_a_checkpointed_run_of_the_same_kind(tmp_path):
    for setup, error, match in (
        (lambda f: None, FileNotFoundError, "nothing to resume in output_dir .*: no acip run was started there"),
        (lambda f: started(f, checkpoint=False), FileNotFoundError, "has no checkpoint yet"),
        (lambda f: started(f, checkpoint=False, finished=True), FileNotFoundError, "it holds a finished run"),
        (lambda f: started(f, FINETUNE_FILE), ValueError, r"holds a fine-tuning run \(acip finetune\), not an ACIP "
                                                          r"run .*resume it with acip finetune --resume"),
    ):  # fmt: skip
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        setup(folder)
        with pytest.raises(error, match=match):
            RunFolder(folder, RUN_FILE).check(resume=True, overwrite=False)


def test_the_recorded_settings_are_read_in_one_place(tmp_path):
    assert recorded_settings(tmp_path / "none", RUN_FILE, TrainingConfig) is None
    started(tmp_path / "run", FINETUNE_FILE)
    assert recorded_settings(tmp_path / "run", RUN_FILE, TrainingConfig) is None  # not a run of this kind
    assert recorded_settings(tmp_path / "run", FINETUNE_FILE, TrainingConfig) == TrainingConfig(lr=1e-3)
    given = recorded_settings(tmp_path / "run", FINETUNE_FILE, TrainingConfig, seed=7)  # options given with --resume
    assert given == TrainingConfig(lr=1e-3, seed=7)
    record = json.loads((tmp_path / "run" / FINETUNE_FILE).read_text())
    record["config"]["a_field_of_a_later_version"] = 1
    (tmp_path / "run" / FINETUNE_FILE).write_text(json.dumps(record))
    assert recorded_settings(tmp_path / "run", FINETUNE_FILE, TrainingConfig) == TrainingConfig(lr=1e-3)


def test_settling_a_resumed_run_compares_settings_and_inputs(tmp_path):
    text = tmp_path / "words.txt"
    text.write_text("w3 w4")
    out = started(tmp_path / "out", inputs={"data": {"path": str(text), "fingerprint": {"words.txt": "before"}}})
    folder, inputs = RunFolder(out, RUN_FILE), lambda config: {"data": str(text)}
    with pytest.raises(ValueError, match=r"other settings.*\n  lr: recorded 0.001, given 0.1\n  seed: recorded 0, "
                                         r"given 3\nleave them out"):  # fmt: skip
        folder.settle(TrainingConfig(lr=0.1, seed=3), True, False, 1, ["lr", "seed"], inputs)
    with pytest.raises(ValueError, match=r"its inputs changed:\n  data: .*words.txt changed since the run started"):
        folder.settle(TrainingConfig(lr=1e-3), True, False, 1, ["lr"], inputs)
    config, paths, work = folder.settle(TrainingConfig(), True, False, 1, (), None)  # the recorded settings
    assert config == TrainingConfig(lr=1e-3) and paths == {} and work == out
    with pytest.raises(ValueError, match="block_size must be >= 1"):  # a new run: its settings are checked
        RunFolder(tmp_path / "new", RUN_FILE).settle(TrainingConfig(block_size=0), False, False, 1, (), None)
    with pytest.raises(ValueError, match="output_dir must not hold data"):
        RunFolder(tmp_path, RUN_FILE).settle(TrainingConfig(), False, True, 1, (), inputs)
