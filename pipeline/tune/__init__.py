"""Choosing the batch size with Ray Tune: `space` checks the search space and every trial's
config (no Ray), `sweep` runs the trials (Ray), `analysis` turns their results into tables and
plots (pandas/matplotlib only, importable without Ray).

    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.tune import run_sweep

    cfg, info = resolve(load_config("jobs/configs/sweep_digits.yaml"))
    trials = run_sweep(cfg, info, Path("runs/sweep"))  # one row per trial
"""

from __future__ import annotations

from typing import Any

from pipeline.tune.analysis import (
    accuracy_vs_batch_plot,
    steps_to_target,
    steps_vs_batch_plot,
    summary_table,
)
from pipeline.tune.space import check_trials, parse_search_space, trial_concurrency

_SWEEP = ("run_sweep", "search_space", "search_algorithm", "history")

__all__ = ["accuracy_vs_batch_plot", "check_trials", "parse_search_space", "steps_to_target",
           "steps_vs_batch_plot", "summary_table", "trial_concurrency", *_SWEEP]


def __getattr__(name: str) -> Any:  # the sweep half imports Ray: only when asked for
    if name in _SWEEP:
        from pipeline.tune import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'pipeline.tune' has no attribute {name!r}")
