"""Choosing the batch size with Ray Tune: `sweep` runs the trials (Ray), `analysis` turns their
results into tables and plots (pandas/matplotlib only, importable without Ray).

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

_SWEEP = ("run_sweep", "search_space", "search_algorithm", "parse_search_space", "check_trials",
          "trial_concurrency", "history")

__all__ = ["accuracy_vs_batch_plot", "steps_to_target", "steps_vs_batch_plot", "summary_table",
           *_SWEEP]


def __getattr__(name: str) -> Any:  # the sweep half imports Ray: only when asked for
    if name in _SWEEP:
        from pipeline.tune import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'pipeline.tune' has no attribute {name!r}")
