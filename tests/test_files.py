"""Result files are written whole: a temporary name, then a rename."""

from __future__ import annotations

import json

from pipeline.files import write_json


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "result.json"
    assert write_json(path, {"a": 1, "p": tmp_path}) == path  # parents made; Path -> str
    assert json.loads(path.read_text()) == {"a": 1, "p": str(tmp_path)}
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
