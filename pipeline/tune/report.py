"""A sweep's report: the best trial, the critical batch next to the measured noise scale, the
table, plots and result.json, written to the output folder and to the MLflow parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.files import write_json, write_text
from pipeline.tracking import client, log_summary
from pipeline.tune.analysis import (
    accuracy_vs_batch_plot,
    batch_schedule_plot,
    critical_batch,
    critical_batch_sentence,
    steps_vs_batch_plot,
    summary_table,
)
from pipeline.tune.results import SCHEDULE, schedule_curves


def write_report(df: pd.DataFrame, runs: dict[str, Any], metrics_by_trial: dict[str, dict],
                 cfg: Config, uri: str, parent: str, out_dir: Path, name: str,
                 experiment_path: str) -> pd.DataFrame:
    """Tag the best trial, place the critical batch, write and log the artifacts and
    result.json; return the table. RuntimeError when every trial failed."""
    c = client(uri)
    swept = list(cfg.tune.search_space)
    # The best trial: among those that ran their whole budget (else among the stopped ones).
    ok = df[df["status"] == "TERMINATED"].dropna(subset=[cfg.tune.metric])
    if ok.empty:
        ok = df[df["status"] != "ERROR"].dropna(subset=[cfg.tune.metric])
    best = None
    if len(ok):
        best = ok.loc[ok[cfg.tune.metric].idxmax() if cfg.tune.mode == "max"
                      else ok[cfg.tune.metric].idxmin()]
    for tid, run in runs.items():
        is_best = best is not None and tid == best["trial_id"]
        if is_best:
            c.set_tag(run.info.run_id, "best_trial", "true")
        elif run.data.tags.get("best_trial"):
            c.delete_tag(run.info.run_id, "best_trial")

    # The answer: the knee of steps-to-target over the fixed-batch trials, next to the noise
    # scale the trials measured (batch-size schedules are rows of the table, not points).
    fixed = df[df[SCHEDULE] == "constant"] if SCHEDULE in df else df
    fit = critical_batch(fixed) if cfg.tune.target_accuracy is not None else None
    noise = fixed["noise_scale"].dropna()
    noise_scale = float(noise.median()) if len(noise) else None
    sentence = critical_batch_sentence(fit, noise_scale, cfg.tune.target_accuracy)

    write_text(out_dir / "trials.csv", df.to_csv(index=False))
    table = summary_table(df.drop(columns=["error"]))
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
        parent_metrics[f"best_{cfg.tune.metric}"] = float(best[cfg.tune.metric])
    if fit is not None and fit["verdict"] == "knee":  # placed among the batches tried
        parent_metrics["critical_batch"] = fit["b_crit"]
    if noise_scale is not None:
        parent_metrics["noise_scale"] = noise_scale
    log_summary(uri, parent, parent_metrics, {
        "mlflow.note.content": sentence,  # the run's description in the UI
        "critical_batch": sentence})

    if best is None:
        raise RuntimeError(f"every trial of sweep {name} failed; see {out_dir / 'trials.csv'}")
    overrides = {k: _plain(best[k]) for k in swept}
    best_cfg = cfg.with_overrides(overrides)
    write_json(out_dir / "result.json", {
        "status": "FINISHED", "sweep": name, "parent_run_id": parent, "tracking_uri": uri,
        "best": {"trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"],
                 "overrides": overrides, "metrics": metrics_by_trial[best["trial_id"]],
                 "config": best_cfg.to_dict()},
        "trials": {k: int(v) for k, v in counts.items()},
        "critical_batch": {**(fit or {}), "noise_scale": noise_scale, "sentence": sentence,
                           # strict JSON has no Infinity: a knee beyond the batches is null
                           **({"b_crit": None} if fit and fit["verdict"] == "beyond" else {})},
        "trials_csv": str(out_dir / "trials.csv"), "experiment_path": experiment_path,
    })
    return df



def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v  # numpy scalars from the frame -> JSON types
