"""Atomic writes (acip/files.py) and the folders acip writes (acip/folders.py): a failed write leaves the previous
file whole; a folder is replaced by swapping a complete new one in, leftovers of killed swaps are put right by the
next call, and one process at a time holds a folder's lock."""

import errno
import json
import os

import pytest

import acip.folders as folders
from acip.files import write_atomically, write_json, write_jsonl
from acip.folders import FolderBusy, check_not_busy, folder_lock, recover, replace_folder, sibling
from acip.records import foreign_files


def test_writes_replace_whole_files(tmp_path):
    path = write_json(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_jsonl(tmp_path / "b.jsonl", [{"a": 1}, {"b": "é"}])
    assert [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()] == [{"a": 1}, {"b": "é"}]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_atomically(tmp_path / "a.txt", "old")

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"x": Unserializable()})
    with pytest.raises(TypeError):
        write_atomically(path, 42)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def folder_with(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def listing(path):
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder_swaps_in_the_new_folder_and_hands_back_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem without renameat2's exchange: two renames
        monkeypatch.setattr(folders, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EINVAL, "no")))
    target = folder_with(tmp_path / "out", a="old")
    new = folder_with(tmp_path / ".out.acip-save", a="new", b="new")
    previous = replace_folder(new, target)
    assert listing(target) == {"a": "new", "b": "new"} and listing(previous) == {"a": "old"}
    fresh = folder_with(tmp_path / "stage", c="c")
    assert replace_folder(fresh, tmp_path / "absent") is None and listing(tmp_path / "absent") == {"c": "c"}


def test_the_next_call_finishes_a_swap_killed_between_its_two_renames(tmp_path):
    target = tmp_path / "out"
    folder_with(sibling(target, "acip-old"), a="old")  # renamed aside, and the process was killed there
    folder_with(sibling(target, "acip-save"), a="new")  # complete: the swap only starts once it is
    notes = recover(target)
    assert listing(target) == {"a": "new"} and notes and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    folder_with(sibling(target, "acip-old"), a="older")  # killed after the second rename: only the old is left
    recover(target)
    assert listing(target) == {"a": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_removes_what_killed_processes_left_and_nothing_else(tmp_path):
    target = folder_with(tmp_path / "out", **{"acip_run.json": json.dumps({"run_id": "r1", "finished": True})})
    folder_with(sibling(target, "acip-save"), half="written")
    folder_with(sibling(target, "acip-new"), **{"acip_run.json": json.dumps({"run_id": "r1"})})  # that run's work
    folder_with(tmp_path / ".out.export-999999999", x="")  # an export of an earlier acip, killed
    folder_with(tmp_path / "mine", keep="user")
    assert len(recover(target)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
    folder_with(sibling(target, "acip-new"), **{"acip_run.json": json.dumps({"run_id": "r2"})})  # a run to resume
    assert recover(target) == [] and sibling(target, "acip-new").exists()


def test_foreign_files_are_those_no_record_lists(tmp_path):
    user = folder_with(tmp_path / "user", notes="mine")
    assert foreign_files(user) == ["notes"]
    files = ["acip_run.json", "config.json", "model.safetensors"]
    run = folder_with(tmp_path / "run", **{"acip_run.json": json.dumps({"files": files}), "config.json": "{}"})
    (run / "eval_perplexity.csv").write_text("")  # acip eval's report, added later
    assert foreign_files(run) == []
    (run / "notes.txt").write_text("mine")
    assert foreign_files(run) == ["notes.txt"]
    legacy = folder_with(tmp_path / "legacy", **{"acip_run.json": "{}", "config.json": "{}", "photo.jpg": ""})
    assert foreign_files(legacy) == ["photo.jpg"]  # a record without a file list: acip's usual names only


def test_one_process_at_a_time_holds_a_folder(tmp_path):
    out = tmp_path / "out"
    with folder_lock(out) as lock_file:
        assert lock_file == tmp_path / ".out.acip-lock" and json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderBusy, match=rf"output_dir {out} is in use by process {os.getpid()} .*started"):
            with folder_lock(out):
                pass
        with pytest.raises(FolderBusy, match="model_dir"):
            check_not_busy(out, "model_dir")
    with folder_lock(out):  # released: free again
        pass
    check_not_busy(out, "model_dir")
    assert not out.exists()  # the lock lives beside the folder, never inside it
