"""Checkpoints: never taken as the latest when incomplete or corrupted, read without unpickling
code (torch.load weights_only=True), and a failed write (a full disk) leaves the previous one
intact with a clear error."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine import checkpoint as ck
from pipeline.engine.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    return {"model": model.state_dict(), "step": step, "epoch": step // 10,
            "sample_losses": np.linspace(0, 1, 5), "metrics": {"val_accuracy": np.float64(0.5)},
            "schedule": {"timings": [(32, 0.1)], "step_cost": None}}


def test_a_checkpoint_round_trips_with_weights_only_and_numpy_comes_back_as_numpy(tmp_path):
    save_checkpoint(tmp_path / "c", state(10))
    got = load_checkpoint(tmp_path / "c")
    assert isinstance(got["sample_losses"], np.ndarray)
    np.testing.assert_array_equal(got["sample_losses"], np.linspace(0, 1, 5))
    assert got["metrics"] == {"val_accuracy": 0.5} and got["schedule"]["timings"] == [(32, 0.1)]
    for k, v in state(10)["model"].items():
        assert torch.equal(got["model"][k], v)


def test_loading_never_unpickles_code(tmp_path):
    """A state.pt that carries a pickled callable (what an attacker's checkpoint would) is
    refused by weights_only loading, even with a matching checksum."""
    folder = tmp_path / "evil"
    save_checkpoint(folder, state(10))
    torch.save({"step": 10, "epoch": 1, "payload": print}, folder / ck.STATE_FILE)
    meta = json.loads((folder / ck.META_FILE).read_text())
    meta["sha256"] = ck.sha256(folder / ck.STATE_FILE)
    (folder / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no_meta", "no_state", "bad_meta"])
def test_a_damaged_latest_checkpoint_is_skipped_and_the_previous_good_one_is_taken(tmp_path, damage):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path / f"c{step}", state(step))
    bad = tmp_path / "c30"
    data = (bad / ck.STATE_FILE).read_bytes()
    if damage == "truncated":  # a write cut short
        (bad / ck.STATE_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # one bit changed on disk
        (bad / ck.STATE_FILE).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "no_meta":  # the write stopped before its last file
        (bad / ck.META_FILE).unlink()
    elif damage == "no_state":
        (bad / ck.STATE_FILE).unlink()
    else:
        (bad / ck.META_FILE).write_text("{not json")
    skipped = []
    latest = find_latest_checkpoint(tmp_path, on_skip=lambda p, why: skipped.append((p, why)))
    assert latest == tmp_path / "c20"
    assert load_checkpoint(latest)["step"] == 20
    if damage in ("truncated", "flipped", "no_state", "bad_meta"):  # no_meta: not a checkpoint
        assert [p for p, _ in skipped] == [bad] and skipped[0][1]
    if damage in ("truncated", "flipped"):
        with pytest.raises(CheckpointError, match="checksum"):
            load_checkpoint(bad)
    # without reading the state through its checksum (the quick "is there one?" of an
    # interrupted job): only a state that is there, under readable metadata, counts
    quick = find_latest_checkpoint(tmp_path, checksum=False)
    assert quick == (bad if damage in ("truncated", "flipped") else tmp_path / "c20")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_checkpoint_copy_in_progress_is_neither_taken_nor_a_crash_when_it_goes(
        tmp_path, monkeypatch):
    """Ray Train copies a reported checkpoint into the storage as `.checkpoint_*.tmp` and
    renames it when whole. Looking for the latest while that happens (a sweep's test polled
    for it, a resume may) raised FileNotFoundError from rglob when the folder was renamed
    under it; and a copy whose meta file had arrived could be taken. Here: the folder goes
    as it is listed (its scandir raises, as the rename makes it), and a copy of a later step
    waits beside the real one."""
    run = tmp_path / "ray_results" / "train-x"
    good = save_checkpoint(run / "checkpoint_1", {"step": 8, "epoch": 1})
    copying = save_checkpoint(run / ".checkpoint_epoch_00002.tmp", {"step": 16, "epoch": 2})
    gone = run / ".checkpoint_epoch_00003.tmp"
    gone.mkdir()
    real = os.scandir

    def renamed_meanwhile(path="."):
        if Path(path) == gone:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", renamed_meanwhile)
    assert find_latest_checkpoint(tmp_path / "ray_results") == good
    assert find_latest_checkpoint(tmp_path / "ray_results", checksum=False) == good
    assert (copying / ck.META_FILE).exists()  # (a whole checkpoint's files, not yet renamed)


def test_a_really_full_disk_is_a_checkpoint_error_and_leaves_no_temporary_file(tmp_path):
    """A disk that fills during `torch.save` (here /dev/full, which refuses every write with
    ENOSPC) surfaces from PyTorch's zip writer as a RuntimeError, not an OSError: it is still
    the one CheckpointError, and no temporary file is left."""
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / (ck.STATE_FILE + ".tmp")).symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint"):
        save_checkpoint(folder, state(20))
    assert list(folder.iterdir()) == []


def test_a_checkpoints_arrays_decode_from_a_tensor_on_another_device():
    """Hard mining keeps per-sample losses (a numpy array) in its checkpoints; loading onto a
    GPU (`map_location`) puts the array's tensor there, where `.numpy()` fails (no GPU here:
    a stand-in raising what a CUDA tensor raises)."""

    class OnTheGpu:
        def __init__(self, t):
            self.t = t

        def numpy(self):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self):
            return self.t

    decoded = ck._decode({"losses": {ck._NDARRAY: OnTheGpu(torch.arange(3.0))}})
    assert decoded["losses"].tolist() == [0.0, 1.0, 2.0]


def test_a_full_disk_leaves_the_previous_checkpoint_intact_with_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    save_checkpoint(folder, state(10))
    before = (folder / ck.STATE_FILE).read_bytes()

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointError,
                       match=re.escape(f"cannot write checkpoint {folder}: No space left on device")):
        save_checkpoint(folder, state(20))
    assert (folder / ck.STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [ck.META_FILE, ck.STATE_FILE]
    assert load_checkpoint(folder)["step"] == 10


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_a_resume_from_a_checkpoint_steps_as_the_uninterrupted_run(name, tmp_path):
    """3 steps, a checkpoint (model, optimizer, fp16 loss scaler, noise scale), then 3 more
    steps in fresh objects loaded from it: bit for bit the 6 uninterrupted steps -- each
    optimizer's state (momentum, Adam's moments and step count, LARS/LAMB's) goes through the
    checkpoint's weights-only load whole. (The job-level resume tests run SGD only.)"""
    from pipeline.engine.models import build_model
    from pipeline.engine.noise import NoiseScale
    from pipeline.engine.optim import build_optimizer
    from pipeline.engine.step import train_step

    def fresh():
        torch.manual_seed(0)
        model = build_model("mlp", input_dim=4, num_outputs=3, vocab_size=None)
        opt = build_optimizer(name, model, lr=0.05, weight_decay=0.01, momentum=0.9)
        return model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**8), NoiseScale()

    g = torch.Generator().manual_seed(1)
    batches = [[{"features": torch.randn(6, 4, generator=g),
                 "label": torch.randint(0, 3, (6,), generator=g)} for _ in range(2)]
               for _ in range(6)]

    def steps(model, opt, scaler, noise, part):
        for micro in part:
            res = train_step(model, opt, micro, loss="cross_entropy", precision="fp16",
                             scaler=scaler)
            assert not res.skipped  # (every step updates: a scaler that skipped them all would
            # leave both runs at their first weights, equal without a checkpoint's help)
            noise.update(sq_small=res.noise[0], b_small=res.noise[1], sq_big=res.noise[2],
                         b_big=res.noise[3], elements=res.count, samples=res.count)

    whole = fresh()
    initial = [p.detach().clone() for p in whole[0].parameters()]
    steps(*whole, batches)
    assert all(not torch.equal(a, b) for a, b in zip(initial, whole[0].parameters(), strict=True))
    first = fresh()
    steps(*first, batches[:3])
    model, opt, scaler, noise = first
    save_checkpoint(tmp_path / "ck", {"step": 3, "epoch": 0, "model": model.state_dict(),
                                      "optimizer": opt.state_dict(),
                                      "scaler": scaler.state_dict(),
                                      "noise": noise.state_dict()})
    s = load_checkpoint(tmp_path / "ck")
    resumed = fresh()
    resumed[0].load_state_dict(s["model"])
    resumed[1].load_state_dict(s["optimizer"])
    resumed[2].load_state_dict(s["scaler"])
    resumed[3].load_state_dict(s["noise"])
    steps(*resumed, batches[3:])
    for a, b in zip(whole[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed[2].get_scale() == whole[2].get_scale()
    assert resumed[3].state_dict() == whole[3].state_dict()
