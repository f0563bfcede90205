"""Checkpoints: one folder per save, written to temporary names and renamed (pure PyTorch).

A checkpoint folder holds `state.pt` (model, optimizer, scaler, step, epoch; a resume starts at
the epoch after it, so no position inside an epoch is kept) and
`meta.json` (step, epoch and the SHA-256 of `state.pt`: readable without torch, written last).
Three guarantees:

- **Never half-written.** Both files go to temporary names first; a failed write (a full disk)
  removes them and raises `CheckpointError`. Over a checkpoint in the same folder, that one is
  left intact by a failure while the files are written, and gone (no checkpoint there, never
  a mix) by one between its meta.json's removal and the renames; the pipeline writes each
  checkpoint into a new folder.
- **Never taken when damaged.** `find_latest_checkpoint` scans a tree for the folder with the
  highest step whose `state.pt` matches its checksum, so `--resume` after a crash of the driver,
  or after a write cut short, falls back to the previous good checkpoint (and says why through
  `on_skip`).
- **Never unpickles code.** `state.pt` is read with `torch.load(..., weights_only=True)`; NumPy
  arrays are stored as tensors (tagged) and NumPy scalars as Python numbers, so a checkpoint
  needs nothing but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
_NDARRAY = "__ndarray__"  # the tag of a NumPy array stored as a tensor


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or one that is damaged or unsafe to read."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _encode(x: Any) -> Any:
    """NumPy out, so that weights_only loading can read everything back."""
    if isinstance(x, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_encode(v) for v in x)
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {_NDARRAY}:
            return x[_NDARRAY].cpu().numpy()  # loaded onto a GPU by map_location
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_decode(v) for v in x)
    return x


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write state (with integer `step` and `epoch`) into folder; return folder. A folder
    holds a checkpoint only once its meta.json is there, which is written last: a write cut
    short leaves a new folder without a checkpoint. Over a checkpoint already in `folder`, its
    meta.json goes first, so a cut leaves no checkpoint there rather than the old meta.json
    beside the new state (the pipeline writes each checkpoint into a new folder). Raises
    CheckpointError (naming the folder and the OS error) when the write fails."""
    folder = Path(folder)
    tmp_state, tmp_meta = folder / (STATE_FILE + ".tmp"), folder / (META_FILE + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_encode(state), tmp_state)
        with open(tmp_state, "rb") as f:  # on disk before meta.json says it is
            os.fsync(f.fileno())
        meta = {"step": int(state["step"]), "epoch": int(state["epoch"]),
                "sha256": sha256(tmp_state)}
        tmp_meta.write_text(json.dumps(meta))
        (folder / META_FILE).unlink(missing_ok=True)
        os.replace(tmp_state, folder / STATE_FILE)
        os.replace(tmp_meta, folder / META_FILE)  # last: a folder without it is no checkpoint
    except (OSError, RuntimeError) as e:  # a full disk: torch.save's zip writer raises RuntimeError
        for tmp in (tmp_state, tmp_meta):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = e.strerror if isinstance(e, OSError) and e.strerror else lines[-1]
        raise CheckpointError(f"cannot write checkpoint {folder}: {reason}") from e
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_FILE).read_text())
        int(meta["step"]), int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is unreadable ({e})") from e
    return meta


def epochs_done(folder: str | Path) -> int:
    """How many epochs the checkpoint at `folder` has trained (its meta.json: the last epoch's
    0-based index, plus one); CheckpointError when it is unreadable."""
    return int(_read_meta(Path(folder))["epoch"]) + 1


def steps_done(folder: str | Path) -> int:
    """The optimizer steps the checkpoint at `folder` has trained (its meta.json's `step`);
    CheckpointError when it is unreadable."""
    return int(_read_meta(Path(folder))["step"])


def _verify(folder: Path, meta: dict[str, Any], checksum: bool = True) -> None:
    state = folder / STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} is missing")
    if checksum and "sha256" in meta and sha256(state) != meta["sha256"]:  # older: none
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} does not match its checksum "
                              "(a write cut short, or damaged on disk)")


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The verified state of a checkpoint folder, read without unpickling code."""
    folder = Path(folder)
    _verify(folder, _read_meta(folder))
    try:
        state = torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError for a damaged archive
        raise CheckpointError(f"checkpoint {folder} cannot be read safely "
                              f"(torch.load weights_only=True): {e}".splitlines()[0]) from e
    return _decode(state)


def find_latest_checkpoint(root: str | Path,
                           on_skip: Callable[[Path, str], None] | None = None,
                           checksum: bool = True) -> Path | None:
    """The intact checkpoint folder under root with the highest (step, epoch); None if there is
    none. Damaged ones are passed over, each reported as on_skip(folder, reason).
    `checksum=False` leaves out reading the state through its checksum (seconds for a large
    model), for a quick answer to "is there one?"."""
    skip = on_skip or (lambda folder, why: None)
    found: list[tuple[tuple[int, int], Path, dict[str, Any]]] = []
    # os.walk, not rglob: a folder that goes while it is walked -- Ray Train's copy of a new
    # checkpoint, `.checkpoint_*.tmp`, renamed when whole -- is passed over, where rglob raised
    # FileNotFoundError; and such copies in progress are not checkpoints yet (left out)
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".tmp"))]
        if META_FILE not in files:
            continue
        folder = Path(top)
        try:
            meta = _read_meta(folder)
        except CheckpointError as e:
            skip(folder, str(e))
            continue
        found.append(((int(meta["step"]), int(meta["epoch"])), folder, meta))
    for _, folder, meta in sorted(found, key=lambda f: f[0], reverse=True):
        try:
            _verify(folder, meta, checksum)
        except CheckpointError as e:
            skip(folder, str(e))
            continue
        return folder
    return None
