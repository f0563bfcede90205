"""Result and state files are written whole or not at all: to a temporary name beside the
target, then renamed over it, so an interrupted job never leaves a half-written file (JSON,
CSV, Markdown, PNG)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (parents created) to write to: renamed over `path` when
    the block ends, removed if it raises, so `path` holds the old file or the new one, whole.

    >>> import shutil, tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with replacing(root / "a.txt") as tmp:
    ...     _ = tmp.write_text("old")
    >>> try:
    ...     with replacing(root / "a.txt") as tmp:
    ...         _ = tmp.write_text("half")
    ...         raise OSError("disk full")
    ... except OSError:
    ...     pass
    >>> (root / "a.txt").read_text(), [f.name for f in root.iterdir()]
    ('old', ['a.txt'])
    >>> shutil.rmtree(root)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this write's own (two writers of one file do not share it)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as written:  # on disk before the rename makes it the file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any, *, nan_as_null: bool = True) -> Path:
    """`data` as indented JSON at `path` (parents created; numpy values as JSON's own, others JSON
    lacks as their text).
    NaN and infinities, which strict JSON lacks (jq, JavaScript, most JSON libraries refuse
    Python's `NaN`), are written as null -- `nan_as_null=False` keeps them for a file only
    Python reads back (metric points to send again as they were).

    >>> import json, shutil, tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> p = write_json(root / "runs" / "result.json", {"out": Path("/tmp/x"), "step": 3,
    ...                                               "m": [float("nan"), float("inf"), 1.5]})
    >>> json.loads(p.read_text())
    {'out': '/tmp/x', 'step': 3, 'm': [None, None, 1.5]}
    >>> [f.name for f in p.parent.iterdir()]  # no temporary file left beside it
    ['result.json']
    >>> import numpy as np  # numpy's values as JSON's own, not as text
    >>> p = write_json(root / "n.json", {"n": np.int64(3), "b": np.bool_(True),
    ...                                  "a": np.array([1.0, np.nan])})
    >>> json.loads(p.read_text())
    {'n': 3, 'b': True, 'a': [1.0, None]}
    >>> json.loads(write_json(root / "k.json", {"a": np.array([np.inf])}, nan_as_null=False).read_text())
    {'a': [inf]}
    >>> shutil.rmtree(root)
    """
    if nan_as_null:
        return write_text(path, json.dumps(_finite(data), indent=2, default=_plain, allow_nan=False))
    return write_text(path, json.dumps(data, indent=2, default=_plain))


def _plain(value: Any) -> Any:
    """A value JSON lacks as one it has: numpy's scalars and arrays as Python's (an int was
    written "3", a bool "True"); anything else as its text (a Path)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _finite(data: Any) -> Any:
    """`data` with every non-finite float (numpy's too) as None, containers walked."""
    if isinstance(data, np.ndarray):
        return _finite(data.tolist())
    if isinstance(data, float | np.floating):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def write_text(path: str | Path, text: str) -> Path:
    """`text` at `path`, whole (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def run_state(out_dir: str | Path, name: str = "run.json") -> dict[str, Any]:
    """`out_dir/run.json`, the state a training run keeps in its --out folder (its MLflow run
    and the store it records to, its config, its data's fingerprint, its checkpoint folder and
    its driver: `launch.this_driver`); {} when there is none.
    ConfigError naming the file when it is not such a state (damaged, a folder): a traceback
    before (`name`: a sweep's `sweep.json`, read the same way).

    >>> import tempfile; out = Path(tempfile.mkdtemp()); _ = (out / "run.json").write_text("{")
    >>> run_state(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: argument error: .../run.json is not a run's state (...): remove it...
    """
    from pipeline.config import ConfigError

    state_file = Path(out_dir) / name
    if not state_file.exists():
        return {}
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        for key in ("tracking_uri", "checkpoints", "mlflow_run_id"):  # (what is read as text)
            if state.get(key) is not None and not isinstance(state[key], str):
                raise ValueError(f"its {key} is not text")
        for key in ("config", "data"):  # (what is read as a mapping: a resume compares them)
            if state.get(key) is not None and not isinstance(state[key], dict):
                raise ValueError(f"its {key} is not a mapping")
    except (OSError, ValueError) as err:  # (UnicodeDecodeError and JSONDecodeError are too)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"argument error: {state_file} is not a run's state ({reason}): "
                          "remove it, or use another --out") from None
    return state


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure at `path`, whole, in the format its suffix names (see `replacing`)."""
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **kwargs)
    return path
