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


def steps_before_target(history: pd.DataFrame, target: float, metric: str = "val_accuracy"
                        ) -> int | None:
    """The fewest steps the target may have taken: one more than the step of the validation
    before the one `steps_to_target` counts to (1 when that was the first), or None when none
    reached it. The crossing lies in [this, `steps_to_target`]: with validations once an epoch,
    an interval of N / B steps at batch B.

    >>> h = pd.DataFrame({"step": [22, 44, 66], "val_accuracy": [0.80, 0.93, 0.96]})
    >>> steps_before_target(h, 0.9), steps_before_target(h, 0.7), steps_before_target(h, 0.99)
    (23, 1, None)
    """
    if history.empty or metric not in history or "step" not in history:
        return None
    h = history.dropna(subset=[metric]).sort_values("step", kind="stable")
    reached = np.flatnonzero((h[metric] >= target).to_numpy())
    if not len(reached):
        return None
    return 1 if reached[0] == 0 else int(h["step"].iloc[reached[0] - 1]) + 1


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


def per_point(df: pd.DataFrame, value: str, by: list[str], best: str = "min"
              ) -> tuple[pd.Series, list[str]]:
    """One `value` per `by` group (e.g. per batch size): the best (`best`: min or max) over
    everything else swept (any rule, LR...: each batch its best-tuned run, as Shallue et al.
    2018 compare batch sizes), where trials that differ only in a seed (`SEED_KEYS`: data
    orders, initialisations) count as one setting, at the median over its seeds -- for the
    fewest steps, a seed without a value (it missed the target, or ASHA stopped it first)
    counting as never, so a group has a value only where more than half of its seeds reached
    it (the fewest over seeds picked the luckiest order). Where no setting was trained with two
    seeds (a random search over a continuous key draws each once), there is no median to take:
    the best. Trials of one and the same config (a random search can draw it twice; training
    is deterministic) count once. Returns the values (indexed by `by`, missing groups left
    out) and the seed columns the medians were over.

    >>> d = pd.DataFrame({"train.global_batch_size": [64, 64, 64, 64],
    ...                   "batching.seed": [1, 1, 2, 3], "steps_to_target": [40, 40, 50, None]})
    >>> points, seeds = per_point(d, "steps_to_target", ["train.global_batch_size"])
    >>> points.to_dict(), seeds  # [40, 50, never]: the repeated seed 1 counts once
    ({64: 50.0}, ['batching.seed'])
    """
    keys = [c for c in df.columns if "." in c]  # the config keys a trial row carries
    d = df.dropna(subset=by)
    if keys:  # the same config twice: one run (its best reading: one ASHA may have cut short)
        d = d.sort_values(value, ascending=best == "min", na_position="last", kind="stable")
        d = d[~d[keys].astype(str).duplicated()]  # (as text: a swept dict is not hashable)
    seeds = [c for c in keys if c in SEED_KEYS and d[c].nunique(dropna=False) > 1]
    settings = [c for c in keys if c not in seeds and c not in by]
    if seeds:
        never = math.inf if best == "min" else math.nan  # (a missing accuracy is just missing)
        keyed = d.assign(_v=pd.to_numeric(d[value], errors="coerce").astype(float).fillna(never),
                         **{c: d[c].astype(str) for c in settings})
        groups = keyed.groupby([*by, *settings], dropna=False)["_v"]
        if not (groups.size() > 1).any():  # every setting drawn once: no repeats
            seeds = []
    if seeds:
        medians = groups.median()
        points = medians.groupby(level=list(range(len(by)))).agg(best)
        points = points[np.isfinite(points.to_numpy(dtype=float))]
    else:
        points = d.dropna(subset=[value]).groupby(by)[value].agg(best).astype(float)
    return points, seeds


def critical_batch(df: pd.DataFrame, steps: str = "steps_to_target") -> dict[str, Any] | None:
    """The empirical critical batch from steps-to-target against batch size.

    McCandlish et al. 2018 (eq. 2.11, fig. 5): steps and samples to a given loss trade off as
    S = S_min (1 + B_crit / B); S is linear in 1 / B, so a line through the points (1 / B, S)
    has intercept S_min and slope S_min B_crit. The line is fitted to the relative errors
    (weights 1 / S): the small batches' counts are the largest and the coarsest (validation
    once an epoch counts N / B steps at a time), and unweighted they would set the line alone.
    B_crit is the knee: there the batch needs twice the fewest steps, and doubling it from
    there saves at most a quarter of the steps (2 S_min -> 1.5 S_min) for 1.5 times the
    samples (2 E_min -> 3 E_min). One point per batch (`per_point`: its best setting of
    the rest, seeds at their median). `verdict` says what the points allow:

    - `knee`: B_crit within the batches that reached the target (`b_crit`, `s_min`);
      `b_crit_range`: the knees of the steps counted to the validation that reached the target
      and of those counted from the one before (`steps_before_target`, where the table has it:
      the crossings lie between, so the knee moves within about that range with how often the
      trials validated); `rough`: (batch, measured, fitted) where a point lies more than 25%
      off the line (the fit does not describe the curve well);
    - `beyond`: steps fall about in proportion to the batch up to the largest that reached the
      target (S_min about 0, or a knee past it): the critical batch is at least that;
      `b_crit_fit` the line's knee (inf for S_min <= 0), `last_saving` (P, L, the fraction of
      the steps that going from P to L saved);
    - `levels_off`: the line says `beyond`, but the data say steps stopped falling at the
      largest batches (`levels_at`): the last doubling saved less than a knee at the largest
      batch would (`last_saving`), or a larger batch trained more steps than the largest's
      count without reaching the target (`overrun`: that batch, the steps it trained, the
      largest's steps to the target);
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
    points, seeds = per_point(d, steps, [BATCH])
    points.index = points.index.astype(int)
    out: dict[str, Any] = {"verdict": "too_few", "points": len(points), "b_crit": None,
                           "s_min": None, "seeds": seeds,
                           "missed": [b for b in tried if b not in points.index],
                           "smallest": int(points.index.min()) if len(points) else None,
                           "largest": int(points.index.max()) if len(points) else None}
    if len(points) < 2:
        return out
    line = _fit(points)
    if line is None:  # flat, up to rounding
        return {**out, "verdict": "flat", "s_min": float(points.min())}
    b_crit, s_min = line
    if b_crit > out["largest"]:
        stop = _levels_off(points, d, steps)
        if stop:
            return {**out, **stop, "verdict": "levels_off"}
        big, prev = int(points.index[-1]), int(points.index[-2])
        return {**out, "verdict": "beyond", "b_crit": math.inf, "s_min": max(s_min, 0.0),
                "b_crit_fit": b_crit,
                "last_saving": (prev, big, 1 - float(points.iloc[-1]) / float(points.iloc[-2]))}
    fitted = s_min * (1 + b_crit / points.index.to_numpy(dtype=float))
    off = np.abs(points.to_numpy(dtype=float) - fitted) / points.to_numpy(dtype=float)
    worst = int(np.argmax(off))
    rough = ((int(points.index[worst]), float(points.iloc[worst]), float(fitted[worst]))
             if off[worst] > 0.25 else None)
    bounds = None
    if "steps_before_target" in d:
        low, _ = per_point(d, "steps_before_target", [BATCH])
        low = low[low.index.isin(points.index)]
        other = _fit(low) if len(low) == len(points) else None
        if other is not None and 0 < other[0] < math.inf:
            bounds = (min(other[0], b_crit), max(other[0], b_crit))
    # (up to rounding: a knee at the smallest batch is placed there)
    verdict = "below" if b_crit < out["smallest"] * (1 - 1e-9) else "knee"
    return {**out, "verdict": verdict, "b_crit": b_crit, "s_min": s_min, "rough": rough,
            "b_crit_range": bounds}


def _fit(points: pd.Series) -> tuple[float, float] | None:
    """(B_crit, S_min) of the line S = S_min + S_min B_crit / B through `points` (steps by
    batch), fitted to relative errors; B_crit is infinite where S_min <= 0 (perfect scaling or
    better); None where steps do not fall as the batch grows."""
    batches, s = points.index.to_numpy(dtype=float), points.to_numpy(dtype=float)
    slope, s_min = np.polyfit(1.0 / batches, s, 1, w=1.0 / np.maximum(s, 1.0))
    if not slope > 1e-9 * float(s.max() * batches.max()):
        return None
    if s_min <= 1e-9 * float(s.max()):
        return math.inf, float(s_min)
    return float(slope / s_min), float(s_min)


def _levels_off(points: pd.Series, d: pd.DataFrame, steps: str) -> dict[str, Any] | None:
    """Where a line puts the knee beyond the largest batch L that reached the target but the
    data say otherwise: the last doubling (P to L) saved less than a knee at L would -- S_L /
    S_P = (1 + L / L) / (1 + L / P), 2/3 for L = 2 P --, or a larger batch trained more steps
    than L's count without reaching the target (its steps to it are more than that: the steps
    stopped falling). None where the data agree."""
    big, prev = int(points.index[-1]), int(points.index[-2])
    s_big, s_prev = float(points.iloc[-1]), float(points.iloc[-2])
    if "steps" in d:
        over = d[(d[BATCH] > big) & d[steps].isna() & (d["steps"] >= s_big)]
        if len(over):
            first = over.sort_values([BATCH, "steps"]).iloc[0]
            return {"levels_at": big, "last_saving": None,
                    "overrun": (int(first[BATCH]), int(first["steps"]), s_big)}
    if s_big > s_prev * 2 * prev / (prev + big):
        return {"levels_at": prev, "last_saving": (prev, big, 1 - s_big / s_prev),
                "overrun": None}
    return None


def critical_batch_sentence(fit: dict[str, Any] | None, noise_scale: float | None,
                            target: float | None, failed: list[int] | tuple = (),
                            no_fixed: bool = False) -> str:
    """The sweep's answer, in a sentence a person can act on (`critical_batch`'s verdict);
    `failed`: batch sizes of which every trial failed (named, as those that missed the target);
    `no_fixed`: no trial trained a fixed batch (every one followed a batch-size schedule).

    >>> print(critical_batch_sentence({"verdict": "knee", "b_crit": 180.4, "s_min": 40.0,
    ...                                "points": 4, "missed": [], "smallest": 32,
    ...                                "largest": 256, "b_crit_range": (150.2, 180.4)},
    ...                               150.0, 0.95))
    ... # doctest: +NORMALIZE_WHITESPACE
    The critical batch here is about 180 (150 to 180 for the target crossed anywhere between
    validations; steps to val_accuracy >= 0.95 follow S = 40 x (1 + 180 / B) over 4 batch
    sizes; the gradient noise scale measured in the trials is about 150 samples): beyond it,
    more workers buy little -- doubling the batch from 180 saves at most a quarter of the steps
    for 1.5 times the samples.
    >>> print(critical_batch_sentence({"verdict": "too_few", "points": 1, "missed": [],
    ...                                "smallest": 64, "largest": 64}, None, 0.95))
    ... # doctest: +NORMALIZE_WHITESPACE
    Only one batch size was tried (64): sweep train.global_batch_size over several to place the
    critical batch.
    """
    reach = f"val_accuracy >= {target:g}" if target is not None else "a target"
    # (a noise scale of 0 or less is no estimate: tr(Sigma)'s mean came out negative)
    has_noise = noise_scale is not None and math.isfinite(noise_scale) and noise_scale > 0
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
    tried = sorted({*missed, *failed, *([fit["smallest"]] if fit and fit["points"] else [])})
    if verdict == "too_few" and len(tried) == 1:  # (not a verdict of its own: too_few's case)
        return (f"Only one batch size was tried ({tried[0]}): sweep train.global_batch_size over "
                f"several to place the critical batch{guess}.{unknown}")
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
        knee = fit.get("b_crit_fit", math.inf)
        if knee is None or not math.isfinite(knee):  # (S_min <= 0: proportional, or better)
            return (f"Steps to {reach} keep falling about in proportion to the batch up to "
                    f"{large}, the largest batch that reached it{noise}: the critical batch is "
                    f"at least about {large}, and more workers still buy fewer steps there"
                    f"{caveat}.{unknown}")
        prev, big, saved = fit["last_saving"]
        return (f"Steps to {reach} fall with the batch up to {large}, the largest batch that "
                f"reached it (from {prev} to {big} by {100 * saved:.0f}%; perfect scaling: "
                f"{100 * (1 - prev / big):.0f}%), and a fit over {n} batch sizes puts the knee "
                f"near {knee:.0f}, past them{noise}: the critical batch is at least about "
                f"{large}, and more workers still buy some fewer steps there{caveat}.{unknown}")
    if verdict == "levels_off":
        at = fit["levels_at"]
        if fit.get("overrun"):
            over, trained, needed = fit["overrun"]
            why = (f"batch {over} trained {trained} steps without reaching it, more than the "
                   f"{needed:.0f} batch {large} needed")
        else:
            prev, big, saved = fit["last_saving"]
            why = (f"from {prev} to {big} they fall by only {100 * saved:.0f}% (perfect scaling: "
                   f"{100 * (1 - prev / big):.0f}%)")
        return (f"Steps to {reach} fall with the batch up to about {at}, then little: {why}"
                f"{noise}. The critical batch is about {at}: beyond it, more workers buy few "
                f"steps.{unknown}")
    b = fit["b_crit"]
    spread = fit.get("b_crit_range")
    within = (f"{spread[0]:.0f} to {spread[1]:.0f} for the target crossed anywhere between "
              "validations; " if spread and f"{spread[0]:.0f}" != f"{spread[1]:.0f}" else "")
    rough = fit.get("rough")
    loose = (f" The line fits roughly: it puts batch {rough[0]} at {rough[2]:.0f} steps, where "
             f"{rough[1]:.0f} were measured." if rough else "")
    return (f"The critical batch here is about {b:.0f} ({within}steps to {reach} follow "
            f"S = {fit['s_min']:.0f} x (1 + {b:.0f} / B) over {n} batch sizes{noise}): beyond "
            f"it, more workers buy little -- doubling the batch from {b:.0f} saves at most a "
            f"quarter of the steps for 1.5 times the samples.{loose}{unknown}")


def _best_per_point(df: pd.DataFrame, value: str, *, best: str, rule: str) -> pd.DataFrame:
    """One value per (rule, batch), as `critical_batch` takes its points (`per_point`): the
    best over everything else swept (base LR...), seeds at their median -- each batch size gets
    its best-tuned run, as Shallue et al. do; failed trials (`status` ERROR) left out."""
    d = df[df["status"] != "ERROR"] if "status" in df else df
    d = d.dropna(subset=[value, BATCH]) if best == "max" else d.dropna(subset=[BATCH])
    if d.empty:
        return pd.DataFrame(columns=[rule, BATCH, value])
    if rule not in d:
        d = d.assign(**{rule: "-"})
    points, _ = per_point(d, value, [rule, BATCH], best=best)
    return (points.rename(value).reset_index().sort_values([rule, BATCH])
            .reset_index(drop=True))


def _figure():
    """A figure that only ever goes to a file: not pyplot's, so the caller's backend (a
    notebook's inline plots, a display) is left alone and nothing needs a screen."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=110)
    return fig, fig.subplots()


def accuracy_vs_batch_plot(df: pd.DataFrame, path: str | Path, *, metric: str = "val_accuracy",
                           rule: str = RULE) -> Path:
    """Final `metric` against global batch size (log2 x axis), one line per LR scaling rule;
    per (rule, batch) the best setting of the other swept keys of the trials that trained
    their whole budget, trials differing only in a seed at their median (`_best_per_point`).
    A (rule, batch)
    whose trials were all stopped early (ASHA: `status` EARLY_STOPPED) is an open marker of its
    own, at the best trial's last epoch, not a point of the line: its accuracy is not a final
    one. Failed trials and trials without the metric are left out."""
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
    returns, a flat tail is saturation. Seeds count at their median, as in `critical_batch`;
    trials that never reached the target (or, with seeds, in half or more of them) and failed
    ones are left out."""
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
    if isinstance(v, float):  # (a swept LR of 1e-5 or 4e-5 printed as 0.0000, alike)
        if v != 0 and abs(v) < 0.01:
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def summary_table(df: pd.DataFrame, columns: list[str] | None = None,
                  metric: str = "val_accuracy", mode: str = "max",
                  score: pd.Series | None = None) -> str:
    """A markdown table of the trials (all columns, or `columns` in that order), best first by
    the sweep's `metric` and `mode` (tune.metric, tune.mode) when the table has it: first the
    trials that trained their whole budget (`status` TERMINATED), then those stopped early,
    then failed ones, then those without the metric -- the order the sweep's best trial is
    chosen in (`report`), so the top row is the trial tagged best. `score` (aligned with
    `df`): the values ranked by, where the table's `metric` column holds another reading of
    it (the report ranks by Tune's last result: `noise_scale`'s column is its value where the
    trial reached the target, `steps`' the steps of the whole run)."""
    d = df
    if metric in d or score is not None:
        status = d["status"] if "status" in d else pd.Series("TERMINATED", d.index)
        score = pd.to_numeric(d[metric] if score is None else score, errors="coerce")
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
