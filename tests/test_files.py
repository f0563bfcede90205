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


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """A write cut off half-way (here: the disk fills after half the text) leaves the file as it
    was and no temporary file beside it, for JSON, text and figures alike."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.files import save_figure, write_text

    fig = plt.figure()
    old = {"result.json": write_json(tmp_path / "result.json", {"a": 1}),
           "summary.md": write_text(tmp_path / "summary.md", "| a |\n"),
           "plot.png": save_figure(fig, tmp_path / "plot.png")}
    before = {name: p.read_bytes() for name, p in old.items()}
    assert before["plot.png"].startswith(b"\x89PNG")  # the format its suffix names

    real_write = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    def half_a_png(path, **kwargs):
        Path(path).write_bytes(b"\x89PN")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    monkeypatch.setattr(fig, "savefig", half_a_png)
    for write in (lambda: write_json(old["result.json"], {"a": 2, "b": [1, 2, 3]}),
                  lambda: write_text(old["summary.md"], "| b |\n" * 10),
                  lambda: save_figure(fig, old["plot.png"])):
        try:
            write()
        except OSError:
            pass
        else:
            raise AssertionError("the write did not fail")
    assert {name: p.read_bytes() for name, p in old.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old)
