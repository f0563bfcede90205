"""Faults injected on the session's real Ray cluster: a training worker, or the driver, killed
by its pid in the middle of a job. Ray Train restarts the worker group from the latest checkpoint
(`scaling.max_failures`, default 1), and since the pipeline is deterministic (batches from
(seed, epoch), LR from the step, weights and optimizer state from the checkpoint) the job ends at
exactly the weights of an uninterrupted run, with one MLflow curve point per epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.engine.checkpoint import find_latest_checkpoint, load_checkpoint
from tests.conftest import (
    REPO,
    free_port,
    job_status,
    start_mlflow_server,
    stop_mlflow_server,
)

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
EPOCHS = 6


def _train(mlflow_server: str, out, experiment: str, *more: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", DIGITS,
         "--set", f"tracking.uri={mlflow_server}", "--set", f"tracking.experiment={experiment}",
         "--set", f"train.epochs={EPOCHS}", "--set", "tracking.log_model=false",
         "--out", str(out), *more],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _train_workers(ray) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(limit=10_000, filters=[("class_name", "=", "RayTrainWorker"),
                                                ("state", "=", "ALIVE")])]


@pytest.fixture(scope="module")
def reference(ray_cluster, mlflow_server, tmp_path_factory):
    """The same job, uninterrupted: its result.json."""
    out = tmp_path_factory.mktemp("reference")
    ref = _train(mlflow_server, out, "test-fault-ref")
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    return json.loads((out / "result.json").read_text())


def _wait_for_first_checkpoint(job: subprocess.Popen, out) -> None:
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(out / "ray_results") is None:  # epoch 1 saved
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)


def _same_weights(result: dict, reference: dict) -> None:
    want, got = load_checkpoint(reference["checkpoint"]), load_checkpoint(result["checkpoint"])
    assert got["epoch"] == want["epoch"] == EPOCHS - 1 and got["step"] == want["step"]
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())


def test_a_worker_killed_mid_job_restarts_from_the_checkpoint_to_the_same_weights(
        ray_client, mlflow_server, reference, tmp_path):

    job = _train(mlflow_server, tmp_path / "faulty", "test-fault-kill")
    # The driver's "epoch 1:" line comes from Ray Train's controller after it registered the
    # epoch's checkpoint: from then on a restart has a checkpoint to start from.
    seen = []
    deadline = time.monotonic() + 300
    while not any(line.startswith("[pipeline] epoch 1:") for line in seen):
        assert job.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
        seen.append(job.stdout.readline())
    workers = _train_workers(ray_client)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    killed_after = load_checkpoint(find_latest_checkpoint(tmp_path / "faulty" / "ray_results"))
    out, err = job.communicate(timeout=600)
    out = "".join(seen) + out
    assert job.returncode == 0, err[-3000:]
    assert killed_after["epoch"] < EPOCHS - 1, "the job ended before the kill took effect"
    # from a checkpoint, not from the start (which would reach the same weights too)
    restarts = re.findall(r"restarted after a failure: from the checkpoint of epoch (\d+)",
                          out + err)
    assert len(restarts) == 1 and 1 <= int(restarts[0]) <= killed_after["epoch"] + 1, out + err

    result = json.loads((tmp_path / "faulty" / "result.json").read_text())
    _same_weights(result, reference)
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(result["mlflow_run_id"], "train_loss")
    assert sorted({m.step for m in history}) == list(range(1, EPOCHS + 1))
    # An epoch logged before the kill and trained again after it (the kill came before Ray
    # registered its checkpoint) is logged twice, with the same value, and marked.
    again = sorted(m.step for m in history)
    again = sorted({s for s in again if again.count(s) > 1})
    tag = client.get_run(result["mlflow_run_id"]).data.tags.get("relogged_epochs")
    assert (tag is None) if not again else set(map(int, tag.replace(";", ",").split(","))) == set(again)
    assert all(epoch > int(restarts[0]) for epoch in again)  # only epochs after the checkpoint
    ref_loss = {m.step: m.value
                for m in client.get_metric_history(reference["mlflow_run_id"], "train_loss")}
    assert {m.step: m.value for m in history} == ref_loss  # the same curve, point for point,
    assert all(m.value == ref_loss[m.step] for m in history)  # an epoch logged twice alike
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"


def test_a_driver_killed_mid_job_resumes_in_the_same_run_to_the_same_weights(
        ray_client, mlflow_server, reference, tmp_path):
    """The driver SIGKILLed (its Ray job ends with it, workers and all): `--resume` continues
    from the latest checkpoint in the same MLflow run, which ends FINISHED at the weights of an
    uninterrupted run."""
    job = _train(mlflow_server, tmp_path, "test-fault-driver")
    _wait_for_first_checkpoint(job, tmp_path)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    run_id = json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"]
    assert not (tmp_path / "result.json").exists()
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    resumed = _train(mlflow_server, tmp_path, "test-fault-driver", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id
    _same_weights(result, reference)
    assert client.get_run(run_id).info.status == "FINISHED"
    _resumed_from_its_checkpoint(err, client, run_id)


def test_ctrl_c_on_the_driver_ends_the_run_killed_and_resume_finishes_it(
        ray_client, mlflow_server, reference, tmp_path):
    """Ctrl-C (SIGINT) on the driver mid-job: exit 1 with one line saying how to go on, the
    MLflow run KILLED (not left RUNNING, never FINISHED), no result.json; `--resume` then
    finishes the same run at the weights of an uninterrupted one. (SIGTERM, as `ray job stop`
    sends, takes the same path: Ray ends the driver's wait with SystemExit either way.)"""
    job = _train(mlflow_server, tmp_path, "test-fault-sigint")
    _wait_for_first_checkpoint(job, tmp_path)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    run_id = json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"]
    assert job.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if "training interrupted" in ln]
    assert lines == [f"[pipeline] training interrupted; MLflow run {run_id} KILLED; continue it "
                     f"from its last checkpoint with --resume --out {tmp_path}"], err[-3000:]
    assert not (tmp_path / "result.json").exists()
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"
    resumed = _train(mlflow_server, tmp_path, "test-fault-sigint", "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id
    _same_weights(result, reference)
    assert client.get_run(run_id).info.status == "FINISHED"
    _resumed_from_its_checkpoint(err, client, run_id)


def _resumed_from_its_checkpoint(err: str, client: MlflowClient, run_id: str) -> None:
    """The resume went on from the checkpoint it names, not from the start (which reaches the
    same weights too): every epoch logged, and none up to the checkpoint's logged twice."""
    found = re.search(r"resuming from .* \(epoch (\d+) done\)", err)
    assert found, err[-3000:]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
    assert all(steps.count(e) == 1 for e in range(1, int(found.group(1)) + 1)), steps


def test_ray_job_stop_ends_a_submitted_jobs_run_killed(ray_cluster, mlflow_server, tmp_path):
    """`ray job stop` on a job of `ray job submit`: the job server sends the entrypoint SIGTERM
    and, RAY_JOB_STOP_WAIT_TIME_S later (3 s by default), SIGKILL. In that time the driver marks
    its MLflow run KILLED and says how to go on, in the job's logs; the job ends STOPPED."""
    import uuid

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job server's own
    sub_id = f"test-stop-{uuid.uuid4().hex[:8]}"
    submitted = subprocess.run(
        [ray_bin, "job", "submit", "--no-wait", "--address", ray_cluster["dashboard"],
         "--submission-id", sub_id, "--working-dir", str(REPO), "--", "python", "jobs/train.py",
         "--config", "jobs/configs/digits.yaml", "--set", "train.epochs=40",  # outlasts the test
         "--set", "tracking.log_model=false", "--set", f"tracking.uri={mlflow_server}",
         "--set", "tracking.experiment=test-fault-job-stop", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(tmp_path / "ray_results") is None:  # epoch 1 saved
        assert job_status(ray_cluster, sub_id) in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.2)
    stop = subprocess.run([ray_bin, "job", "stop", "--address", ray_cluster["dashboard"], sub_id],
                          capture_output=True, text=True, env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert job_status(ray_cluster, sub_id) == "STOPPED"
    run_id = json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"
    assert not (tmp_path / "result.json").exists()
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(ray_cluster["dashboard"]).get_job_logs(sub_id)
    assert (f"[pipeline] training interrupted; MLflow run {run_id} KILLED; continue it from its "
            f"last checkpoint with --resume --out {tmp_path}") in logs.splitlines(), logs[-3000:]
    assert sum("training interrupted" in ln for ln in logs.splitlines()) == 1, logs[-3000:]
    # Training ended with the driver: its workers go (Ray's teardown of the job's actors: half
    # a second here, a few steps), and nothing is logged to the run after. (The job's log is no
    # witness: Ray forwards the actors' lines to it late.)
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(ray_cluster["dashboard"]).get_job_info(sub_id).job_id
    assert job_id
    deadline = time.monotonic() + 60
    while list_actors(address=ray_cluster["dashboard"], limit=10_000, filters=[
            ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", job_id)]):
        assert time.monotonic() < deadline, "the stopped job's workers still alive after 60 s"
        time.sleep(0.2)
    client = MlflowClient(mlflow_server)
    points = client.get_metric_history(run_id, "step/train_loss_step")
    time.sleep(1.0)  # (a point a dead worker's sending thread had in flight has landed by now)
    assert points and len(client.get_metric_history(run_id, "step/train_loss_step")) == len(points)


def test_a_restart_from_a_damaged_checkpoint_falls_back_to_the_same_weights(
        ray_client, mlflow_server, reference, tmp_path):
    """Every checkpoint on disk damaged (a flipped bit each), then a worker killed: the group
    Ray Train restarts finds the checkpoint it is given damaged, says so, and goes back to an
    intact one (none here: the start) instead of failing on it again and again."""
    from pipeline.engine.checkpoint import STATE_FILE

    job = _train(mlflow_server, tmp_path, "test-fault-damaged")
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "ray_results").rglob(STATE_FILE))) < 2:  # two epochs saved
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.1)
    for state in (tmp_path / "ray_results").rglob(STATE_FILE):
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 1
        state.write_bytes(bytes(data))
    os.kill(_train_workers(ray_client)[0], signal.SIGKILL)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    lines = [ln for ln in (out + err).splitlines() if "does not match its checksum" in ln]
    assert lines and "restarting from" in lines[0], (out + err)[-3000:]
    _same_weights(json.loads((tmp_path / "result.json").read_text()), reference)


def test_a_job_started_while_mlflow_is_down_logs_everything_once_it_is_back(
        ray_client, mlflow_server, reference, tmp_path):
    """No tracking server at the job's start: training starts anyway (its first checkpoint is
    written before the server exists); the server comes up on the job's URI; the job then has
    exactly one run, FINISHED, with its params and the uninterrupted run's curve."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    job = _train(uri, tmp_path / "job", "test-fault-late-mlflow")
    _wait_for_first_checkpoint(job, tmp_path / "job")
    (tmp_path / "mlflow").mkdir()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    try:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        assert "is unreachable: training starts without it" in err
        result = json.loads((tmp_path / "job" / "result.json").read_text())
        _same_weights(result, reference)
        run_id = result["mlflow_run_id"]
        assert json.loads((tmp_path / "job" / "run.json").read_text())["mlflow_run_id"] == run_id
        client = MlflowClient(uri)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("test-fault-late-mlflow").experiment_id])
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == str(EPOCHS) and "ray.job_id" in run.data.tags
        ref_loss = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(
            reference["mlflow_run_id"], "train_loss")}
        history = client.get_metric_history(run_id, "train_loss")
        assert len(history) == EPOCHS and {m.step: m.value for m in history} == ref_loss
        assert result["metrics_unsent"] == 0
    finally:
        stop_mlflow_server(server)


def test_a_tracking_outage_mid_job_loses_no_point(ray_client, mlflow_server, reference, tmp_path):
    """The job's own tracking server stopped after the first epoch and started again 8 s later
    (same port, same store): training goes on, every epoch's points arrive once, the run ends
    FINISHED with the uninterrupted run's curve."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "mlflow").mkdir()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    job = _train(uri, tmp_path / "job", "test-fault-outage")
    _wait_for_first_checkpoint(job, tmp_path / "job")
    stop_mlflow_server(server)
    time.sleep(8)
    server = start_mlflow_server(tmp_path / "mlflow", port)
    try:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        # the outage was met while the job logged (one line each way), not slept through
        said = out + err
        assert said.count("MLflow unreachable, metric points kept") == 1, said[-3000:]
        assert said.count("MLflow reachable again after") == 1, said[-3000:]
        result = json.loads((tmp_path / "job" / "result.json").read_text())
        _same_weights(result, reference)
        client = MlflowClient(uri)
        assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
        ref_loss = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(
            reference["mlflow_run_id"], "train_loss")}
        history = client.get_metric_history(result["mlflow_run_id"], "train_loss")
        assert len(history) == EPOCHS and {m.step: m.value for m in history} == ref_loss
        assert result["metrics_unsent"] == 0
    finally:
        stop_mlflow_server(server)
