"""Tune's scheduler and search algorithm as sweeps use them, with what `--resume` must keep:
Tune saves the experiment with its search algorithm's state but not its scheduler's, and
restores the search algorithm as it was, settings included.

`FinalEpochASHA`: Tune's asynchronous successive halving (Li et al. 2020, "A System for
Massively Parallel Hyperparameter Tuning") over epochs, with two changes.

- It never stops a trial at its last result -- its last epoch (its own, when `train.epochs` is
  swept) or the one that reaches `train.max_steps` (the base config's or its own): the trial
  ends there by itself, while a stop would kill it as it logs its model and marks its MLflow
  run FINISHED.
- Its state survives `--resume`. A resumed sweep rebuilt ASHA from its settings, with empty
  rungs, so every trial's first result at a rung went on (a cutoff needs values to be taken
  from) and the resumed sweep stopped fewer trials than the one it resumed. The rungs -- the
  value each trial had at each milestone -- and the trials stopped are written beside Tune's
  experiment state (`asha_rungs.json`, a small file, whole after every result) and read back
  when the resumed sweep adds its trials, before any of them reports again.

`Generator`: Tune's grid/random generator, whose limit of trials at a time is the one the sweep
computes for today's cluster (`Generator.limit_now`) also after a resume: restored, the
generator took the first run's limit back (on a smaller cluster more trials started than fit,
and waited on workers).

The classes live in a module of their own so that Tune's pickle of the experiment refers to
them by name (a class made inside a function is pickled by value, with the code of the day it
was made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline.files import write_json
from pipeline.tune.results import ran_its_budget

GRACE_PERIOD = 1  # epochs every trial runs before ASHA may stop it
REDUCTION_FACTOR = 3  # rungs at 1, 3, 9, ... epochs; a third of the trials go on at each
RUNGS_FILE = "asha_rungs.json"  # in the sweep's Tune experiment folder


class FinalEpochASHA(ASHAScheduler):
    """ASHA over `epoch` results (see the module's docstring); `max_steps`: the base config's
    `train.max_steps`, a trial's own taking its place."""

    def __init__(self, max_epochs: int, max_steps: int | None = None) -> None:
        super().__init__(time_attr="epoch", max_t=max_epochs,
                         grace_period=min(GRACE_PERIOD, max_epochs),
                         reduction_factor=REDUCTION_FACTOR)
        self.max_steps = max_steps
        self._rungs_file: Path | None = None  # found from the first trial added
        self._stopped: set[str] = set()

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._rungs_file is None and (folder := _experiment_folder(trial)) is not None:
            self._rungs_file = folder / RUNGS_FILE
            self._read()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        own = trial.config or {}
        epochs = min(int(own.get("train.epochs", self._max_t)), self._max_t)
        if ran_its_budget(result, epochs, own.get("train.max_steps", self.max_steps)):
            return TrialScheduler.CONTINUE
        if trial.trial_id in self._stopped:  # stopped before an interruption that Tune's
            return TrialScheduler.STOP  # saved state had not seen: stopped again
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._stopped.add(trial.trial_id)
        self._write()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._write()

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone, {trial id: value at it}) of its one bracket, highest milestone first."""
        (bracket,) = self._brackets
        return [(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]

    def _write(self) -> None:
        if self._rungs_file is not None:
            write_json(self._rungs_file, {"rungs": self.rungs(), "stopped": sorted(self._stopped)},
                       nan_as_null=False)  # (a NaN ASHA keeps and skips; null would break it)

    def _read(self) -> None:
        if self._rungs_file is None or not self._rungs_file.exists():
            return
        state = json.loads(self._rungs_file.read_text())
        kept = {float(milestone): recorded for milestone, recorded in state["rungs"]}
        (bracket,) = self._brackets
        for milestone, recorded in bracket._rungs:
            recorded.update(kept.get(float(milestone), {}))
        self._stopped |= set(state["stopped"])


class Generator(BasicVariantGenerator):
    """Tune's grid/random generator, at most `limit_now` trials at a time (0: no limit) once
    restored too. `max_concurrent`: that limit for a fresh sweep."""

    limit_now: ClassVar[int | None] = None  # set by the sweep before Tune restores it

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if Generator.limit_now is not None:
            self.max_concurrent = Generator.limit_now


def _experiment_folder(trial: Any) -> Path | None:
    """The sweep's Tune experiment folder (it moves with the experiment), where Tune keeps its
    state; None for a trial without storage (a test's)."""
    path = getattr(getattr(trial, "storage", None), "experiment_fs_path", None)
    return Path(path) if path else None
