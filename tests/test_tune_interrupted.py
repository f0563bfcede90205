"""Sweeps and faults. A sweep whose driver is killed (SIGKILL), or stopped (Ctrl-C, SIGTERM: its
runs KILLED, exit 1), after its first trial finished and while its second was training:
`--resume` runs the unfinished trials only. The finished
trial is not run again (its folder and MLflow run untouched); the interrupted one continues its
own MLflow run from its last epoch checkpoint, to the weights of a run never interrupted (the
pipeline is deterministic); the sweep ends with one FINISHED run per trial. And a trial whose
actor is killed is run again by Tune, to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.engine.checkpoint import find_latest_checkpoint, load_checkpoint
from tests.conftest import REPO, reference_job, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]
EPOCHS = 5
LRS = [0.05, 0.025, 0.0125]  # three trials, one at a time


def _trial_dirs(out) -> list:
    return sorted((out / "trials").glob("*/*"), key=lambda p: p.stat().st_ctime)


def _start_sweep(tmp_path, mlflow_server: str, experiment: str, lrs: list[float],
                 runner: str = "auto"):
    """`python -m pipeline tune` over `lrs` (one trial at a time), started, not waited for."""
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "sweep_digits.yaml").read_text())
    cfg["train"].update(epochs=EPOCHS, warmup_epochs=0)
    cfg["tune"] = {"search_space": {"train.base_lr": {"grid": lrs}}, "scheduler": "fifo",
                   "max_concurrent": 1, "metric": "val_accuracy", "mode": "max",
                   "trial_runner": runner}
    cfg["tracking"] = {"uri": mlflow_server, "experiment": experiment, "log_model": False}
    config, out = tmp_path / "sweep.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(cfg))
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--config", str(config),
                              "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    return cfg, config, out, sweep


def _ends_where_a_job_ends(cfg: dict, lr: float, result: dict, tmp_path) -> None:
    """The trial's final weights are those of an uninterrupted job with its config."""
    want = reference_job({**cfg, "train": {**cfg["train"], "base_lr": lr}}, tmp_path)
    got = load_checkpoint(result["checkpoint"])
    assert got["step"] == want["step"]
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["SIGKILL", "Ctrl-C", "SIGTERM"])
def test_a_stopped_sweep_resumes_its_unfinished_trials_only(ray_cluster, mlflow_server, tmp_path,
                                                            sig):
    """Killed outright (SIGKILL), the sweep marks nothing. Stopped by Ctrl-C (Tune's own graceful
    stop) or SIGTERM (as `ray job stop` sends), it exits 1 with one line saying how to go on,
    its parent run and the interrupted trial's run KILLED (never FINISHED: Tune returns from a
    Ctrl-C as if the sweep were done). After SIGKILL and Ctrl-C `--resume` finishes it (not
    repeated after SIGTERM, which leaves Tune's state as SIGKILL does)."""
    experiment = f"test-sweep-{sig.name.lower()}"
    cfg, config, out, sweep = _start_sweep(tmp_path, mlflow_server, experiment, LRS)
    deadline = time.monotonic() + 400
    while True:  # the first trial done, the second one past its first epoch
        dirs = _trial_dirs(out) if (out / "trials").exists() else []
        if (len(dirs) >= 2 and (dirs[0] / "result.json").exists()
                and find_latest_checkpoint(dirs[1] / "ray_results") is not None):
            break
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[1][-3000:]
        time.sleep(0.2)
    sweep.send_signal(sig)
    _, err = sweep.communicate(timeout=60)
    first, second = dirs[0], dirs[1]
    client = MlflowClient(mlflow_server)
    if sig != signal.SIGKILL:
        state = json.loads((out / "sweep.json").read_text())
        assert sweep.returncode == 1, err[-3000:]
        assert [ln for ln in err.splitlines() if "interrupted" in ln] == [
            f"[pipeline] sweep {state['name']} interrupted; continue it with --resume --out {out}"]
        assert not (out / "result.json").exists()
        assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
        second_id = json.loads((second / "run.json").read_text())["mlflow_run_id"]
        assert client.get_run(second_id).info.status == "KILLED"
    if sig == signal.SIGTERM:
        return  # what --resume finds is as after SIGKILL: Tune's state, saved every second
    first_result = (first / "result.json").read_text()
    killed_at = load_checkpoint(find_latest_checkpoint(second / "ray_results"))["epoch"]
    assert not (second / "result.json").exists() and killed_at < EPOCHS - 1
    second_state = json.loads((second / "run.json").read_text())
    second_run, second_lr = second_state["mlflow_run_id"], second_state["config"]["train"]["base_lr"]
    first_run = json.loads(first_result)["mlflow_run_id"]
    first_end = client.get_run(first_run).info.end_time

    resumed = run_cli("tune", "--config", str(config), "--out", str(out), "--resume", timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert (first / "result.json").read_text() == first_result  # not run again
    assert client.get_run(first_run).info.end_time == first_end
    assert len(_trial_dirs(out)) == len(LRS)
    result = json.loads((second / "result.json").read_text())
    assert result["mlflow_run_id"] == second_run  # its own run, continued
    _continued_from_its_checkpoint(client, second_run, killed_at + 1)

    parent = json.loads((out / "result.json").read_text())["parent_run_id"]
    exp = client.get_experiment_by_name(experiment).experiment_id
    nested = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(nested) == len(LRS) and {r.info.status for r in nested} == {"FINISHED"}
    assert client.get_run(parent).info.status == "FINISHED"

    _ends_where_a_job_ends(cfg, second_lr, result, tmp_path)


@pytest.mark.parametrize("runner", ["auto", "worker_group"])
def test_a_trial_whose_actor_is_killed_runs_again_to_the_same_weights(ray_client, mlflow_server,
                                                                       tmp_path, runner):
    """A trial's Tune actor SIGKILLed after the first epoch -- the one-worker trial trains in
    it (`auto`), or it waits on the trial's TorchTrainer, which goes with it (`worker_group`):
    Tune runs the trial again (`scaling.max_failures`, default 1), which continues its MLflow
    run from its checkpoint to the weights of a job never interrupted."""

    cfg, _, out, sweep = _start_sweep(tmp_path, mlflow_server, f"test-sweep-actor-killed-{runner}",
                                      LRS[:1], runner)
    deadline = time.monotonic() + 400
    while not ((out / "trials").exists() and any(
            find_latest_checkpoint(d / "ray_results") is not None for d in _trial_dirs(out))):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[1][-3000:]
        time.sleep(0.2)
    (trial,) = _trial_dirs(out)
    run_id = json.loads((trial / "run.json").read_text())["mlflow_run_id"]
    # Tune's actor for a function trainable: the trial's run_training runs in it, and its
    # run.json names its process (`launch.this_driver`) -- at once, where the state API's
    # list of live actors came back empty in a whole session's CI run
    actor_pid = json.loads((trial / "run.json").read_text())["driver"]["pid"]
    os.kill(actor_pid, signal.SIGKILL)
    killed_at = load_checkpoint(find_latest_checkpoint(trial / "ray_results"))["epoch"]
    stdout, stderr = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, (stdout + stderr)[-4000:]
    assert killed_at < EPOCHS - 1, "the trial ended before the kill took effect"
    # run again, in another process (a trial never interrupted would pass every check below)
    assert json.loads((trial / "run.json").read_text())["driver"]["pid"] != actor_pid

    result = json.loads((trial / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id  # its own run, continued
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    _continued_from_its_checkpoint(client, run_id, killed_at + 1)
    _ends_where_a_job_ends(cfg, LRS[0], result, tmp_path)


def _continued_from_its_checkpoint(client: MlflowClient, run_id: str, done: int) -> None:
    """The trial went on from its checkpoint (`done` epochs), not from the start (the same
    weights either way): every epoch logged, none of the first `done` twice."""
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
    assert all(steps.count(e) == 1 for e in range(1, done + 1)), (done, steps)
