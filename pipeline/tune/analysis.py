"""What a batch-size sweep says: tables and plots over the per-trial results (no Ray).

The questions are Goyal et al. 2017's (does a larger batch, with the LR scaled linearly and a
warmup, reach the small batch's accuracy in the same number of epochs?) and Shallue et al. 2018's
(how many optimizer steps does each batch size need to reach a target: perfect scaling -- steps
halve when the batch doubles --, then diminishing returns, then saturation).

Every function takes a plain `pandas.DataFrame` -- one row per trial for the tables and plots,
one row per epoch for a trial's history -- so the same code serves `run_sweep`, notebooks and
tests on hand-made frames.

    >>> import pandas as pd
    >>> h = pd.DataFrame({"epoch": [1, 2, 3], "step": [22, 44, 66],
    ...                   "val_accuracy": [0.80, 0.93, 0.96]})
    >>> steps_to_target(h, 0.9)
    44
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

BATCH = "train.global_batch_size"
RULE = "train.lr_scaling"


def steps_to_target(history: pd.DataFrame, target: float, metric: str = "val_accuracy"
                    ) -> int | None:
    """The optimizer step at the end of the first epoch whose `metric` reaches `target`, or None
    when no epoch does. `history` has one row per epoch with columns `step` (cumulative optimizer
    steps at the end of that epoch) and `metric`. Evaluation happens once per epoch, so this is
    an upper bound at epoch granularity (the target may have been crossed mid-epoch)."""
    if history.empty or metric not in history or "step" not in history:
        return None
    h = history.sort_values("step")
    reached = h[h[metric] >= target]
    return None if reached.empty else int(reached["step"].iloc[0])


def _best_per_point(df: pd.DataFrame, value: str, *, best: str, rule: str) -> pd.DataFrame:
    """One value per (rule, batch): the best over everything else swept (base LR, seeds...),
    as Shallue et al. do -- each batch size gets its best-tuned run."""
    d = df.dropna(subset=[value, BATCH])
    if d.empty:
        return d
    if rule not in d:
        d = d.assign(**{rule: "-"})
    agg = "max" if best == "max" else "min"
    return (d.groupby([rule, BATCH], as_index=False)[value].agg(agg)
            .sort_values([rule, BATCH]))


def _figure():
    """A figure that only ever goes to a file: not pyplot's, so the caller's backend (a
    notebook's inline plots, a display) is left alone and nothing needs a screen."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=110)
    return fig, fig.subplots()


def accuracy_vs_batch_plot(df: pd.DataFrame, path: str | Path, *, metric: str = "val_accuracy",
                           rule: str = RULE) -> Path:
    """Final `metric` against global batch size (log2 x axis), one line per LR scaling rule;
    the best trial per (rule, batch). Trials without the metric (errors) are left out."""
    fig, ax = _figure()
    points = _best_per_point(df, metric, best="max", rule=rule)
    for name, g in points.groupby(rule, sort=True):
        ax.plot(g[BATCH], g[metric], marker="o", label=f"lr_scaling={name}")
    if points.empty:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(points[BATCH].unique()))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.legend()
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("Final accuracy vs batch size (same epoch budget)")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def steps_vs_batch_plot(df: pd.DataFrame, path: str | Path, *, target: float | None = None,
                        steps: str = "steps_to_target", rule: str = RULE) -> Path:
    """Steps to reach the target against global batch size on log-log axes, one line per rule
    (the fewest steps per (rule, batch)), with the perfect-scaling line (slope -1) through each
    rule's smallest batch: points on it scale perfectly, points above it show diminishing
    returns, a flat tail is saturation. Trials that never reached the target are left out."""
    fig, ax = _figure()
    points = _best_per_point(df, steps, best="min", rule=rule)
    for i, (name, g) in enumerate(points.groupby(rule, sort=True)):
        line, = ax.plot(g[BATCH], g[steps], marker="o", label=f"lr_scaling={name}")
        b0, s0 = float(g[BATCH].iloc[0]), float(g[steps].iloc[0])
        xs = np.array(sorted(g[BATCH].unique()), dtype=float)
        ax.plot(xs, s0 * b0 / xs, linestyle=":", color=line.get_color(),
                label="perfect scaling" if i == 0 else None)
    if points.empty:
        ax.text(0.5, 0.5, "no trial reached the target", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(points[BATCH].unique()))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.legend()
    ax.set_xlabel("global batch size")
    ax.set_ylabel("optimizer steps to target")
    shown = "" if target is None else f" (val_accuracy >= {target:g})"
    ax.set_title(f"Steps to target vs batch size{shown}")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p)
    return p


def _cell(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def summary_table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A markdown table of the trials (all columns, or `columns` in that order), best first
    when `val_accuracy` is present."""
    d = df
    if "val_accuracy" in d:
        d = d.sort_values("val_accuracy", ascending=False, na_position="last", kind="stable")
    cols = [c for c in (columns or list(d.columns)) if c in d]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in d[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
