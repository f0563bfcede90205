"""End to end on the session's real Ray cluster, logging to the real MLflow server:
the main digits job on 2 DDP workers, resume, failure status, and `ray job submit`."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, digits_train_rows, job_status, run_cli, submit_job

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s", "epoch_time_s")


def epochs_logged(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_main_job_two_workers_reaches_095_and_logs_every_epoch(ray_cluster, mlflow_server,
                                                               tmp_path):
    out = run_cli("train", "--config", DIGITS, "--set", f"tracking.uri={mlflow_server}",
                  "--set", "tracking.experiment=test-main", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    cfg = result["config"]
    assert cfg["scaling"]["num_workers"] == 2 and cfg["data"]["name"] == "digits"
    assert result["metrics"]["val_accuracy"] >= 0.95
    epochs = cfg["train"]["epochs"]
    assert result["metrics"]["epoch"] == epochs
    assert os.path.exists(os.path.join(result["checkpoint"], "state.pt"))
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert epochs_logged(client, run.info.run_id, key) == list(range(1, epochs + 1)), key
    # The gradient noise scale (each rank's share vs the global batch, via the DDP hook) is
    # logged every epoch and grows as the loss falls, as McCandlish et al. 2018 report.
    noise = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "noise_scale"),
                                     key=lambda m: m.step)]
    assert len(noise) == epochs and all(v > 0 for v in noise) and noise[-1] > 2 * noise[0]
    assert {m.value for m in client.get_metric_history(run.info.run_id, "global_batch_size")} == {64}
    assert run.data.params["train.global_batch_size"] == "64"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags.get("git.commit")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    # The final model: an MLflow PyTorch model that loads and classifies.
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    logits = model({"features": torch.zeros(2, 64)})
    assert logits.shape == (2, 10)
    assert f"MLflow run {run.info.run_id}" in out.stdout
    assert "epoch 1:" in out.stdout + out.stderr  # progress output


def test_resume_continues_at_next_epoch_with_step_counter(ray_client, mlflow_server, tmp_path):
    common = ["--config", DIGITS, "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=test-resume", "--out", str(tmp_path)]
    # First part in this process (the same job path as the CLI, cheaper to start), then the
    # user's path: `python -m pipeline train ... --resume` in a new driver.
    run_in_process(mlflow_server, tmp_path, "tracking.experiment=test-resume", "train.epochs=2")
    r1 = json.loads((tmp_path / "result.json").read_text())
    steps_per_epoch = r1["metrics"]["step"] // 2
    data, train = r1["config"]["data"], r1["config"]["train"]
    train_rows = digits_train_rows(data["val_fraction"], data["split_seed"])
    assert steps_per_epoch == train_rows // train["global_batch_size"]  # random, drop_last
    second = run_cli("train", *common, "--set", "train.epochs=4", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    r2 = json.loads((tmp_path / "result.json").read_text())
    assert r2["mlflow_run_id"] == r1["mlflow_run_id"]  # the same MLflow run continues
    assert r2["metrics"]["epoch"] == 4 and r2["metrics"]["step"] == 4 * steps_per_epoch
    client = MlflowClient(mlflow_server)
    assert epochs_logged(client, r1["mlflow_run_id"], "train_loss") == [1, 2, 3, 4]
    step_lr = client.get_metric_history(r1["mlflow_run_id"], "step/lr")
    assert sorted(m.step for m in step_lr) == list(range(1, 4 * steps_per_epoch + 1))
    assert client.get_run(r1["mlflow_run_id"]).info.status == "FINISHED"


def run_in_process(mlflow_uri: str, out, *overrides: str) -> dict:
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.launch import run_training

    cfg, info = resolve(load_config(DIGITS, [f"tracking.uri={mlflow_uri}", *overrides]))
    return run_training(cfg, info, out)


def test_failed_run_is_marked_failed(ray_client, mlflow_server, tmp_path):
    """The model import fails on the workers: the job raises and its run is FAILED."""
    with pytest.raises(Exception, match="no_such_model"):
        run_in_process(mlflow_server, tmp_path, "tracking.experiment=test-failed",
                       "train.epochs=1", "model.name=import:os:no_such_model",
                       "scaling.max_failures=0")
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("test-failed").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "result.json").exists()


@pytest.mark.slow
def test_ray_job_submit_train(ray_cluster, mlflow_server, tmp_path):
    """A real `ray job submit` of jobs/train.py to the session's `ray start --head` cluster."""
    sub_id = f"test-train-{uuid.uuid4().hex[:8]}"
    out = submit_job(ray_cluster, sub_id, "python", "jobs/train.py", "--config",
                     "jobs/configs/digits.yaml", "--set", "train.epochs=2",
                     "--set", f"tracking.uri={mlflow_server}",
                     "--set", "tracking.experiment=test-job", "--out", str(tmp_path))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert job_status(ray_cluster, sub_id) == "SUCCEEDED"
    result = json.loads((tmp_path / "result.json").read_text())
    run = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.submission_id"] == sub_id
    assert run.data.tags["ray.job_id"]
