"""A one-worker sweep trial trained in its own Tune actor, without a worker group of its own.

A trial run through a TorchTrainer pays Ray Train's start-up before its first step: a Train
controller actor, a worker group (new processes that import torch and the pipeline), a process
group. For one worker none of it buys anything: the trial's Tune actor already is a process with
the pipeline imported and the trial's resources reserved. So such a trial calls the same worker
function (`pipeline.worker.train_func`) in its own actor, with a `TrialSession` in place of Ray
Train's: rank 0 of 1, the device its reservation holds, the model as it is (no DDP), each
epoch's checkpoint kept under the trial's run storage (the 2 newest, as a TorchTrainer job keeps
them) and each epoch's metrics reported to Tune. What it trains is what a one-worker job trains:
the same plan, batches and steps (a test compares the weights).

`scaling.max_failures` keeps its meaning for a trial in its actor: Tune runs a failed trial
again (its actor killed, its node lost, an exception) up to that many times, and the trial
continues its MLflow run from its newest checkpoint, as a worker group restarted by Ray Train
would (a worker-group trial has both: Ray Train's restarts of its workers, then Tune's of the
trial, from its checkpoint, should its actor go); a deterministic failure (bad input,
non-finite training) is not trained again (`pipeline/tune/sweep.py`, `_run_trial`). Chosen
by `tune.trial_runner: auto` for a trial of one worker that uses the sweep's dataset;
`worker_group` runs every trial through a TorchTrainer.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from ray import tune

from pipeline import console
from pipeline.config import Config
from pipeline.tune.space import changes_data
from pipeline.worker import FATAL, Session, train_func

KEEP_CHECKPOINTS = 2  # as a TorchTrainer job keeps them (launch.fit_torch_trainer)



def runs_in_actor(cfg: Config, overrides: dict[str, Any]) -> bool:
    """Whether a trial (its config, with `overrides` applied) trains in its own Tune actor: one
    worker, `tune.trial_runner: auto`, and the sweep's own dataset (a trial that changes `data.*`
    ingests its own through Ray Data, whose tasks need CPUs the trial actors would hold)."""
    return (cfg.tune.trial_runner == "auto" and cfg.scaling.num_workers == 1
            and not changes_data(overrides))


def every_trial_in_actor(cfg: Config) -> bool:
    """Whether every trial of the sweep trains in its own actor (nothing swept could change
    that). Then Tune may hand a finished trial's actor to the next trial (`reuse_actors`),
    which finds the pipeline imported: its fixed cost drops to about 0.1 s here (a trial Tune
    stopped leaves its actor at its next report, which Tune's stop makes exit the trial's
    thread)."""
    return (runs_in_actor(cfg, {})
            and not changes_data(cfg.tune.search_space)
            and not any(k.startswith(("scaling.", "tune.")) for k in cfg.tune.search_space))


def trial_resources(cfg: Config, overrides: dict[str, Any]) -> dict[str, float]:
    """What Tune reserves for a trial's actor: the worker's CPUs (and GPU) when it trains there,
    else none (the trial only waits on its TorchTrainer, which asks Ray for its workers)."""
    memory = 256 * 2**20  # Tune needs a non-empty request; what the waiting process holds
    if not runs_in_actor(cfg, overrides):
        return {"CPU": 0, "memory": memory}
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}


class TrialSession(Session):
    """The trial's actor as the only rank."""

    def __init__(self, cfg: Config, folder: Path) -> None:
        self.rank, self.world = 0, 1
        # Tune's reservation sets CUDA_VISIBLE_DEVICES to the trial's GPU
        self.device = torch.device("cuda", 0) if cfg.scaling.use_gpu else torch.device("cpu")
        # the thread count a Ray Train worker with these CPUs gets (Ray sets OMP_NUM_THREADS)
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
        self.folder = folder
        self.metrics: dict[str, Any] = {}
        self.checkpoint: Path | None = None

    def prepare_model(self, model: torch.nn.Module, ddp_kwargs: dict[str, Any] | None
                      ) -> torch.nn.Module:
        return model.to(self.device)

    def restart_checkpoint(self) -> str | None:
        return None  # Tune runs a failed trial again; `_run_trial` passes its checkpoint

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if FATAL in metrics:  # not an epoch: the trial raises the failure next (run_training)
            return
        if checkpoint_dir is not None:
            self.checkpoint = keep_checkpoint(Path(checkpoint_dir), self.folder,
                                              int(metrics["epoch"]))
        self.metrics = dict(metrics)
        tune.report(dict(metrics))


def epochs_to_tune() -> Any:
    """For a trial that runs a TorchTrainer: Ray Train's `TuneReportCallback`, passing each
    epoch's report to Tune but not a deterministic failure's (`fatal_error`, which has none of
    the metrics Tune ranks by: Tune would fail the whole sweep on it; the trial raises it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            if FATAL not in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()


def keep_checkpoint(source: Path, folder: Path, epoch: int, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Copy a checkpoint folder to `folder/checkpoint_epoch_NNNNN` (copied under a temporary
    name, then renamed: never half-written) and delete all but the `keep` newest epochs."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"checkpoint_epoch_{epoch:05d}"
    tmp = folder / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if dest.exists():  # the same epoch again, after a restart
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    for old in sorted(folder.glob("checkpoint_epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def fit_in_actor(cfg: Config, loop_config: dict[str, Any], name: str,
                 storage: Path) -> tuple[dict[str, Any], Path | None]:
    """`launch.Fit` for a one-worker trial: the worker function in this process (a failure is
    Tune's to retry, see the module's docstring)."""
    session = TrialSession(cfg, storage / name)
    console.say_pipeline_warnings()
    train_func(loop_config, session)
    return session.metrics, session.checkpoint
