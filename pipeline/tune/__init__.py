"""Choosing the batch size with Ray Tune: `space` checks the search space and every trial's
config (no Ray), `sweep` runs the trials (Ray), `results` reads them back from MLflow and
settles each trial's run, `report` writes the sweep's answer, and `analysis` holds the tables,
fits and plots (pandas/matplotlib only).

    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.tune import run_sweep

    cfg, info = resolve(load_config("jobs/configs/sweep_digits.yaml"))
    trials = run_sweep(cfg, info, Path("runs/sweep"))  # one row per trial
"""

from __future__ import annotations

import time

# When this package was loaded. In a sweep trial's Tune actor that is as the actor starts
# (unpickling the trainable imports it, before Ray Tune's function runs), so the first trial an
# actor runs counts the pipeline's imports in its fixed cost (`sweep._run_trial`, `startup_s`).
LOADED_AT = time.time()

from typing import Any  # noqa: E402

from pipeline.tune.analysis import (  # noqa: E402
    accuracy_vs_batch_plot,
    steps_to_target,
    steps_vs_batch_plot,
    summary_table,
)
from pipeline.tune.space import check_trials, parse_search_space, trial_concurrency  # noqa: E402

# Imported when asked for: `sweep` imports Ray, `results` MLflow (bad input is refused first).
_LAZY = {"run_sweep": "sweep", "search_space": "sweep", "search_algorithm": "sweep",
         "SweepInterrupted": "sweep", "history": "results"}

__all__ = ["accuracy_vs_batch_plot", "check_trials", "parse_search_space", "steps_to_target",
           "steps_vs_batch_plot", "summary_table", "trial_concurrency", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.tune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.tune' has no attribute {name!r}")
