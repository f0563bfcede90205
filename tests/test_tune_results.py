"""A sweep's trials settled against Tune's verdict (`pipeline.tune.results.settle_trials`), with
a real MLflow server and Tune's own `Result` records: a trial that ran its epochs (or its
train.max_steps) is TERMINATED and its run FINISHED whatever the run showed (its own end_run
may not have reached the server, a stopped sweep KILLED it first, or it never had a run); only
a trial stopped before its own last epoch is EARLY_STOPPED, its run KILLED and tagged."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Result

from pipeline.config import load_config
from pipeline.tune.results import settle_trials
from tests.conftest import REPO

pytestmark = pytest.mark.mlflow


def test_a_trial_is_early_stopped_only_if_it_ended_before_its_own_last_epoch(mlflow_server,
                                                                             tmp_path):
    experiment = f"test-settle-{uuid.uuid4().hex[:6]}"
    cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [
        f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}", "train.epochs=3",
        'tune.search_space={"train.epochs": {"grid": [1, 3]}}'])
    c = MlflowClient(mlflow_server)
    exp = c.create_experiment(experiment)
    parent = c.create_run(exp).info.run_id

    def trial_run(trial_id: str, epochs: int, logged: int, status: str | None,
                  max_steps: int | None = None) -> str:
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "tune.trial_id": trial_id})
        c.log_param(run.info.run_id, "train.epochs", str(epochs))
        c.log_param(run.info.run_id, "train.max_steps", str(max_steps))  # "None": as logged
        for epoch in range(1, logged + 1):
            c.log_metric(run.info.run_id, "steps", 10, step=epoch)
            c.log_metric(run.info.run_id, "val_accuracy", 0.5 + 0.1 * epoch, step=epoch)
        if status:
            c.set_terminated(run.info.run_id, status)
        return run.info.run_id

    runs = {
        "finished": trial_run("finished", 3, 3, "FINISHED"),
        "stopped": trial_run("stopped", 3, 1, None),  # ASHA stopped it at the epoch-1 rung
        "short": trial_run("short", 1, 1, None),  # ran its 1 epoch; its end never reached MLflow
        "failed": trial_run("failed", 3, 2, None),
        # train.max_steps=20 ended it in its second epoch (10 steps an epoch), its end unsent
        "capped": trial_run("capped", 3, 2, None, max_steps=20),
        # it ran its epochs, but the sweep was stopped before its end reached MLflow and
        # KILLED it; the resumed sweep found its result.json (not trained again)
        "killed_done": trial_run("killed_done", 3, 3, "KILLED"),
        # a first run made once the server was back, then the trial run again in a second
        # before its run.json knew the first: the first is left RUNNING
        "twice_first": trial_run("twice", 3, 1, None),
        "twice": trial_run("twice", 3, 3, "FINISHED"),
    }

    def result(trial_id: str, epochs: int, reported: int, error: Exception | None = None):
        return Result(metrics={"epoch": reported, "step": 10 * reported,
                               "val_accuracy": 0.5 + 0.1 * reported,
                               "config": {"train.epochs": epochs}},
                      checkpoint=None, error=error, path=str(tmp_path / trial_id))

    grid = [result("finished", 3, 3), result("stopped", 3, 1), result("short", 1, 1),
            result("unrecorded", 3, 3),  # MLflow away all along: no run at all
            result("failed", 3, 2, RuntimeError("worker died")), result("capped", 3, 2),
            result("killed_done", 3, 3), result("twice", 3, 3)]
    df, _, _ = settle_trials(grid, cfg, mlflow_server, parent)
    status = dict(zip(df["trial_id"], df["status"], strict=True))
    assert status == {"finished": "TERMINATED", "stopped": "EARLY_STOPPED", "short": "TERMINATED",
                      "unrecorded": "TERMINATED", "failed": "ERROR", "capped": "TERMINATED",
                      "killed_done": "TERMINATED", "twice": "TERMINATED"}
    assert df.set_index("trial_id").loc["stopped", "stopped_at_epoch"] == 1
    assert df["stopped_at_epoch"].isna().sum() == 7
    shown = {k: c.get_run(v) for k, v in runs.items()}
    assert {k: r.info.status for k, r in shown.items()} == {
        "finished": "FINISHED", "stopped": "KILLED", "short": "FINISHED", "failed": "FAILED",
        "capped": "FINISHED", "killed_done": "FINISHED", "twice_first": "KILLED",
        "twice": "FINISHED"}
    assert [k for k, r in shown.items() if r.data.tags.get("early_stopped")] == ["stopped"]


def test_a_trials_curve_takes_the_step_counter_it_logged_and_its_noise_scale_in_samples(
        mlflow_server):
    """`history` reads the optimizer step counter each epoch logged (a run that continues a
    checkpoint starts it where the checkpoint was; an epoch's `steps` point lost in an outage
    does not shift the later ones), and the noise scale in samples where a token-level run
    logged it; a run from before the counter was logged falls back to summing `steps`."""
    from pipeline.tune.results import history

    c = MlflowClient(mlflow_server)
    exp = c.create_experiment(f"test-history-{uuid.uuid4().hex[:6]}")
    counted, legacy = c.create_run(exp).info.run_id, c.create_run(exp).info.run_id
    for epoch in (1, 2, 3):  # resumed from a checkpoint at step 30; epoch 2's `steps` lost
        if epoch != 2:
            c.log_metric(counted, "steps", 10, step=epoch)
        c.log_metric(counted, "step", 30 + 10 * epoch, step=epoch)
        c.log_metric(counted, "noise_scale", 2560.0 * epoch, step=epoch)  # tokens
        c.log_metric(counted, "noise_scale_samples", 10.0 * epoch, step=epoch)
        c.log_metric(legacy, "steps", 10, step=epoch)
        c.log_metric(legacy, "noise_scale", 5.0 * epoch, step=epoch)
    h = history(mlflow_server, counted)
    assert h["step"].tolist() == [40, 50, 60] and h["noise_scale"].tolist() == [10.0, 20.0, 30.0]
    h = history(mlflow_server, legacy)
    assert h["step"].tolist() == [10, 20, 30] and h["noise_scale"].tolist() == [5.0, 10.0, 15.0]
