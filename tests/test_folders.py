"""How acip writes (acip/folders.py): a failed write leaves the previous file whole; a folder is replaced by swapping a
complete new one in, leftovers of killed swaps are put right by the next call, one process at a time holds a folder's
lock, and replacing() runs the whole protocol for a folder or a file."""

import errno
import json
import os

import pytest

import acip.folders as folders
from acip.folders import (
    FolderBusy, check_not_busy, folder_lock, recover, replace_folder, replacing, sibling, write_atomically, write_json,
    write_jsonl,
)  # fmt: skip


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
    (tmp_path / ".m.pt2.acip-save.pt2").write_text("half a package")  # a killed write of the file m.pt2
    (tmp_path / "m.pt2").write_text("the package")
    folder_with(tmp_path / "mine", keep="user")
    assert len(recover(target)) == 2 and len(recover(tmp_path / "m.pt2")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "mine", "out"]
    folder_with(sibling(target, "acip-new"), **{"acip_run.json": json.dumps({"run_id": "r2"})})  # a run to resume
    assert recover(target) == [] and sibling(target, "acip-new").exists()


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


def test_replacing_a_folder_swaps_in_the_complete_stage(tmp_path):
    out = folder_with(tmp_path / "out", a="old")
    checks = []

    def check():
        checks.append(sibling(out, "acip-lock").exists())  # before the lock, then under it
        return "checked"

    with replacing(out, "out_dir", check) as output:
        assert output.checked == "checked" and checks == [False, True]
        with output.staged() as stage:
            assert stage == sibling(out, "acip-save") and list(stage.iterdir()) == []
            (stage / "a").write_text("new")
            assert listing(out) == {"a": "old"}  # the old one stays until the new one is complete
    assert listing(out) == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.acip-lock", "out"]


def test_a_refused_or_failed_replacement_leaves_everything_as_it_was(tmp_path):
    out = folder_with(tmp_path / "out", a="old")

    def refuse():
        raise FileExistsError("out_dir is not empty")

    with pytest.raises(FileExistsError):
        with replacing(out, "out_dir", refuse):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # refused before the lock file was written
    with pytest.raises(RuntimeError, match="the export does not load"):
        with replacing(out, "out_dir", lambda: None) as output, output.staged() as stage:
            (stage / "a").write_text("half")
            raise RuntimeError("the export does not load")
    assert listing(out) == {"a": "old"} and not sibling(out, "acip-save").exists()
    with folder_lock(out):  # another process writes it: refused at once, nothing checked
        with pytest.raises(FolderBusy, match="out_dir .*out is in use"):
            with replacing(out, "out_dir", refuse):
                pass


def test_replacing_a_file_renames_its_stage_over_it(tmp_path):
    package = tmp_path / "m.pt2"
    package.write_text("old")
    (tmp_path / ".m.pt2.acip-save.pt2").write_text("left by a killed build")
    with pytest.raises(ValueError):
        with replacing(package, "path", lambda: None, file=True) as output, output.staged() as stage:
            assert stage == tmp_path / ".m.pt2.acip-save.pt2" and not stage.exists()  # the suffix kept
            stage.write_text("half")
            raise ValueError("the compiler failed")
    assert package.read_text() == "old" and not stage.exists()
    with replacing(package, "path", lambda: None, file=True) as output, output.staged() as stage:
        stage.write_text("new")
    assert package.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.pt2.acip-lock", "m.pt2"]
