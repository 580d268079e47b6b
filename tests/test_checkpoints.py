"""Checkpoints and run logs (acip/checkpoints.py): the pointer names only complete checkpoints, leftovers of killed
writes are ignored and cleared, and a torn last log line does not break resume."""

import json

import torch

from acip.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log


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
