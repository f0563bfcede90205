"""One real sweep on the session's Ray cluster logging to the real MLflow server: ASHA early
stopping, a failing trial, the parent run and its nested trial runs, the MLflow UI, resume
through `ray job submit`. What needs no cluster is in tests/test_tune_pure.py."""

from __future__ import annotations

import json
import uuid

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import (
    REPO,
    cli_in_process,
    digits_train_rows,
    job_status,
    reference_job,
    run_cli,
    submit_job,
)
from tests.mlflow_ui import browser_problem, open_experiment

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]
BAD_MODEL = "import:tests.builders:fails_when_built"  # imports and takes the builders'
# arguments (the driver's checks pass); fails when built, on the workers, every time


# -- one real sweep ------------------------------------------------------------------------------
EPOCHS = 3
GOOD_LR, TINY_LR = 0.025, 0.00002
# Four trials, two at a time, in Tune's grid order (first key fastest): [cnn, good LR] and
# [bad model, good LR] start together; [cnn, tiny LR] starts when one of them has ended, so it
# reaches epoch 1 a whole trial start-up after the good-LR trial recorded its epoch-1 accuracy
# there: ASHA (one rung, at epoch 1) must stop it. The bad model fails when built, once (bad
# input is not retried).
SPACE = {"model.name": {"grid": ["digits_cnn", BAD_MODEL]},
         "train.base_lr": {"grid": [GOOD_LR, TINY_LR]}}


@pytest.fixture(scope="module")
def sweep(ray_cluster, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "sweep_digits.yaml").read_text())
    cfg["train"].update(epochs=EPOCHS, warmup_epochs=0)  # global batch 32 = base batch
    # The trials read the driver's blocks in the streaming mode (pipeline/blocks.py): each
    # fetches its rows from the node's BlockServer; the reference job below holds the table.
    cfg["data"] = {**cfg.get("data", {}), "mode": "streaming"}
    cfg["tune"] = {"search_space": SPACE, "scheduler": "asha", "metric": "val_accuracy",
                   "mode": "max", "max_concurrent": 2, "target_accuracy": 0.5}
    cfg["tracking"] = {"uri": mlflow_server, "experiment": "test-sweep", "log_model": False}
    (root / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "out"
    proc = run_cli("tune", "--config", str(root / "sweep.yaml"), "--out", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"out": out, "config": root / "sweep.yaml", "proc": proc, "uri": mlflow_server,
            "result": json.loads((out / "result.json").read_text()),
            "trials": pd.read_csv(out / "trials.csv"), "client": MlflowClient(mlflow_server)}


def _nested(client: MlflowClient, parent: str) -> list:
    exp = client.get_experiment_by_name("test-sweep").experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_sweep_table_and_result(sweep):
    df, result = sweep["trials"], sweep["result"]
    assert len(df) == 4
    assert set(SPACE) <= set(df.columns) and {"status", "epochs", "steps", "val_accuracy",
                                              "val_loss", "mlflow_run_id"} <= set(df.columns)
    bad = df["model.name"] == BAD_MODEL
    assert (df.loc[bad, "status"] == "ERROR").all()
    assert df.loc[bad, "error"].str.contains("fails_when_built").all()
    lr = df["train.base_lr"]
    good, tiny = df[~bad & (lr == GOOD_LR)], df[~bad & (lr == TINY_LR)]
    # One good-LR trial, first at the epoch-1 rung (see SPACE): never stopped. Only its own
    # race with a second good trial would make that depend on the machine's load.
    assert (good["status"] == "TERMINATED").all() and (good["epochs"] == EPOCHS).all()
    assert len(good) == len(tiny) == 1
    assert (tiny["status"] == "EARLY_STOPPED").all() and (tiny["stopped_at_epoch"] < EPOCHS).all()
    assert good["stopped_at_epoch"].isna().all()
    resolved = result["best"]["config"]  # the batch size is not swept: the same in every trial
    train_rows = digits_train_rows(resolved["data"]["val_fraction"], resolved["data"]["split_seed"])
    steps_per_epoch = train_rows // resolved["train"]["global_batch_size"]  # random, drop_last
    assert (df.loc[~bad, "steps"] == df.loc[~bad, "epochs"] * steps_per_epoch).all()
    best = result["best"]
    assert best["overrides"]["train.base_lr"] == GOOD_LR
    assert best["metrics"]["val_accuracy"] == pytest.approx(good["val_accuracy"].max())
    assert best["config"]["train"]["base_lr"] == GOOD_LR and best["metrics"]["epoch"] == EPOCHS
    assert best["config"]["model"]["name"] == best["overrides"]["model.name"] == "digits_cnn"
    assert result["tracking_uri"] and result["parent_run_id"]
    assert "best trial" in sweep["proc"].stdout
    # MLflow's own "View run" lines (a read of the run each) are off: the pipeline names them
    assert "View run" not in sweep["proc"].stdout + sweep["proc"].stderr


def test_parent_run_and_nested_trial_runs(sweep):
    client, result, df = sweep["client"], sweep["result"], sweep["trials"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["tune.search_space"]) == SPACE
    assert parent.data.params["train.epochs"] == str(EPOCHS)
    assert parent.data.tags["pipeline.kind"] == "sweep"
    assert parent.data.metrics["trials_error"] == 2
    runs = {r.info.run_id: r for r in _nested(client, parent.info.run_id)}
    assert set(runs) == set(df["mlflow_run_id"])  # every trial is one nested run
    for row in df.itertuples():
        run = runs[row.mlflow_run_id]
        assert run.data.tags["tune.trial_id"] == row.trial_id
        expected = {"ERROR": "FAILED", "TERMINATED": "FINISHED", "EARLY_STOPPED": "KILLED"}
        assert run.info.status == expected[row.status], row
        assert (run.data.tags.get("early_stopped") == "true") == (row.status == "EARLY_STOPPED")
        if row.status != "ERROR":  # one value per epoch it ran
            epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                                      "val_accuracy"))
            assert epochs == list(range(1, row.epochs + 1))
    best = [r for r in runs.values() if r.data.tags.get("best_trial") == "true"]
    assert [r.info.run_id for r in best] == [result["best"]["mlflow_run_id"]]


def test_parent_artifacts_and_files(sweep):
    client, out = sweep["client"], sweep["out"]
    parent = sweep["result"]["parent_run_id"]
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"trials.csv", "summary.md", "accuracy_vs_batch.png", "steps_vs_batch.png",
            "config.yaml", "search_space.json"} <= names
    for name in ("trials.csv", "result.json", "accuracy_vs_batch.png", "steps_vs_batch.png"):
        assert (out / name).is_file()
    # Steps to the target read back from MLflow: the good trials reached 0.5.
    df = sweep["trials"]
    reached = df[(df["status"] == "TERMINATED")]
    assert len(reached) and reached["steps_to_target"].notna().all()
    for _, trial in reached.iterrows():  # recomputed from the raw histories: the first
        run = trial["mlflow_run_id"]  # validation at 0.5 or more, by optimizer step
        step_at = {m.step: m.value for m in client.get_metric_history(run, "step")}  # by epoch
        points = [(step_at[m.step], m.value) for m in client.get_metric_history(run, "val_accuracy")]
        points += [(m.step, m.value) for m in client.get_metric_history(run, "step/val_accuracy")]
        assert trial["steps_to_target"] == min(st for st, v in points if v >= 0.5), points
        below = [st for st, v in points if st < trial["steps_to_target"]]  # validations before
        assert trial["steps_before_target"] == (max(below) + 1 if below else 1), points


def test_a_one_worker_trial_trains_in_its_actor_as_a_job_would(sweep, tmp_path):
    """The good trial ran in its own Tune actor (no worker group), on rows streamed from the
    sweep's blocks, and ends at the very weights of a stand-alone job (a TorchTrainer holding
    the whole table: data.mode=object_store) with its config; its fixed cost is in trials.csv,
    and what it fetched each epoch is its training and validation rows' features, exactly."""
    import torch

    from pipeline.engine.checkpoint import load_checkpoint

    df, client = sweep["trials"], sweep["client"]
    good = df[df["status"] == "TERMINATED"].iloc[0]
    run = client.get_run(good["mlflow_run_id"])
    assert run.data.tags["tune.trial_runner"] == "actor"
    assert 0 < good["startup_s"] < 600 and run.data.metrics["startup_s"] == good["startup_s"]
    trial = json.loads(next((sweep["out"] / "trials").glob(f"*/{good['trial_id']}/result.json"))
                       .read_text())
    ref_cfg = yaml.safe_load(sweep["config"].read_text())
    ref_cfg["model"]["name"], ref_cfg["train"]["base_lr"] = good["model.name"], GOOD_LR
    ref_cfg["data"]["mode"] = "object_store"
    fetched = [m.value for m in client.get_metric_history(good["mlflow_run_id"],
                                                           "data_fetched_mib")]
    train = digits_train_rows(ref_cfg["data"]["val_fraction"], ref_cfg["data"].get("split_seed", 0))
    drawn, val = train // 32 * 32, 1797 - train  # full batches of 32; all of validation
    assert fetched == [(drawn + val) * 64 * 4 / 2**20] * EPOCHS  # 64 float32 features a row
    want = reference_job(ref_cfg, tmp_path)
    got = load_checkpoint(trial["checkpoint"])
    assert got["step"] == want["step"] == good["steps"]
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()


def test_mlflow_ui_lists_the_sweep_with_its_trials(sweep, tmp_path):
    """The MLflow UI of the test server, in a real headless Chromium: the sweep's parent run,
    opened, lists every trial under it (nested runs show only under their parent)."""
    if problem := browser_problem():
        pytest.fail(problem)
    parent = sweep["client"].get_run(sweep["result"]["parent_run_id"])
    expect = [parent.info.run_name, *sweep["trials"]["trial_id"]]
    text = open_experiment(sweep["uri"], parent.info.experiment_id, expect, tmp_path / "ui.png")
    assert "test-sweep" in text and "5 matching runs" in text
    assert (tmp_path / "ui.png").stat().st_size > 20_000


def test_resume_reruns_no_finished_trial(sweep, ray_cluster):
    """Resumed as a real `ray job submit` of jobs/tune.py: nothing is left to run."""
    client, out = sweep["client"], sweep["out"]
    parent = sweep["result"]["parent_run_id"]
    before = {r.info.run_id: r.info.status for r in _nested(client, parent)}
    trial_dirs = sorted(p.name for p in (out / "trials").glob("*/*"))

    def untouched() -> dict:  # what a trial run again in place (its run, its folder) changes
        return {r.info.run_id: (r.info.end_time, len(client.get_metric_history(r.info.run_id,
                                                                                "train_loss")))
                for r in _nested(client, parent)} | {
            str(p): p.read_bytes() for p in sorted((out / "trials").glob("*/*/result.json"))}

    kept = untouched()
    sub_id = f"test-tune-{uuid.uuid4().hex[:8]}"
    proc = submit_job(ray_cluster, sub_id, "python", "jobs/tune.py", "--config",
                      str(sweep["config"]), "--out", str(out), "--resume", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert job_status(ray_cluster, sub_id) == "SUCCEEDED"
    after = {r.info.run_id: r.info.status for r in _nested(client, parent)}
    assert after == before  # no new trial run, none reopened
    assert sorted(p.name for p in (out / "trials").glob("*/*")) == trial_dirs
    assert untouched() == kept  # none run again in place: same end times, curves and results
    assert json.loads((out / "result.json").read_text())["parent_run_id"] == parent
    assert client.get_run(parent).info.status == "FINISHED"


def test_changed_config_cannot_resume(sweep, capsys, monkeypatch):
    """In-process: refused with the changed key named, before joining the cluster."""
    import pipeline.launch

    def connect(*_, **__):
        raise AssertionError("joined the cluster: the changed config was not refused")

    monkeypatch.setattr(pipeline.launch, "connect", connect)
    before = sorted(p.name for p in sweep["out"].rglob("*"))
    rc, _, err = cli_in_process(["tune", "--config", str(sweep["config"]), "--out",
                                 str(sweep["out"]), "--resume", "--set", "train.epochs=5"],
                                capsys, monkeypatch)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert "the config differs from the sweep's in train.epochs" in line
    assert sorted(p.name for p in sweep["out"].rglob("*")) == before


def test_a_worker_group_trial_failing_on_bad_input_fails_alone(ray_cluster, mlflow_server,
                                                               tmp_path):
    """`tune.trial_runner: worker_group`: every trial a TorchTrainer, whose epochs reach Tune
    through `trial.epochs_to_tune`. A trial whose model cannot be built reports its fatal
    error from the worker instead of an epoch; the callback keeps that report from Tune (it has
    no `val_accuracy`, and Tune would fail the whole sweep on it), so that trial alone fails,
    with the culprit named and its MLflow run FAILED, and the other trial trains."""
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "sweep_digits.yaml").read_text())
    cfg["train"].update(epochs=1, warmup_epochs=0)
    cfg["tune"] = {"search_space": {"model.name": {"grid": ["digits_cnn", BAD_MODEL]}},
                   "scheduler": "fifo", "metric": "val_accuracy", "mode": "max",
                   "max_concurrent": 2, "trial_runner": "worker_group"}
    experiment = f"test-sweep-wg-{uuid.uuid4().hex[:6]}"
    cfg["tracking"] = {"uri": mlflow_server, "experiment": experiment, "log_model": False}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = run_cli("tune", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out),
                   timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    df = pd.read_csv(out / "trials.csv")
    bad = df["model.name"] == BAD_MODEL
    assert bad.sum() == 1 and (~bad).sum() == 1
    assert (df.loc[bad, "status"] == "ERROR").all()
    assert df.loc[bad, "error"].str.contains(f"model.name={BAD_MODEL}: TypeError").all()
    assert (df.loc[~bad, "status"] == "TERMINATED").all() and (df.loc[~bad, "epochs"] == 1).all()
    client = MlflowClient(mlflow_server)
    for row in df.itertuples():
        run = client.get_run(row.mlflow_run_id)
        assert run.data.tags["tune.trial_runner"] == "worker_group"
        assert run.info.status == ("FAILED" if row.status == "ERROR" else "FINISHED")
    # the worker's own record of the deterministic failure (a rerun of the trial reads it)
    bad_id = df.loc[bad, "trial_id"].iloc[0]
    assert "fails_when_built" in json.loads(next(out.glob(f"trials/*/{bad_id}/fatal.json"))
                                         .read_text())["message"]


def test_a_sweep_stopped_before_its_trials_says_to_start_it_again(ray_client, mlflow_server,
                                                                   tmp_path, monkeypatch):
    """Stopped during its ingest (which can take minutes on a large dataset), before Tune saved
    anything: --resume would find nothing to restore, so the line says to run it again; the
    parent run is KILLED."""
    import pipeline.launch as launch
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.tune import SweepInterrupted, run_sweep

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "ingest", ctrl_c)
    cfg, info = resolve(load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml", [
        f"tracking.uri={mlflow_server}", "tracking.experiment=test-sweep-early-stop"]))
    with pytest.raises(SweepInterrupted, match="interrupted before its trials started; run it "
                                               r"again \(without --resume"):
        run_sweep(cfg, info, tmp_path)
    parent = json.loads((tmp_path / "sweep.json").read_text())["parent_run_id"]
    assert MlflowClient(mlflow_server).get_run(parent).info.status == "KILLED"


def test_a_sweep_leaves_no_reference_to_its_dataset_in_the_driver(ray_client, mlflow_server,
                                                                  tmp_path, monkeypatch):
    """A notebook runs sweep after sweep in one driver: Tune keeps the parameters a trainable
    is given for the process's life (`tune.with_parameters` registers them with Ray's
    post-init hooks), so the blocks handed to it stayed referenced -- pinned in the object
    store -- after every sweep. The trials now reach them through a holder actor the sweep
    ends: once it returns, the driver holds no reference to a block of its dataset."""
    import gc

    import ray

    import pipeline.launch as launch
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.tune import run_sweep

    ingested, real = [], launch.ingest

    def recorded(*args, **kwargs):
        blocks = real(*args, **kwargs)
        ingested.extend(ref.hex() for ref in blocks.refs)
        return blocks

    monkeypatch.setattr(launch, "ingest", recorded)
    cfg, info = resolve(load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml", [
        f"tracking.uri={mlflow_server}", "tracking.experiment=test-sweep-refs", "train.epochs=1",
        "train.warmup_epochs=0",
        "tracking.log_model=false", "data.mode=object_store",
        'tune.search_space={"train.base_lr": {"grid": [0.025]}}', "tune.scheduler=fifo"]))
    run_sweep(cfg, info, tmp_path)
    gc.collect()
    # (this process's reference table: object ids as hex, in bytes)
    held = {k.decode() for k in ray._private.worker.global_worker.core_worker
            .get_all_reference_counts()}
    assert ingested and not [i for i in ingested if i in held]
