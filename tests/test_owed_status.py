"""A run its job could not mark ended (the store away at the job's end) is not left RUNNING
for good: the status is kept in --out and the next job there marks it; MLflow's client
retries are the pipeline's bounded default (a user's own setting stands), and none in rank 0's
process, whose logger retries on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import launch, tracking
from tests.conftest import REPO, free_port


def _run(uri: str) -> str:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("owed")
    return c.create_run(exp.experiment_id if exp else c.create_experiment("owed")).info.run_id


def test_a_status_the_store_did_not_take_is_kept_and_marked_by_the_next_job(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv(tracking.RETRIES, "0")  # (the closed port: refused at once)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _run(uri)
    away = f"http://127.0.0.1:{free_port()}"
    assert not launch._end(tmp_path, away, run, "FINISHED")
    owed = json.loads((tmp_path / launch.OWED).read_text())
    assert owed == {run: {"status": "FINISHED", "tracking_uri": away}}
    # the next job: its store still away, the status stays owed; back, it is marked
    launch._end_owed_runs(tmp_path, None)
    assert json.loads((tmp_path / launch.OWED).read_text()) == owed
    (tmp_path / launch.OWED).write_text(json.dumps({run: {"status": "FINISHED",
                                                          "tracking_uri": uri}}))
    launch._end_owed_runs(tmp_path, None)
    assert MlflowClient(uri).get_run(run).info.status == "FINISHED"
    assert not (tmp_path / launch.OWED).exists()
    # a --resume of the run whose status was owed ends it itself: the entry goes, unmarked
    resumed = _run(uri)
    (tmp_path / launch.OWED).write_text(json.dumps({resumed: {"status": "FAILED",
                                                              "tracking_uri": uri}}))
    launch._end_owed_runs(tmp_path, resumed)
    assert MlflowClient(uri).get_run(resumed).info.status == "RUNNING"
    assert not (tmp_path / launch.OWED).exists()
    # a run finished since (a --resume that finished it, elsewhere) keeps its status: the
    # entry goes, unmarked; one KILLED takes a FINISHED owed (a resume that trained to its end
    # while the store was away, the run not made RUNNING again)
    MlflowClient(uri).set_terminated(resumed, "FINISHED")
    (tmp_path / launch.OWED).write_text(json.dumps({resumed: {"status": "FAILED",
                                                              "tracking_uri": uri}}))
    launch._end_owed_runs(tmp_path, None)
    assert MlflowClient(uri).get_run(resumed).info.status == "FINISHED"
    assert not (tmp_path / launch.OWED).exists()
    MlflowClient(uri).set_terminated(run, "KILLED")
    (tmp_path / launch.OWED).write_text(json.dumps({run: {"status": "FINISHED",
                                                          "tracking_uri": uri}}))
    launch._end_owed_runs(tmp_path, None)
    assert MlflowClient(uri).get_run(run).info.status == "FINISHED"
    assert not (tmp_path / launch.OWED).exists()


def test_a_fresh_job_marks_the_run_an_earlier_killed_driver_left_running_and_nothing_else(
        tmp_path):
    """A driver killed outright (SIGKILL) marks nothing; a fresh job in its --out overwrites
    run.json, the only file naming that run: it is marked KILLED then (else RUNNING for good),
    where its driver is known gone. A run that ended keeps its status, and the run the job
    continues (a sweep trial run again by Tune) is not touched, nor one whose driver runs."""
    import socket

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    left, ended = _run(uri), _run(uri)
    MlflowClient(uri).set_terminated(ended, "FAILED")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # a driver that ended
    dead = {"host": socket.gethostname(), "pid": int(gone.stdout)}

    def job_after(run: str, current: str | None, driver: dict | None = dead) -> str:
        (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": run, "tracking_uri": uri,
                                                       "driver": driver}))
        launch._end_abandoned_run(tmp_path, launch._earlier_state(tmp_path), current)
        return MlflowClient(uri).get_run(run).info.status

    assert job_after(left, current=left) == "RUNNING"
    assert job_after(ended, current=None) == "FAILED"
    # its driver still running (two jobs sharing an --out), on another host, or not known
    for alive in ({"host": socket.gethostname(), "pid": os.getpid()},
                  {"host": "another-host", "pid": dead["pid"]}, None):
        assert job_after(left, current=None, driver=alive) == "RUNNING"
    assert job_after(left, current=None) == "KILLED"
    assert not (tmp_path / launch.OWED).exists()
    (tmp_path / "run.json").write_text("{")  # a damaged one: overwritten, no error
    assert launch._earlier_state(tmp_path) == {}


def test_the_status_is_owed_before_the_store_is_asked_and_a_damaged_list_is_no_error(
        tmp_path, monkeypatch):
    """`ray job stop` kills the driver 3 s after its SIGTERM, within MLflow's retries: the
    entry is written first (and settled once the store took the status). A file that is not
    such a list raised inside the failure path, hiding the job's own error."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _run(uri)
    seen = []
    real = launch.end_run
    monkeypatch.setattr(launch, "end_run", lambda u, r, status: (
        seen.append(json.loads((tmp_path / launch.OWED).read_text())), real(u, r, status))[1])
    assert launch._end(tmp_path, uri, run, "KILLED")
    assert seen == [{run: {"status": "KILLED", "tracking_uri": uri}}]
    assert not (tmp_path / launch.OWED).exists()
    for damaged in ("[1, 2]", '"text"', '{"r": "FAILED"}', "{"):
        (tmp_path / launch.OWED).write_text(damaged)
        launch._end_owed_runs(tmp_path, None)
        assert launch._end(tmp_path, uri, run, "FAILED")


def test_mlflows_client_retries_are_bounded_and_rank_0_takes_none(monkeypatch):
    """MLflow's default (7 retries, waits doubling to 2 minutes) held a job's end about 4
    minutes per request against a server gone away."""
    code = ("import os, pipeline.tracking as t; print(os.environ[t.RETRIES]); "
            "t.no_client_retries(); print(os.environ[t.RETRIES])")
    env = {k: v for k, v in os.environ.items()
           if k not in (tracking.RETRIES, tracking.RETRIES_OURS)}
    ours = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.split()
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, tracking.RETRIES: "5"},
                            cwd=REPO, text=True, capture_output=True, check=True).stdout.split()
    assert ours == ["2", "0"] and theirs == ["5", "5"]
    # a Ray worker inherits the driver's environment, default included: still none there
    monkeypatch.setenv(tracking.RETRIES, "2")
    monkeypatch.setenv(tracking.RETRIES_OURS, "2")
    tracking.no_client_retries()
    assert os.environ[tracking.RETRIES] == "0"


def test_a_run_the_store_refuses_once_back_is_a_refusal_not_an_outage(tmp_path):
    """The store was away at the start and, back, refused the run (its experiment deleted in
    the meantime): the job said "unreachable for the whole job" and exited 0. The deferred run
    now says why it will never be made, and the job raises it as the bad input it is."""
    from pipeline.config import ConfigError
    from pipeline.tracking import DeferredRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    c.delete_experiment(c.create_experiment("gone"))
    pending = DeferredRun(uri, experiment="gone", run_name=None, params={}, config_yaml="")
    assert pending.run_id(force=True) is None and pending.run_id(force=True) is None
    refused_it, line = pending.refusal()
    assert refused_it and "deleted" in line, line
    with pytest.raises(ConfigError, match=r"refused the job's run when it was back"):
        launch.raise_refusal(pending.refusal(), uri, tmp_path / "tracking.json")


@pytest.mark.ray
def test_a_run_half_made_as_the_store_went_away_is_owed_and_marked_once_it_is_back(
        ray_client, tmp_path, monkeypatch):
    """The store goes away between creating the job's run and completing it, and stays away
    for the whole job: the half-made run (RUNNING, its id known to no later job) is owed in
    --out, and the next job there marks it FAILED once the store is back -- it was left
    RUNNING for good."""
    from pipeline.blocks import Blocks
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve
    from tests.conftest import start_mlflow_server, stop_mlflow_server

    monkeypatch.setenv(tracking.RETRIES, "0")
    port = free_port()
    (tmp_path / "store").mkdir()
    server = start_mlflow_server(tmp_path / "store", port)
    uri = f"http://127.0.0.1:{port}"
    half = _run(uri)
    gone = [server]

    def went_away(*_a, **_k):  # created the run, then the store went away
        stop_mlflow_server(gone.pop())
        raise tracking.HalfRunError(half, False, ConnectionError("connection refused"))

    monkeypatch.setattr(launch, "start_run", went_away)
    monkeypatch.setattr(launch, "connect", lambda *a, **k: None)  # (this process: joined)
    cfg, info = resolve(load_config(str(REPO / "jobs/configs/digits.yaml"),
                                    ["train.epochs=1", f"tracking.uri={uri}",
                                     "tracking.log_model=false"]))
    out = tmp_path / "out"
    launch.run_training(cfg, info, out, table_refs=Blocks("object_store", []),
                        fit=lambda *a: ({"epoch": 1.0, "step": 22.0}, None))
    assert json.loads((out / launch.OWED).read_text()) == {
        half: {"status": "FAILED", "tracking_uri": uri}}
    server = start_mlflow_server(tmp_path / "store", port)  # back, the same store
    try:
        launch._end_owed_runs(out, None)  # (the next job in --out, at its start)
        assert MlflowClient(uri).get_run(half).info.status == "FAILED"
        assert not (out / launch.OWED).exists()
    finally:
        stop_mlflow_server(server)


def test_a_job_names_its_run_in_run_json_before_the_ingest(tmp_path, monkeypatch):
    """The run is in run.json before the data is read (minutes for data that outgrows a node):
    a driver killed then leaves it named there (for the next job in --out to mark KILLED), not
    RUNNING with nothing naming it. A failed ingest ends it FAILED and puts the earlier job's
    run.json back (a --resume goes on with that job), or none where there was none."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, info = resolve(load_config(str(REPO / "jobs/configs/digits.yaml"),
                                    [f"tracking.uri={uri}"]))
    seen = []

    def ingest(*_a, **_k):
        state = json.loads((tmp_path / "out" / "run.json").read_text())
        seen.append((state["mlflow_run_id"],
                     MlflowClient(uri).get_run(state["mlflow_run_id"]).info.status))
        raise RuntimeError("the data's store went away")

    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_workers_fit", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.ingest", ingest)
    monkeypatch.setattr("pipeline.launch.ray_job_tags", dict)  # (no Ray job: no cluster here)
    with pytest.raises(RuntimeError, match="store went away"):
        launch.run_training(cfg, info, tmp_path / "out")
    ((run, status),) = seen
    assert status == "RUNNING"
    assert not (tmp_path / "out" / "run.json").exists()
    assert MlflowClient(uri).get_run(run).info.status == "FAILED"
    earlier = {"mlflow_run_id": "older", "tracking_uri": uri, "config": cfg.to_dict(),
               "checkpoints": "run-older"}
    (tmp_path / "out" / "run.json").write_text(json.dumps(earlier))
    with pytest.raises(RuntimeError, match="store went away"):
        launch.run_training(cfg, info, tmp_path / "out")
    assert seen[1][0] not in (run, "older") and seen[1][1] == "RUNNING"
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == earlier
    assert MlflowClient(uri).get_run(seen[1][0]).info.status == "FAILED"


def test_a_run_made_late_is_written_into_this_jobs_run_json_only(tmp_path):
    """A job whose run is made once the store is back writes its id into run.json -- not into
    another job's that took over the same --out meanwhile (its --resume would continue this
    job's run with its own checkpoints)."""
    state = tmp_path / "run.json"
    mine = {"mlflow_run_id": None, "checkpoints": "run-a", "driver": launch.this_driver()}
    state.write_text(json.dumps(mine))
    launch._write_run_id(state, "late")
    assert json.loads(state.read_text()) == {**mine, "mlflow_run_id": "late"}
    other = {**mine, "checkpoints": "run-b", "mlflow_run_id": "theirs",
             "driver": {**mine["driver"], "pid": mine["driver"]["pid"] + 1}}
    state.write_text(json.dumps(other))
    launch._write_run_id(state, "late")
    assert json.loads(state.read_text()) == other
