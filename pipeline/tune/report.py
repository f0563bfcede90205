"""A sweep's report: the best trial, the critical batch next to the measured noise scale, the
table, plots and result.json, written to the output folder and to the MLflow parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import console
from pipeline.config import Config, ConfigError
from pipeline.data.datasets import DatasetInfo, as_given
from pipeline.files import write_json, write_text
from pipeline.redact import redact
from pipeline.tracking import client, log_summary
from pipeline.tune.analysis import (
    BATCH,
    accuracy_vs_batch_plot,
    batch_schedule_plot,
    critical_batch,
    critical_batch_sentence,
    steps_vs_batch_plot,
    summary_table,
)
from pipeline.tune.results import SCHEDULE, Trial, schedule_curves
from pipeline.tune.space import trial_config

# What a sweep's report writes into its --out (removed when another sweep starts there).
REPORT_FILES = ("result.json", "trials.csv", "summary.md", "accuracy_vs_batch.png",
                "steps_vs_batch.png", "batch_schedule.png")


def clear_report(out_dir: Path) -> None:
    """Remove an earlier sweep's report from `out_dir` (its other files stay).

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> for f in ("result.json", "batch_schedule.png", "notes.txt"):
    ...     _ = (out / f).write_text("")
    >>> clear_report(out); sorted(p.name for p in out.iterdir())
    ['notes.txt']
    """
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def write_report(df: pd.DataFrame, runs: dict[str, Any], trials: dict[str, Trial],
                 cfg: Config, uri: str, parent: str, out_dir: Path, name: str,
                 experiment_path: str, info: DatasetInfo | None = None) -> pd.DataFrame:
    """Tag the best trial, place the critical batch, write and log the artifacts and
    result.json; return the table. RuntimeError when every trial failed. `info`: the sweep's
    dataset, for the best trial's config as it trained (`trial_config`)."""
    c = client(uri)
    metric = cfg.tune.metric
    # The best trial: among those that ran their whole budget (else among the stopped ones),
    # on the value Tune ranked them by (its last result: a column of the table of the same
    # name may be another reading, e.g. noise_scale where the trial reached the target).
    scored = df.assign(_score=pd.to_numeric(
        df["trial_id"].map(lambda t: trials[t].metrics.get(metric)), errors="coerce"))
    ok = scored[scored["status"] == "TERMINATED"].dropna(subset=["_score"])
    if ok.empty:
        ok = scored[scored["status"] != "ERROR"].dropna(subset=["_score"])
    best = None
    if len(ok):
        best = ok.loc[ok["_score"].idxmax() if cfg.tune.mode == "max" else ok["_score"].idxmin()]
    for tid, run in runs.items():
        is_best = best is not None and tid == best["trial_id"]
        if is_best:
            c.set_tag(run.info.run_id, "best_trial", "true")
        elif run.data.tags.get("best_trial"):
            c.delete_tag(run.info.run_id, "best_trial")

    # The answer: the knee of steps-to-target over the fixed-batch trials that did not fail,
    # next to the noise scale they measured where they reached the target (else, a first
    # estimate, at their last epochs); batch-size schedules are rows of the table, not points.
    fixed = df[df[SCHEDULE] == "constant"] if SCHEDULE in df else df
    ran = fixed[fixed["status"] != "ERROR"]
    failed = sorted({int(b) for b in fixed.loc[fixed["status"] == "ERROR", BATCH].dropna()}
                    - {int(b) for b in ran[BATCH].dropna()})
    target = cfg.tune.target_accuracy
    no_fixed = fixed.empty  # every trial followed a schedule: their noise scale is what there is
    fit = critical_batch(ran) if target is not None and not no_fixed else None
    measured = df[df["status"] != "ERROR"] if no_fixed else ran
    # (a value of 0 or less is no estimate: tr(Sigma)'s running mean came out negative)
    estimates = measured.assign(noise_scale=measured["noise_scale"].where(
        pd.to_numeric(measured["noise_scale"], errors="coerce") > 0))
    reached = estimates.dropna(subset=["steps_to_target"])["noise_scale"].dropna()
    noise = reached if len(reached) else estimates["noise_scale"].dropna()
    noise_scale = float(noise.median()) if len(noise) else None
    sentence = critical_batch_sentence(fit, noise_scale, target, failed=failed,
                                       no_fixed=no_fixed)
    verdict = (fit["verdict"] if fit is not None else "no_target" if target is None
               else "no_fixed_batch" if no_fixed else "too_few")

    write_text(out_dir / "trials.csv", df.to_csv(index=False))
    table = summary_table(df.drop(columns=["error"]), metric=metric, mode=cfg.tune.mode,
                          score=scored["_score"])
    write_text(out_dir / "summary.md", f"{table}\n{sentence}\n")
    accuracy_vs_batch_plot(fixed, out_dir / "accuracy_vs_batch.png")
    steps_vs_batch_plot(fixed, out_dir / "steps_vs_batch.png", target=cfg.tune.target_accuracy)
    artifacts = ["trials.csv", "summary.md", "accuracy_vs_batch.png", "steps_vs_batch.png"]
    if SCHEDULE in df and (df[SCHEDULE] != "constant").any():
        batch_schedule_plot(schedule_curves(uri, df), out_dir / "batch_schedule.png")
        artifacts.append("batch_schedule.png")
    for artifact in artifacts:
        c.log_artifact(parent, str(out_dir / artifact))
    counts = df["status"].value_counts().to_dict()
    parent_metrics = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
    if best is not None:
        parent_metrics[f"best_{metric}"] = float(best["_score"])
    if fit is not None and fit["verdict"] == "knee":  # placed among the batches tried
        parent_metrics["critical_batch"] = fit["b_crit"]
    if noise_scale is not None:
        parent_metrics["noise_scale"] = noise_scale
    log_summary(uri, parent, parent_metrics, {
        "mlflow.note.content": sentence,  # the run's description in the UI
        "critical_batch": sentence})

    if best is None:
        if (df["status"] != "ERROR").any():  # they ran, and none has a number to rank by
            raise RuntimeError(f"no trial of sweep {name} ended with a finite {metric} to rank "
                               f"by (tune.metric); see {out_dir / 'trials.csv'}")
        raise RuntimeError(f"every trial of sweep {name} failed; see {out_dir / 'trials.csv'}")
    overrides = {k: _plain(v) for k, v in trials[best["trial_id"]].overrides.items()}
    best_cfg = best_config(cfg, info, overrides)
    write_json(out_dir / "result.json", redact({  # (masked: shared, logged to the parent run)
        "status": "FINISHED", "sweep": name, "parent_run_id": parent, "tracking_uri": uri,
        "best": {"trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"],
                 "overrides": overrides, "metrics": trials[best["trial_id"]].metrics,
                 "config": best_cfg.to_dict()},
        "trials": {k: int(v) for k, v in counts.items()},
        "critical_batch": {**(fit or {}), "verdict": verdict, "noise_scale": noise_scale,
                           "sentence": sentence,
                           # strict JSON has no Infinity: a knee beyond the batches is null
                           **({"b_crit": None} if fit and fit["verdict"] == "beyond" else {})},
        "trials_csv": str(out_dir / "trials.csv"), "experiment_path": experiment_path,
    }))
    df.attrs["score"] = scored["_score"]  # what the best was chosen by (`print_sweep`)
    return df


def best_config(cfg: Config, info: DatasetInfo | None, overrides: dict[str, Any]) -> Config:
    """The best trial's config as it trained (`trial_config`: filled for its data). A trial
    that swept `data.*` has its dataset read again for that; where it can no longer be read
    (a store's blip, a file gone) after every trial has run, the config as given with the
    trial's overrides, and a `warning:` line -- the sweep's report is not lost for it."""
    if info is None:
        return cfg.with_overrides(overrides)
    try:
        return trial_config(cfg, info, overrides)[0]
    except (OSError, ConfigError) as err:  # (DataUnreachable is an OSError)
        console.say(f"warning: the best trial's config could not be filled for its data "
                    f"again ({console.error_line(err)}): result.json gives it as configured")
        return as_given(cfg, info).with_overrides(overrides)


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v  # numpy scalars -> JSON types
