"""End to end on the session's real Ray cluster, logging to the real MLflow server:
the main digits job on 2 DDP workers, resume, failure status, and `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, digits_train_rows, job_status, run_cli, submit_job

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s", "epoch_time_s")


def epochs_logged(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_main_job_two_workers_reaches_095_and_logs_every_epoch(ray_cluster, mlflow_server,
                                                               tmp_path):
    secret = f"s3cr3t-{uuid.uuid4().hex}"  # a credential in the environment, and by mistake
    out = run_cli("train", "--config", DIGITS, "--set", f"tracking.uri={mlflow_server}",  # in
                  "--set", "tracking.experiment=test-main", "--out", str(tmp_path),  # the name
                  "--set", f"tracking.run_name=main-{secret}", env={"PIPELINE_TEST_API_TOKEN": secret})
    assert out.returncode == 0, out.stderr[-3000:]
    def strict(constant: str):  # NaN, Infinity: Python's JSON, not JSON (jq, JavaScript refuse it)
        raise AssertionError(f"result.json holds {constant}")

    result = json.loads((tmp_path / "result.json").read_text(), parse_constant=strict)
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
    # What a sweep may rank by (`Config.logged_metrics`) is what this run logged per epoch (but
    # `epoch`, reported to Tune, which MLflow has as its x-axis), and it logged nothing else per
    # epoch but `ghost_batch_size` (its model has BatchNorm).
    from pipeline.config import Config

    rankable = set(Config.model_validate(cfg).logged_metrics()) - {"epoch"}
    per_epoch = {k for k in run.data.metrics if "/" not in k
                 and epochs_logged(client, run.info.run_id, k) == list(range(1, epochs + 1))}
    assert rankable <= per_epoch, rankable - per_epoch
    assert per_epoch - rankable == {"ghost_batch_size"}
    # `random` drops the last partial batch each epoch: 1,797 rows, 359 held out, 1,438 % 64
    assert [m.value for m in client.get_metric_history(run.info.run_id, "dropped")] == [30] * epochs
    micro = cfg["train"]["micro_batch_size"] or 64 // 2  # (no SyncBatchNorm: a rank's micro-batch)
    assert {m.value for m in client.get_metric_history(run.info.run_id, "ghost_batch_size")} == {micro}
    assert run.data.params["train.global_batch_size"] == "64"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags.get("git.commit")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    # Secrets never reach MLflow (pipeline/redact.py): not in params, tags or config.yaml.
    import mlflow.artifacts

    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert "run_name: main-***" in logged and run.data.tags["mlflow.runName"] == "main-***"
    searched = [logged, *run.data.params.values(), *run.data.tags.values()]
    assert not [s for s in searched if secret in s]
    # nor result.json, the file users share (run.json keeps what a --resume needs), nor the console
    assert secret not in (tmp_path / "result.json").read_text()
    assert result["config"]["tracking"]["run_name"] == "main-***"
    assert secret not in out.stdout + out.stderr
    # The final model: an MLflow PyTorch model that loads and classifies.
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    logits = model(torch.zeros(2, 64))  # pt2: positional tensors (tests/test_model_artifact.py)
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
    # stamped when each step ran, not when its epoch's points were sent (one stamp an epoch)
    stamps = [m.timestamp for m in sorted(step_lr, key=lambda m: m.step)]
    assert stamps == sorted(stamps) and len(set(stamps)) > 4 * 2
    run = client.get_run(r1["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # params stay as first logged (MLflow never changes them): the resume's change is a tag,
    # and the config it resumed with an artifact beside config.yaml
    assert run.data.params["train.epochs"] == "2" and run.data.tags["resumed.train.epochs"] == "4"
    resumed = client.download_artifacts(run.info.run_id, "config.resumed.yaml", str(tmp_path))
    assert yaml.safe_load(Path(resumed).read_text())["train"]["epochs"] == 4


def test_resume_passes_over_a_corrupted_latest_checkpoint_to_the_same_weights(ray_client,
                                                                              mlflow_server,
                                                                              tmp_path):
    """The latest checkpoint damaged on disk (one bit): `--resume` says it skips it, restarts
    from the previous good one, and the retrained epoch ends at exactly the weights the
    damaged checkpoint held (the pipeline is deterministic)."""
    from pipeline.engine.checkpoint import STATE_FILE, find_latest_checkpoint, load_checkpoint

    run_in_process(mlflow_server, tmp_path, "tracking.experiment=test-resume-corrupt",
                   "train.epochs=2")
    latest = find_latest_checkpoint(tmp_path / "ray_results")
    want = load_checkpoint(latest)
    assert want["epoch"] == 1  # epochs count from 0 in checkpoints
    data = bytearray((latest / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (latest / STATE_FILE).write_bytes(bytes(data))
    out = run_cli("train", "--config", DIGITS, "--set", f"tracking.uri={mlflow_server}",
                  "--set", "tracking.experiment=test-resume-corrupt", "--set", "train.epochs=2",
                  "--out", str(tmp_path), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [ln for ln in out.stderr.splitlines() if "skipping checkpoint" in ln]
    assert len(skipped) == 1 and str(latest) in skipped[0] and "checksum" in skipped[0]
    assert "(epoch 1 done)" in out.stderr
    got = load_checkpoint(json.loads((tmp_path / "result.json").read_text())["checkpoint"])
    assert got["epoch"] == 1 and got["step"] == want["step"]
    assert want["model"].keys() == got["model"].keys()
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())


def run_in_process(mlflow_uri: str, out, *overrides: str) -> dict:
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from pipeline.launch import run_training

    cfg, info = resolve(load_config(DIGITS, [f"tracking.uri={mlflow_uri}", *overrides]))
    before = signal.getsignal(signal.SIGINT)
    result = run_training(cfg, info, out)
    # Ray Train's own SIGINT handler (installed in `fit`, left there) is gone: a Ctrl-C after
    # training is a KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is before
    return result


def test_failed_run_is_marked_failed(ray_client, mlflow_server, tmp_path):
    """The model fails when the workers build it (a user builder's bug, `tests/builders.py`):
    the job raises a ConfigError (exit 2) and its run is FAILED -- once: a deterministic
    failure is not tried again, though scaling.max_failures allows two restarts."""
    from pipeline.config import ConfigError

    calls = tmp_path / "built.txt"
    with pytest.raises(ConfigError, match="fails_when_built"):
        run_in_process(mlflow_server, tmp_path / "out", "tracking.experiment=test-failed",
                       "train.epochs=1", "model.name=import:tests.builders:fails_when_built",
                       f"model.kwargs.count_file={calls}", "scaling.max_failures=2")
    assert calls.read_text().count("built") == 2  # each of the 2 workers, one attempt
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("test-failed").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "out" / "result.json").exists()


def test_workers_the_cluster_can_never_run_are_refused_before_anything_is_recorded(
        ray_cluster, mlflow_server, tmp_path):
    """64 workers on the session's 4-CPU cluster (no autoscaler): exit 2 with one line, no run
    in MLflow and nothing in --out -- Ray Train would wait for them for ever, a traceback every
    minute, and Ctrl-C did not stop it."""
    experiment = f"test-too-many-{uuid.uuid4().hex[:6]}"
    out = run_cli("train", "--config", DIGITS, "--set", "scaling.num_workers=64",
                  "--set", "train.micro_batch_size=1", "--set", f"tracking.uri={mlflow_server}",
                  "--set", f"tracking.experiment={experiment}", "--out", str(tmp_path / "out"),
                  env={"RAY_ADDRESS": ray_cluster["address"]}, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    line = ("config error: scaling.num_workers=64 x 1 CPU each: it needs 64 CPU(s) in all, the "
            "cluster has 4; lower scaling.num_workers or scaling.cpus_per_worker (or add nodes)")
    assert out.stderr.strip().splitlines()[-1] == line and out.stderr.count("config error") == 1
    assert not (tmp_path / "out" / "run.json").exists()
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None


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


def test_batch_size_schedules_log_the_batch_of_every_step_and_scale_the_lr(ray_client, mlflow_server,
                                                                          tmp_path):
    """`warmup`: the exact ramp 32 -> 256 over 12 steps, each step's LR the linear rule at its
    batch; `adaptive` with a set step cost: multiples of 32 within [32, 256], each change to the
    batch of highest goodput at the noise scale measured then, said on the console. Both log
    `global_batch_size` per step and `samples` (their sum) per epoch."""
    from pipeline.engine.batch_schedule import warmup_units

    common = ["--config", DIGITS, "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=test-schedules", "--set", "train.epochs=2",
              "--set", "train.global_batch_size=256", "--set", "train.micro_batch_size=16",
              "--set", "train.batch_size_min=32", "--set", "model.name=mlp"]
    client = MlflowClient(mlflow_server)

    def curve(result, key):
        return [m.value for m in sorted(client.get_metric_history(result["mlflow_run_id"], key),
                                        key=lambda m: m.step)]

    out = run_cli("train", *common, "--set", "train.batch_size_schedule=warmup",
                  "--set", "train.batch_size_warmup_steps=12", "--set", "train.eval_every=6",
                  "--out", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr[-3000:]
    warm = json.loads((tmp_path / "w" / "result.json").read_text())
    sizes = curve(warm, "step/global_batch_size")
    # The ramp 1 + 7 s // 12 units of 32, each epoch's last step taking the units left.
    units_per_epoch = digits_train_rows(0.2, 0) // 32  # random, drop_last
    want, step = [], 0
    for _ in range(2):
        left = units_per_epoch
        while left:
            k = min(warmup_units(step, 8, 12), left)
            want.append(32.0 * k)
            left, step = left - k, step + 1
    assert sizes == want
    assert want[:12] == [32, 32, 64, 64, 96, 96, 128, 160, 160, 192, 192, 192]  # 38 + 6 = 44
    lrs = curve(warm, "step/lr")
    for lr, size in zip(lrs, sizes, strict=True):  # base 0.05 at 64, linear, no LR warmup
        assert lr == pytest.approx(0.05 * size / 64)
    assert curve(warm, "samples")[-1] == sum(sizes)
    # train.eval_every=6: a validation pass every 6 optimizer steps, logged at that step.
    evals = client.get_metric_history(warm["mlflow_run_id"], "step/val_accuracy")
    assert sorted(m.step for m in evals) == list(range(6, len(sizes) + 1, 6))
    assert all(0 <= m.value <= 1 for m in evals)
    # The epochs end at steps 12 and 18, each validated then: the epoch's validation is that
    # pass (the same weights; taken, not run again)
    ends = curve(warm, "step")
    assert ends == [12.0, 18.0]
    for kind in ("val_accuracy", "val_loss"):
        by_step = {m.step: m.value for m in client.get_metric_history(warm["mlflow_run_id"],
                                                                      f"step/{kind}")}
        assert curve(warm, kind) == [by_step[12], by_step[18]], kind

    # the step cost from a find-batch-size file: 256 samples' worth per worker, 2 workers
    finder = tmp_path / "find_batch_size.json"
    finder.write_text(json.dumps({"device": "cpu (test)", "step_cost_per_worker": 256.0}))
    out = run_cli("train", *common, "--set", "train.batch_size_schedule=adaptive",
                  "--set", "train.batch_size_interval=4",
                  "--set", f"train.batch_size_throughput={finder}", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr[-3000:]
    adapt = json.loads((tmp_path / "a" / "result.json").read_text())
    assert f"(step cost 512 samples from {finder})" in out.stdout
    params = client.get_run(adapt["mlflow_run_id"]).data.params
    assert params["train.batch_size_step_cost"] == "512.0"
    assert params["train.batch_size_throughput"] == str(finder)
    assert curve(adapt, "batch_size_step_cost") == [512.0, 512.0]  # per epoch, as used
    sizes = curve(adapt, "step/global_batch_size")
    assert sizes[:4] == [32.0] * 4  # the unit until the first decision
    assert all(s % 32 == 0 and 32 <= s <= 256 for s in sizes[:-1])
    # Every change is to the batch of highest goodput at the noise scale it names (c = 512,
    # units of 32 up to 256; the scale is printed rounded, hence the half either side), and the
    # step it names trains at that batch.
    from pipeline.engine.batch_schedule import best_units

    changes = [tuple(map(int, m.groups())) for m in re.finditer(
        r"\[pipeline\] batch size (\d+) -> (\d+) at step (\d+) \(noise scale (\d+) samples\)",
        out.stdout)]
    assert changes and len(set(sizes)) > 1
    for _, after, step, phi in changes:
        assert after in {32 * best_units(p, 32, 8, 512.0) for p in (phi - 0.5, phi + 0.5)}
        if step < len(sizes):  # (an epoch's last step takes the units left)
            assert sizes[step - 1] == after, (step, after)
    assert curve(adapt, "samples")[-1] == sum(sizes)
