"""padt.io: atomic JSON / JSON-lines writes and readers whose errors name the file."""

from __future__ import annotations

import json

import pytest

from padt.io import iter_jsonl, load_json, write_json, write_jsonl


def test_write_json_bytes_and_options(tmp_path):
    obj = {"b": [1, 2], "a": "é"}
    write_json(obj, tmp_path / "new" / "plain.json")  # parent folders are created
    assert (tmp_path / "new" / "plain.json").read_bytes() == (json.dumps(obj) + "\n").encode()
    write_json(obj, tmp_path / "styled.json", indent=1, sort_keys=True)
    assert (tmp_path / "styled.json").read_text() == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert load_json(tmp_path / "styled.json") == obj
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "plain.json", "styled.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.jsonl"
    assert write_jsonl([{"i": 0}, {"i": 1}], path) == 2

    def broken():
        yield {"i": 2}
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_jsonl(broken(), path)
    assert [obj for _, obj in iter_jsonl(path)] == [{"i": 0}, {"i": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_readers_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.json"):
        load_json(tmp_path / "nope.json", "data file")
    (tmp_path / "bad.json").write_text('{"a": 1,\n}')
    with pytest.raises(ValueError, match=r"malformed JSON in JSON file .*bad\.json: line 2"):
        load_json(tmp_path / "bad.json")
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n[2]\n')
    assert list(iter_jsonl(tmp_path / "x.jsonl")) == [(1, {"a": 1}), (3, [2])]
