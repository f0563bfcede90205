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
from typing import Any

import numpy as np
import pandas as pd

from pipeline.files import save_figure

BATCH = "train.global_batch_size"
# swept keys whose values are repeats of one setting, not settings (`critical_batch`)
SEED_KEYS = ("train.seed", "batching.seed", "data.split_seed")
RULE = "train.lr_scaling"


def steps_to_target(history: pd.DataFrame, target: float, metric: str = "val_accuracy"
                    ) -> int | None:
    """The optimizer step of the first validation whose `metric` reaches `target`, or None
    when none does. `history` has one row per validation with columns `step` (cumulative
    optimizer steps then) and `metric`: the epoch ends, plus the passes within epochs under
    `train.eval_every`. It is an upper bound at that granularity (the target may have been
    crossed between two validations)."""
    if history.empty or metric not in history or "step" not in history:
        return None
    h = history.dropna(subset=[metric]).sort_values("step", kind="stable")
    reached = h[h[metric] >= target]
    return None if reached.empty else int(reached["step"].iloc[0])


def at_target(history: pd.DataFrame, target: float, column: str,
              metric: str = "val_accuracy", latest: bool = False) -> float | None:
    """`column` (e.g. cumulative `samples`, `noise_scale`) at the first validation whose
    `metric` reaches `target` -- the step `steps_to_target` counts to --, or None. `latest`:
    where that validation has no value of `column`, its latest value logged before it (a
    running estimate, such as the noise scale: a skipped step measures none).

    >>> h = pd.DataFrame({"epoch": [1, 2, 3], "step": [10, 20, 30], "samples": [640, 1280, 1920],
    ...                   "noise_scale": [50.0, None, 70.0], "val_accuracy": [0.8, 0.95, 0.97]})
    >>> at_target(h, 0.9, "samples"), at_target(h, 0.9, "noise_scale")
    (1280.0, None)
    >>> at_target(h, 0.9, "noise_scale", latest=True)  # not the last epoch's 70
    50.0
    """
    if history.empty or metric not in history or column not in history:
        return None
    h = history.sort_values("step", kind="stable")
    scored = h.dropna(subset=[metric])
    reached = scored[scored[metric] >= target]
    if reached.empty:
        return None
    value = reached[column].iloc[0]
    if pd.isna(value) and latest:
        before = h[h["step"] <= reached["step"].iloc[0]][column].dropna()
        value = before.iloc[-1] if len(before) else None
    return None if value is None or pd.isna(value) else float(value)


def critical_batch(df: pd.DataFrame, steps: str = "steps_to_target") -> dict[str, Any] | None:
    """The empirical critical batch from steps-to-target against batch size.

    McCandlish et al. 2018 (eq. 2.11, fig. 5): steps and samples to a given loss trade off as
    S = S_min (1 + B_crit / B); S is linear in 1 / B, so a least-squares line through the
    points (1 / B, S) has intercept S_min and slope S_min B_crit. B_crit is the knee: there the
    batch needs twice the fewest steps, and doubling it from there saves at most a quarter of
    the steps (2 S_min -> 1.5 S_min) for twice the samples. One point per batch: the fewest
    steps over everything else swept (any rule, LR...: each batch its best-tuned run, as
    Shallue et al. 2018 compare batch sizes), where trials that differ only in a seed
    (`SEED_KEYS`: data orders, initialisations) count as one, at the median of their steps -- a
    seed that missed the target (or that ASHA stopped first) counts as never, so a batch has a
    point only where more than half of its seeds reached it (the fewest over seeds picked the
    luckiest order). Where no setting was trained with two seeds (a random search over a
    continuous key draws each once), there is nothing to take a median over: the fewest.
    `verdict` says what the points allow:

    - `knee`: B_crit within the batches that reached the target (`b_crit`, `s_min`);
    - `beyond`: steps fall about in proportion to the batch up to the largest that reached the
      target (S_min about 0, or a knee past it): the critical batch is at least that;
    - `below`: steps fall a little, with a knee below the smallest batch tried, or `flat`: they
      do not fall at all -- either way the critical batch is at or below the smallest batch;
    - `too_few`: fewer than two batch sizes reached the target.

    `missed` lists the batch sizes tried of which no trial reached the target (within its
    epochs: its steps to it are unknown, not infinite; with seeds: in half or more of them);
    `seeds` the seed columns the medians were over; `smallest` / `largest` bound the batches
    that did. None when no trial has a batch size.

    >>> pts = pd.DataFrame({"train.global_batch_size": [32, 64, 128, 256],
    ...                     "steps_to_target": [100 * (1 + 64 / b) for b in (32, 64, 128, 256)]})
    >>> fit = critical_batch(pts)
    >>> fit["verdict"], round(fit["b_crit"], 6), round(fit["s_min"], 6), fit["points"]
    ('knee', 64.0, 100.0, 4)
    >>> seeded = pd.DataFrame({"train.global_batch_size": [64, 64, 64, 128, 128, 128],
    ...                        "batching.seed": [1, 2, 3, 1, 2, 3],
    ...                        "steps_to_target": [40, 50, 40, 24, None, None]})
    >>> critical_batch(seeded)["missed"]  # 128 reached it in one order of three
    [128]
    """
    d = df.dropna(subset=[BATCH])
    if d.empty:
        return None
    tried = sorted({int(b) for b in d[BATCH]})
    seeds = [c for c in d.columns if c in SEED_KEYS and d[c].nunique(dropna=False) > 1]
    if seeds:  # each setting's median over its seeds (a miss: never), then the best setting
        settings = [c for c in d.columns if "." in c and c not in seeds and c != BATCH]
        keyed = d.assign(_steps=d[steps].astype(float).fillna(math.inf),
                         **{c: d[c].astype(str) for c in settings})
        groups = keyed.groupby([BATCH, *settings], dropna=False)["_steps"]
        if not (groups.size() > 1).any():  # every setting drawn once (a random search over a
            seeds = []  # continuous key): no repeats to take a median over
    if seeds:
        medians = groups.median()
        points = medians.groupby(level=0).min()
        points = points[np.isfinite(points.to_numpy(dtype=float))]
    else:
        points = d.dropna(subset=[steps]).groupby(BATCH)[steps].min()
    points.index = points.index.astype(int)
    out: dict[str, Any] = {"verdict": "too_few", "points": len(points), "b_crit": None,
                           "s_min": None, "seeds": seeds,
                           "missed": [b for b in tried if b not in points.index],
                           "smallest": int(points.index.min()) if len(points) else None,
                           "largest": int(points.index.max()) if len(points) else None}
    if len(points) < 2:
        return out
    slope, s_min = np.polyfit(1.0 / points.index.to_numpy(dtype=float),
                              points.to_numpy(dtype=float), 1)
    if not slope > 1e-9 * float(points.max() * points.index.max()):  # flat, up to rounding
        return {**out, "verdict": "flat", "s_min": float(points.min())}
    if s_min <= 1e-9 * float(points.max()) or slope / s_min > out["largest"]:
        return {**out, "verdict": "beyond", "b_crit": math.inf, "s_min": max(float(s_min), 0.0)}
    # (up to rounding: a knee at the smallest batch is placed there)
    verdict = "below" if slope / s_min < out["smallest"] * (1 - 1e-9) else "knee"
    return {**out, "verdict": verdict, "b_crit": float(slope / s_min), "s_min": float(s_min)}


def critical_batch_sentence(fit: dict[str, Any] | None, noise_scale: float | None,
                            target: float | None, failed: list[int] | tuple = (),
                            no_fixed: bool = False) -> str:
    """The sweep's answer, in a sentence a person can act on (`critical_batch`'s verdict);
    `failed`: batch sizes of which every trial failed (named, as those that missed the target);
    `no_fixed`: no trial trained a fixed batch (every one followed a batch-size schedule).

    >>> print(critical_batch_sentence({"verdict": "knee", "b_crit": 180.4, "s_min": 40.0,
    ...                                "points": 4, "missed": [], "smallest": 32,
    ...                                "largest": 256}, 150.0, 0.95))
    ... # doctest: +NORMALIZE_WHITESPACE
    The critical batch here is about 180 (steps to val_accuracy >= 0.95 follow
    S = 40 x (1 + 180 / B) over 4 batch sizes; the gradient noise scale measured in the trials
    is about 150 samples): beyond it, more workers buy little -- doubling the batch from 180
    saves at most a quarter of the steps for twice the samples.
    """
    reach = f"val_accuracy >= {target:g}" if target is not None else "a target"
    has_noise = noise_scale is not None and math.isfinite(noise_scale)
    noise = (f"; the gradient noise scale measured in the trials is about {noise_scale:.0f} "
             "samples" if has_noise else "")
    verdict = fit["verdict"] if fit is not None else "too_few"
    missed = fit["missed"] if fit is not None else []
    above = [b for b in missed if fit is not None and fit["largest"] is not None
             and b > fit["largest"]]
    seeds = fit.get("seeds") if fit is not None else None
    unknown = (f" Batch size(s) {', '.join(map(str, missed))} did not reach {reach} in the "
               f"epochs they trained{' (in half or more of their seeds)' if seeds else ''}: "
               "their steps to it are not measured." if missed else "")
    if failed:
        unknown += f" Every trial at batch size(s) {', '.join(map(str, failed))} failed."
    if target is None:
        guess = (f" The gradient noise scale measured in the trials is about {noise_scale:.0f} "
                 "samples, a first estimate of it." if has_noise else "")
        return ("No tune.target_accuracy is set, so steps to a target are not measured and "
                f"the critical batch is not placed.{guess}{unknown}")
    guess = (f"; the gradient noise scale measured in the trials, about {noise_scale:.0f} "
             "samples, is a first estimate of it" if has_noise else "")
    if no_fixed:
        return ("No trial trained a fixed batch size (every one followed a "
                f"train.batch_size_schedule), so steps to {reach} are not compared across batch "
                f"sizes and the critical batch is not placed{guess}.{unknown}")
    if verdict == "too_few":
        return f"Too few batch sizes reached {reach} to place the critical batch{guess}.{unknown}"
    n, small, large = fit["points"], fit["smallest"], fit["largest"]
    if verdict in ("flat", "below"):
        how = ("do not fall" if verdict == "flat" else
               f"fall little (a fit puts the knee near {fit['b_crit']:.0f}, below them)")
        return (f"Steps to {reach} {how} as the batch grows from {small} to {large} over {n} "
                f"batch sizes{noise}: the critical batch is at or below {small}, and larger "
                f"batches buy few or no fewer steps for more samples.{unknown}")
    if verdict == "beyond":
        caveat = (" -- as far as measured: larger batches did not reach the target"
                  if above else "")
        return (f"Steps to {reach} keep falling about in proportion to the batch up to {large}, "
                f"the largest batch that reached it{noise}: the critical batch is at least "
                f"about {large}, and more workers still buy fewer steps there{caveat}.{unknown}")
    b = fit["b_crit"]
    return (f"The critical batch here is about {b:.0f} (steps to {reach} follow "
            f"S = {fit['s_min']:.0f} x (1 + {b:.0f} / B) over {n} batch sizes{noise}): beyond "
            f"it, more workers buy little -- doubling the batch from {b:.0f} saves at most a "
            f"quarter of the steps for twice the samples.{unknown}")


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
    the best trial per (rule, batch) of those that trained their whole budget. A (rule, batch)
    whose trials were all stopped early (ASHA: `status` EARLY_STOPPED) is an open marker of its
    own, at the best trial's last epoch, not a point of the line: its accuracy is not a final
    one. Trials without the metric (errors) are left out."""
    fig, ax = _figure()
    stopped_early = (df["status"] == "EARLY_STOPPED") if "status" in df else pd.Series(False, df.index)
    points = _best_per_point(df[~stopped_early], metric, best="max", rule=rule)
    stopped = _best_per_point(df[stopped_early], metric, best="max", rule=rule)
    if not stopped.empty:  # only where no trial of the (rule, batch) ran its budget
        done = (set(zip(points[rule].astype(str), points[BATCH], strict=True)) if len(points)
                else set())
        stopped = stopped[[(str(r), b) not in done
                           for r, b in zip(stopped[rule], stopped[BATCH], strict=True)]]
    for name, g in points.groupby(rule, sort=True):
        ax.plot(g[BATCH], g[metric], marker="o", label=f"lr_scaling={name}")
    if not stopped.empty:
        ax.plot(stopped[BATCH], stopped[metric], linestyle="none", marker="o",
                markerfacecolor="none", color="grey",
                label="stopped early (ASHA): its last epoch")
    points = pd.concat([points, stopped]) if len(stopped) else points
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


def without_epoch_ends(batches: pd.Series) -> pd.Series:
    """The scheduled batch per step without the one-step dips of each epoch's last, partial
    step (it takes the units that are left), so that a plot shows the schedule itself.

    >>> without_epoch_ends(pd.Series([32, 64, 64, 40, 64, 96])).tolist()
    [32, 64, 64, 64, 96]
    """
    dip = (batches < batches.shift(1)) & (batches < batches.shift(-1))
    return batches[~dip]


def batch_schedule_plot(curves: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Each scheduled trial's global batch per optimizer step (solid, left axis; each epoch's
    last, partial step left out) and the gradient noise scale it measured (dotted, right log
    axis, in loss elements: samples for a per-sample loss), one colour per trial. `curves`:
    label -> frame with columns `step`, `global_batch_size` and optionally `noise_scale`."""
    fig, ax = _figure()
    right = ax.twinx()
    for label, c in curves.items():
        batch = without_epoch_ends(c["global_batch_size"].reset_index(drop=True))
        steps = c["step"].reset_index(drop=True)[batch.index]
        line, = ax.step(steps, batch, where="post", label=label)
        if "noise_scale" in c:
            right.plot(c["step"], c["noise_scale"], linestyle=":", color=line.get_color())
            right.set_yscale("log")
    if not curves:
        ax.text(0.5, 0.5, "no scheduled trial", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_yscale("log", base=2)
        ax.get_yaxis().set_major_formatter("{x:.0f}")
        ax.legend(fontsize="small")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global batch size (solid)")
    right.set_ylabel("gradient noise scale (dotted)")
    ax.set_title("Batch-size schedules")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)


def _cell(v: object) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):  # NA: Int64 columns
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def summary_table(df: pd.DataFrame, columns: list[str] | None = None,
                  metric: str = "val_accuracy", mode: str = "max") -> str:
    """A markdown table of the trials (all columns, or `columns` in that order), best first by
    the sweep's `metric` and `mode` (tune.metric, tune.mode) when the table has it: first the
    trials that trained their whole budget (`status` TERMINATED), then those stopped early,
    then failed ones, then those without the metric -- the order the sweep's best trial is
    chosen in (`report`), so the top row is the trial tagged best."""
    d = df
    if metric in d:
        status = d["status"] if "status" in d else pd.Series("TERMINATED", d.index)
        score = pd.to_numeric(d[metric], errors="coerce")
        group = np.where(score.isna(), 3, np.where(status == "TERMINATED", 0,
                                                   np.where(status == "ERROR", 2, 1)))
        d = (d.assign(_group=group, _score=score)
             .sort_values(["_group", "_score"], ascending=[True, mode == "min"],
                          na_position="last", kind="stable")
             .drop(columns=["_group", "_score"]))
    cols = [c for c in (columns or list(d.columns)) if c in d]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in d[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
