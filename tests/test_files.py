"""Atomic writes (acip/files.py): a failed write leaves the previous file whole and no temporary file behind."""

import json

import pytest

from acip.files import write_atomically, write_json, write_jsonl


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
