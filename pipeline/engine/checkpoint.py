"""Checkpoints: one folder per save, written to a temporary name and renamed (pure PyTorch).

A checkpoint folder holds `state.pt` (model, optimizer, scaler, step, epoch, data position) and
`meta.json` (step, epoch: readable without torch). `find_latest_checkpoint` scans a tree for
the folder with the highest step, so `--resume` works after a crash of the driver too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write state (with integer `step` and `epoch`) into folder atomically; return folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    meta_tmp = folder / (META_FILE + ".tmp")
    meta_tmp.write_text(json.dumps({"step": int(state["step"]), "epoch": int(state["epoch"])}))
    os.replace(meta_tmp, folder / META_FILE)
    return folder


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=False)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint folder under root with the highest (step, epoch); None if there is none."""
    best: tuple[tuple[int, int], Path] | None = None
    for meta in Path(root).rglob(META_FILE):
        if not (meta.parent / STATE_FILE).exists():
            continue
        m = json.loads(meta.read_text())
        key = (int(m["step"]), int(m["epoch"]))
        if best is None or key > best[0]:
            best = (key, meta.parent)
    return best[1] if best else None
