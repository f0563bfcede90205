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
        # ASHA stopped it at its epoch-2 result, but it finished epoch 3, its last, in flight
        # (the stop is asynchronous) before its actor went: it ran its budget
        "in_flight": trial_run("in_flight", 3, 3, None),
    }

    def result(trial_id: str, epochs: int, reported: int, error: Exception | None = None):
        return Result(metrics={"epoch": reported, "step": 10 * reported,
                               "val_accuracy": 0.5 + 0.1 * reported,
                               "config": {"train.epochs": epochs}},
                      checkpoint=None, error=error, path=str(tmp_path / trial_id))

    grid = [result("finished", 3, 3), result("stopped", 3, 1), result("short", 1, 1),
            result("unrecorded", 3, 3),  # MLflow away all along: no run at all
            result("failed", 3, 2, RuntimeError("worker died")), result("capped", 3, 2),
            result("killed_done", 3, 3), result("twice", 3, 3), result("in_flight", 3, 2)]
    df, _, trials = settle_trials(grid, cfg, mlflow_server, parent)
    status = dict(zip(df["trial_id"], df["status"], strict=True))
    assert status == {"finished": "TERMINATED", "stopped": "EARLY_STOPPED", "short": "TERMINATED",
                      "unrecorded": "TERMINATED", "failed": "ERROR", "capped": "TERMINATED",
                      "killed_done": "TERMINATED", "twice": "TERMINATED",
                      "in_flight": "TERMINATED"}
    assert df.set_index("trial_id").loc["stopped", "stopped_at_epoch"] == 1
    assert df.set_index("trial_id").loc["in_flight", "epochs"] == 3
    # ranked on the epoch it finished in flight (0.8), as its row shows it, not on Tune's 0.7
    assert df.set_index("trial_id").loc["in_flight", "val_accuracy"] == pytest.approx(0.8)
    assert trials["in_flight"].metrics["val_accuracy"] == pytest.approx(0.8)
    assert trials["finished"].metrics["val_accuracy"] == pytest.approx(0.8)
    assert df["stopped_at_epoch"].isna().sum() == 8
    shown = {k: c.get_run(v) for k, v in runs.items()}
    assert {k: r.info.status for k, r in shown.items()} == {
        "finished": "FINISHED", "stopped": "KILLED", "short": "FINISHED", "failed": "FAILED",
        "capped": "FINISHED", "killed_done": "FINISHED", "twice_first": "KILLED",
        "twice": "FINISHED", "in_flight": "FINISHED"}
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


def test_the_report_ranks_as_tune_did_keeps_tunes_values_and_leaves_failures_out(mlflow_server,
                                                                                 tmp_path):
    """`write_report` on settled trials: the best trial's overrides are the values Tune gave it
    (a swept [null, 100] is a float column of the table, which the config refuses); the best is
    ranked on Tune's own last results (the table's noise_scale is another reading: where the
    trial reached the target); the parent's noise scale is the median where the trials reached
    the target; a batch size whose every trial failed is named as failed, not as one that
    missed the target, and fits nothing."""
    import json

    from pipeline.tune.report import write_report

    experiment = f"test-report-{uuid.uuid4().hex[:6]}"
    space = {"train.global_batch_size": {"grid": [32, 64, 128, 256]},
             "train.max_steps": {"grid": [None, 100]}}
    sets = [f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
            "train.epochs=2", f"tune.search_space={json.dumps(space)}",
            "tune.target_accuracy=0.9"]
    c = MlflowClient(mlflow_server)
    exp = c.create_experiment(experiment)
    parent = c.create_run(exp).info.run_id
    # trial: (batch, max_steps, status, accuracy per epoch, noise per epoch, Tune's noise)
    trials = {"a": (32, None, "FINISHED", [0.91, 0.95], [50.0, 500.0], 300.0),
              "b": (64, 100, "FINISHED", [0.92, 0.97], [70.0, 700.0], 200.0),
              "c": (128, None, None, [], [], None),  # failed before its first epoch
              "d": (256, 100, "FINISHED", [0.5, 0.6], [90.0, 900.0], 900.0)}
    grid = []
    for tid, (batch, max_steps, status, acc, noise, tune_noise) in trials.items():
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "tune.trial_id": tid})
        for epoch, (a, n) in enumerate(zip(acc, noise, strict=True), start=1):
            for key, value in (("step", 10 * epoch), ("val_accuracy", a), ("noise_scale", n),
                               ("samples", 10 * epoch * batch)):
                c.log_metric(run.info.run_id, key, value, step=epoch)
        if status:
            c.set_terminated(run.info.run_id, status)
        conf = {"train.global_batch_size": batch, "train.max_steps": max_steps}
        metrics = ({"epoch": 2, "step": 20, "val_accuracy": acc[-1], "noise_scale": tune_noise,
                    "config": conf} if acc else {"config": conf})
        grid.append(Result(metrics=metrics, checkpoint=None, path=str(tmp_path / tid),
                           error=None if acc else RuntimeError("boom")))

    def report(*more: str):
        cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [*sets, *more])
        out = tmp_path / f"out-{uuid.uuid4().hex[:4]}"
        out.mkdir()
        write_report(*settle_trials(grid, cfg, mlflow_server, parent), cfg, mlflow_server,
                     parent, out, "sweep", str(tmp_path))
        return json.loads((out / "result.json").read_text())

    result = report()
    assert result["best"]["trial_id"] == "b"
    assert result["best"]["overrides"] == {"train.global_batch_size": 64, "train.max_steps": 100}
    assert result["best"]["config"]["train"]["max_steps"] == 100
    cb = result["critical_batch"]
    assert cb["noise_scale"] == 60.0  # the median of 50 and 70, where a and b reached 0.9
    assert cb["missed"] == [256] and cb["points"] == 2
    assert cb["sentence"].endswith(" Every trial at batch size(s) 128 failed.")
    parent_run = c.get_run(parent)
    assert parent_run.data.metrics["best_val_accuracy"] == 0.97
    assert parent_run.data.metrics["noise_scale"] == 60.0
    # Ranked by noise_scale (min): Tune's last results (a 300, b 200, d 900), not the table's
    # values at the target (a 50, b 70).
    ranked = report("tune.metric=noise_scale", "tune.mode=min")
    assert ranked["best"]["trial_id"] == "b"
    assert c.get_run(parent).data.metrics["best_noise_scale"] == 200.0
    # Every trial on a batch-size schedule: nothing to fit the knee to, said so (not "too few
    # reached it"), and the noise scale they measured is still the answer's first estimate.
    scheduled = report("train.batch_size_schedule=adaptive", "train.batch_size_min=32")
    cb = scheduled["critical_batch"]
    assert cb["verdict"] == "no_fixed_batch" and cb["noise_scale"] == 60.0
    assert cb["sentence"].startswith("No trial trained a fixed batch size")
    assert "about 60 samples, is a first estimate" in cb["sentence"]
    assert c.get_run(parent).data.metrics["noise_scale"] == 60.0
    assert report("tune.target_accuracy=null")["critical_batch"]["verdict"] == "no_target"
    # Trials that ran but have no number to rank by (here none reported val_loss) are not
    # "every trial failed"
    with pytest.raises(RuntimeError, match="no trial of sweep sweep ended with a finite val_loss"):
        report("tune.metric=val_loss", "tune.mode=min")


def test_the_noise_scale_at_the_target_is_the_latest_a_step_measured(mlflow_server):
    """A validation within the epoch reaches the target at step 15, a step that measured no
    noise scale (a skipped step); the one at the target is step 14's, the latest measured by
    then -- not epoch 1's (step 10), nor none."""
    from pipeline.tune.analysis import at_target, steps_to_target
    from pipeline.tune.results import history, target_points

    c = MlflowClient(mlflow_server)
    run = c.create_run(c.create_experiment(f"test-target-noise-{uuid.uuid4().hex[:6]}")).info.run_id
    for epoch, (acc, noise) in enumerate([(0.5, 40.0), (0.97, 90.0)], start=1):
        for key, value in (("step", 10 * epoch), ("val_accuracy", acc), ("noise_scale", noise),
                           ("samples", 320 * epoch)):
            c.log_metric(run, key, value, step=epoch)
    for step in range(11, 16):
        if step != 15:
            c.log_metric(run, "step/noise_scale", 40.0 + step, step=step)
    c.log_metric(run, "step/val_accuracy", 0.93, step=15)
    c.log_metric(run, "step/samples", 480.0, step=15)
    pts = target_points(mlflow_server, run, history(mlflow_server, run), noise_steps=True)
    assert steps_to_target(pts, 0.9) == 15 and at_target(pts, 0.9, "samples") == 480.0
    assert at_target(pts, 0.9, "noise_scale", latest=True) == 54.0
    # the validations alone (what notebook 04 plots): the two epoch ends and step 15
    validations = target_points(mlflow_server, run, history(mlflow_server, run))
    assert validations["step"].tolist() == [10, 15, 20]


def test_a_swept_secret_and_a_password_in_an_error_are_masked_in_the_trials_table(mlflow_server,
                                                                                 tmp_path):
    """trials.csv and summary.md (logged to the parent run) show the swept values and each
    failed trial's error: a swept credential (a key named as one, a URI's password) and the
    tracking server's password in MLflow's error text are masked there."""
    experiment = f"test-masked-{uuid.uuid4().hex[:6]}"
    space = ('tune.search_space={"model.kwargs.api_key": {"grid": ["sk-SECRET1", "sk-SECRET2"]},'
             ' "data.path": {"grid": ["s3://AKIAX:wJalrSECRET@bucket/d.parquet"]}}')
    cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [
        f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}", "train.epochs=1",
        space])
    c = MlflowClient(mlflow_server)
    parent = c.create_run(c.create_experiment(experiment)).info.run_id
    error = RuntimeError("mlflow.exceptions.MlflowException: API request to "
                         "http://me:hunter22@mlflow:5000/api/2.0/mlflow/runs/get failed")
    grid = [Result(metrics={"epoch": 1, "step": 10, "val_accuracy": 0.5,
                            "config": {"model.kwargs.api_key": key,
                                       "data.path": "s3://AKIAX:wJalrSECRET@bucket/d.parquet"}},
                   checkpoint=None, error=error if key.endswith("2") else None,
                   path=str(tmp_path / f"t{i}")) for i, key in enumerate(("sk-SECRET1", "sk-SECRET2"))]
    df, _, _ = settle_trials(grid, cfg, mlflow_server, parent)
    text = df.to_csv(index=False)
    for secret in ("sk-SECRET", "wJalrSECRET", "hunter22"):
        assert secret not in text, secret
    assert "s3://AKIAX:***@bucket/d.parquet #1" in text and "http://me:***@mlflow" in text
    # told apart (else the two would be one point of the report, as seed repeats)
    assert df["model.kwargs.api_key"].tolist() == ["*** #1", "*** #2"]


def test_a_trial_tune_calls_errored_is_an_error_without_its_error_files(mlflow_server, tmp_path):
    """Tune's verdict decides, not the error files a result reads back (an experiment moved or
    copied in part lacks them): such a trial was settled EARLY_STOPPED (its FAILED run re-marked
    KILLED), or TERMINATED and FINISHED where it had reached its budget."""
    import types

    experiment = f"test-errfiles-{uuid.uuid4().hex[:6]}"
    cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [
        f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}", "train.epochs=3"])
    c = MlflowClient(mlflow_server)
    exp = c.create_experiment(experiment)
    parent = c.create_run(exp).info.run_id
    run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "tune.trial_id": "t0"})
    c.log_param(run.info.run_id, "train.epochs", "3")
    c.set_terminated(run.info.run_id, "FAILED")

    class Grid(list):
        _experiment_analysis = types.SimpleNamespace(
            trials=[types.SimpleNamespace(trial_id="t0", status="ERROR")])

    grid = Grid([Result(metrics={"epoch": 3, "step": 30, "val_accuracy": 0.9,
                                 "config": {"train.epochs": 3}},
                        checkpoint=None, error=None, path=str(tmp_path / "t0"))])
    df, _, _ = settle_trials(grid, cfg, mlflow_server, parent)
    assert df["status"].tolist() == ["ERROR"] and "not read back" in df["error"].iloc[0]
    assert c.get_run(run.info.run_id).info.status == "FAILED"
