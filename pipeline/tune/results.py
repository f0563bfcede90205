"""A sweep's trials read back from MLflow (no Ray here): each trial's run settled against
Tune's verdict, its curve, its validations by optimizer step, the batch-size schedules' curves.
Every MLflow read goes through `pipeline.tracking`."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import yaml

from pipeline.config import Config, flatten
from pipeline.redact import redact, redact_text
from pipeline.tracking import client, end_run, metric_histories, nested_runs
from pipeline.tune.analysis import BATCH, RULE, at_target, steps_before_target, steps_to_target

SCHEDULE = "train.batch_size_schedule"
_TUNE_KEYS = {"config", "checkpoint_path", "checkpoint_dir_name", "timestamp", "date",
              "hostname", "node_ip", "pid", "time_this_iter_s", "time_total_s",
              "time_since_restore", "iterations_since_restore", "timesteps_since_restore",
              "training_iteration", "done", "trial_id", "experiment_tag"}


def history(uri: str, run_id: str) -> pd.DataFrame:
    """A trial's per-epoch curve read back from MLflow: epoch, step (the optimizer step counter
    at the end of that epoch, as the run logged it: it goes on from a checkpoint in a run that
    continues one), val_accuracy, val_loss, samples (trained so far), noise_scale (in samples:
    `noise_scale_samples` where the run logged it) and global_batch_size when logged. A run
    from before the counter was logged: the running sum of its per-epoch `steps`."""
    cols = metric_histories(uri, run_id, ["step", "steps", "val_accuracy", "val_loss",
                                          "samples", "noise_scale", "noise_scale_samples",
                                          "global_batch_size"])
    h = pd.DataFrame(cols).rename_axis("epoch").reset_index().sort_values("epoch")
    if h.empty:
        return pd.DataFrame(columns=["epoch", "step", "val_accuracy", "val_loss"])
    summed = h["steps"].fillna(0).cumsum() if "steps" in h else pd.Series(0, index=h.index)
    h["step"] = (h["step"].fillna(summed) if "step" in h else summed).astype(int)
    in_samples = h.pop("noise_scale_samples") if "noise_scale_samples" in h else None
    if in_samples is not None and in_samples.notna().any():  # never a mix of the two units
        h["noise_scale"] = in_samples
    return h.drop(columns=[c for c in ("steps",) if c in h]).reset_index(drop=True)


def target_points(uri: str, run_id: str, epochs: pd.DataFrame,
                  noise_steps: bool = False) -> pd.DataFrame:
    """Every validation of a trial, by optimizer step: the epoch ends (`history`) and, with
    `train.eval_every`, the passes within epochs (`step/val_accuracy`, with `step/samples` and
    `step/noise_scale` at the same step). Steps and samples to the target come from these.
    `noise_steps`: also a row for every other step that measured the noise scale (no
    validation), so that the one at the target is the latest measured by then
    (`at_target(..., latest=True)`)."""
    keys = ("val_accuracy", "samples", "noise_scale", "noise_scale_samples")
    cols = dict(zip(keys, metric_histories(uri, run_id, [f"step/{k}" for k in keys]).values(),
                    strict=True))
    if cols["noise_scale_samples"]:  # a token-level loss: the noise scale in samples (history)
        cols["noise_scale"] = cols["noise_scale_samples"]
    del cols["noise_scale_samples"]
    keep = [k for k in ("step", "val_accuracy", "samples", "noise_scale") if k in epochs]
    inner = pd.DataFrame(cols).rename_axis("step").reset_index()
    kept = [k for k in ("val_accuracy", *(["noise_scale"] if noise_steps else [])) if k in inner]
    inner = inner.dropna(subset=kept, how="all") if kept else inner.iloc[0:0]
    return pd.concat([epochs[keep], inner]).sort_values("step", kind="stable").reset_index(drop=True)


def schedule_curves(uri: str, trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The per-step `global_batch_size` and `noise_scale` of the trials whose batch follows a
    schedule (warmup, adaptive), read back from MLflow; labelled by schedule and largest batch,
    and by trial where several trials share those (seeds, LRs: each keeps its curve)."""
    found = []
    for _, row in trials.iterrows():
        if row.get(SCHEDULE, "constant") == "constant" or not isinstance(row["mlflow_run_id"], str):
            continue
        keys = ("global_batch_size", "noise_scale")
        cols = dict(zip(keys, metric_histories(uri, row["mlflow_run_id"],
                                               [f"step/{k}" for k in keys]).values(), strict=True))
        frame = pd.DataFrame(cols).rename_axis("step").reset_index().sort_values("step")
        if len(frame):
            found.append((f"{row[SCHEDULE]} up to {int(row[BATCH])}", row["trial_id"], frame))
    return curve_labels(found)


def curve_labels(found: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """{label: curve}, a label shared by several trials followed by each one's trial id.

    >>> list(curve_labels([("adaptive up to 512", "t1", 1), ("adaptive up to 512", "t2", 2),
    ...                    ("warmup up to 512", "t3", 3)]))
    ['adaptive up to 512 (t1)', 'adaptive up to 512 (t2)', 'warmup up to 512']
    """
    shared = pd.Series([label for label, _, _ in found]).value_counts()
    return {(f"{label} ({trial})" if shared.get(label, 0) > 1 else label): curve
            for label, trial, curve in found}


class Trial(NamedTuple):
    """What a sweep's report needs of a trial beyond its row of the table."""
    metrics: dict[str, Any]  # its last result (an epoch finished in flight: its; Tune's keys out)
    overrides: dict[str, Any]  # its swept values, as Tune gave them


def settle_trials(grid: Any, cfg: Config, uri: str,
                  parent: str) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Trial]]:
    """Settle every trial's MLflow run against Tune's verdict (an errored trial's run FAILED, one
    stopped before its last epoch KILLED and tagged `early_stopped`, one that ran its epochs
    FINISHED) and build the table: one row per trial with
    its swept values, status, epochs, steps, accuracy, steps and samples to the target and noise
    scale. Returns (table, {trial id: its run}, {trial id: its `Trial`})."""
    c = client(uri)
    runs = {}
    for run in nested_runs(uri, cfg.tracking.experiment, parent):  # latest run per trial
        trial_id = run.data.tags.get("tune.trial_id")
        older = runs.get(trial_id)
        if older is not None and older.info.status == "RUNNING":  # a second run of one trial
            # (its first made once the server was back, the trial then run again before
            # run.json knew it): only the latest is the trial's, the other never ends
            end_run(uri, older.info.run_id, "KILLED")
        runs[trial_id] = run
    swept = list(cfg.tune.search_space)
    base = flatten(cfg.to_dict())
    read = _read_curves(uri, [r.info.run_id for r in runs.values()])
    # Tune's own verdict per trial (what `grid.num_errors` counts): a result's `error` is read
    # back from the trial's error files, which an experiment moved or copied in part may lack
    analysis = getattr(grid, "_experiment_analysis", None)
    errored = {t.trial_id for t in getattr(analysis, "trials", None) or []
               if getattr(t, "status", None) == "ERROR"}
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        m = dict(result.metrics or {})
        run = runs.get(trial_id)
        run_id = run.info.run_id if run else None
        conf = result.config or {}  # a restored errored trial may come back without it
        params = run.data.params if run else {}
        own = partial(_own_value, conf, params, base, swept)
        reported = int(m.get("epoch", 0))  # Tune's last result
        h, pts = read.get(run_id, (pd.DataFrame(), pd.DataFrame()))
        # What the trial ran, as MLflow shows it: a trial that Tune stopped may have finished the
        # epoch in flight before its actor went (the stop is asynchronous), so the history can
        # hold one epoch more than Tune's last result; that epoch counts as run -- and where it
        # was the trial's last, the trial ran its budget.
        final = h.iloc[-1] if len(h) and int(h["epoch"].iloc[-1]) >= reported else pd.Series(m)
        epochs = own("train.epochs")  # (None: swept, and neither Tune nor MLflow knows it)
        ran_out = epochs is not None and any(ran_its_budget(r, epochs, own("train.max_steps"))
                                             for r in (m, final))
        if result.error is not None or trial_id in errored:
            status = "ERROR"
            if run and run.info.status != "FAILED":
                end_run(uri, run_id, "FAILED")
        elif ran_out or (run and run.info.status == "FINISHED"):
            status = "TERMINATED"  # it ran its epochs (or train.max_steps) and returned
            if run and run.info.status != "FINISHED":  # its own end_run never reached MLflow,
                end_run(uri, run_id, "FINISHED")  # or the sweep stopped first and KILLED it
        else:  # Tune stopped it (ASHA) before its last epoch: its actor went, its run RUNNING
            status = "EARLY_STOPPED"
            if run and run.data.tags.get("early_stopped") != "true":
                c.set_tag(run_id, "early_stopped", "true")
            if run and run.info.status != "KILLED":  # a resumed sweep's settle: ended already,
                end_run(uri, run_id, "KILLED")  # its end time kept
        row: dict[str, Any] = {"trial_id": trial_id}
        shown = [*swept, BATCH, RULE, *([SCHEDULE] if base.get(SCHEDULE) != "constant" else [])]
        for key in dict.fromkeys(shown):  # (as trials.csv and summary.md show it: masked)
            row.update(redact({key: own(key)}))
        row.update({
            "status": status,
            "epochs": int(final.get("epoch", 0)),
            "stopped_at_epoch": reported if status == "EARLY_STOPPED" else None,
            "steps": int(final.get("step", 0)),
            "val_accuracy": float(final.get("val_accuracy", math.nan)),
            "val_loss": float(final.get("val_loss", math.nan)),
        })
        if cfg.tune.metric not in row:
            row[cfg.tune.metric] = m.get(cfg.tune.metric, math.nan)
        target = cfg.tune.target_accuracy
        row["steps_to_target"] = steps_to_target(pts, target) if target is not None else None
        # (the fewest it may have taken: one more than the validation before's step)
        row["steps_before_target"] = (steps_before_target(pts, target) if target is not None
                                      else None)
        row["samples_to_target"] = at_target(pts, target, "samples") if target is not None else None
        # The noise scale (in samples) where the trial reached the target -- its latest value
        # by then --, else at its last epoch.
        if row["steps_to_target"] is not None:
            noise = at_target(pts, target, "noise_scale", latest=True)
            row["noise_scale"] = noise if noise is not None else math.nan
        else:
            # in samples: a history's noise_scale is; Tune's last result has both units
            row["noise_scale"] = float(final.get("noise_scale_samples",
                                                 final.get("noise_scale", math.nan)))
        # The trial's fixed cost: from its start to its first optimizer step (its last attempt's)
        row["startup_s"] = float(m.get("startup_s", final.get("startup_s", math.nan)))
        row["mlflow_run_id"] = run_id
        row["error"] = error_summary(result.error) or (
            "(its error was not read back: the trial's error files are missing)"
            if status == "ERROR" else "")
        row["_metrics"] = {k: v for k, v in m.items() if k not in _TUNE_KEYS}
        if int(final.get("epoch", 0)) > reported:  # the epoch in flight's, as the row shows it:
            row["_metrics"].update({k: float(final[k]) for k in row["_metrics"]  # ranked on it
                                    if k in final.index and pd.notna(final[k])})
        # its swept values as Tune gave them (a column of the table may have turned them into
        # floats: [null, 100] is a float column)
        row["_overrides"] = {k: own(k) for k in swept}
        rows.append(row)
    _number_masked(rows, swept)
    df = pd.DataFrame(rows)
    trials = {tid: Trial(metrics, overrides) for tid, metrics, overrides
              in zip(df["trial_id"], df.pop("_metrics"), df.pop("_overrides"), strict=True)}
    for col in ("steps_to_target", "steps_before_target", "stopped_at_epoch",
                "samples_to_target"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    return df, runs, trials


def ran_its_budget(result: dict[str, Any], epochs: int, max_steps: int | None) -> bool:
    """Whether a trial's `result` is its last: it ran `epochs` epochs, or reached
    `train.max_steps`.

    >>> ran_its_budget({"epoch": 3, "step": 30}, 3, None), ran_its_budget({"epoch": 2, "step": 20}, 3, 20)
    (True, True)
    >>> ran_its_budget({"epoch": 2, "step": 20}, 3, None)
    False
    """
    return int(result.get("epoch", 0)) >= int(epochs) or (
        max_steps is not None and int(result.get("step", 0)) >= int(max_steps))


def _own_value(conf: dict[str, Any], params: dict[str, str], base: dict[str, Any],
               swept: list[str], key: str) -> Any:
    """A trial's value of a dotted key: swept (its Tune config), else as its run logged it (its
    resolved config), else the sweep's base config's -- but for a swept key, which the base
    does not know: None (a restored trial that failed before its first report and its run
    comes back without either; it read as the base's value, and the report blamed that).

    >>> _own_value({}, {}, {"train.seed": 0, "train.epochs": 3}, ["train.seed"], "train.seed")
    >>> _own_value({}, {}, {"train.seed": 0, "train.epochs": 3}, ["train.seed"], "train.epochs")
    3
    """
    if key in conf:
        return conf[key]
    if key in params:  # `Config.flat_params`: str() of each value, "None" for None
        return _param(key, params[key])
    return None if key in swept else base.get(key)


@lru_cache(maxsize=4096)
def _param(key: str, raw: str) -> Any:
    """A logged param's value, as the config types it under `key` where it can say (YAML 1.1
    reads str(1e-05) as text, and "yes" or "off" as booleans), else as YAML reads it.

    >>> _param("train.base_lr", "1e-05"), _param("tracking.run_name", "yes")
    (1e-05, 'yes')
    >>> _param("train.epochs", "3"), _param("train.max_steps", "None")
    (3, None)
    """
    if raw == "None":
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str | bool):
        try:
            from pipeline.tune.space import _dotted

            typed = _dotted(Config().with_overrides({key: raw}).to_dict(), key)
        except ValueError:  # (ConfigError too) a key the default config cannot take alone
            typed = None
        if typed is not None:
            return typed
    return value


def _read_curves(uri: str, run_ids: list[str]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """{run id: (its `history`, its `target_points`)}: about ten reads a trial, on a tracking
    server eight trials at a time (one after another, they were most of the time between the
    last trial's end and the report)."""
    def curves(run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        h = history(uri, run_id)
        return h, (target_points(uri, run_id, h, noise_steps=True) if len(h) else h)

    if not uri.startswith(("http://", "https://")):  # a local store: no round trips to overlap
        return {run_id: curves(run_id) for run_id in run_ids}
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(run_ids, pool.map(curves, run_ids), strict=True))


def _number_masked(rows: list[dict[str, Any]], swept: list[str]) -> None:
    """Masked swept values told apart: `*** #1`, `*** #2`, one number per value as given (by
    first appearance), so that trials differing only in a secret stay different points of the
    report (the same `***` in each made them look like seed repeats of one setting).

    >>> rows = [{"k.api_key": "***", "_overrides": {"k.api_key": v}} for v in ("a", "b", "a")]
    >>> _number_masked(rows, ["k.api_key"]); [r["k.api_key"] for r in rows]
    ['*** #1', '*** #2', '*** #1']
    """
    for key in swept:
        numbers: dict[str, int] = {}
        for row in rows:
            given = row["_overrides"].get(key)
            if key in row and row[key] != given:  # masked
                row[key] = f"{row[key]} #{numbers.setdefault(repr(given), len(numbers) + 1)}"


def error_summary(err: BaseException | str | None) -> str:
    """A trial's error in one line: the last line of its message (a remote traceback ends with
    the exception), at most 300 characters, secrets masked (MLflow's errors carry the store's
    URL, password and all); "" for none.

    >>> error_summary("Traceback (most recent call last):\\n  File ...\\nValueError: boom\\n")
    'ValueError: boom'
    >>> error_summary(KeyError()), error_summary(None), error_summary("")
    ('KeyError', '', '')
    """
    if err is None or isinstance(err, str) and not err.strip():
        return ""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return redact_text(lines[-1] if lines else type(err).__name__)[:300]
