"""Result and state files are written whole or not at all: to a temporary name beside the
target, then renamed over it, so an interrupted job never leaves a half-written JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON at `path` (parents created; values JSON lacks become strings).

    >>> import json, shutil, tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> p = write_json(root / "runs" / "result.json", {"out": Path("/tmp/x"), "step": 3})
    >>> json.loads(p.read_text())
    {'out': '/tmp/x', 'step': 3}
    >>> [f.name for f in p.parent.iterdir()]  # no temporary file left beside it
    ['result.json']
    >>> shutil.rmtree(root)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path
