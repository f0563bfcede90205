"""`train --resume` with a config that would make another training than the one the
checkpoints belong to is refused (exit 2, one line naming the keys) before Ray starts; more
epochs, another cluster shape or validation frequency are not."""

from __future__ import annotations

import json

import pytest

from pipeline import cli
from pipeline.config import load_config
from pipeline.data.datasets import resolve
from pipeline.engine.checkpoint import save_checkpoint
from tests.conftest import REPO

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


@pytest.fixture
def started(tmp_path):
    """An --out folder as a job leaves it after its first epoch: run.json and a checkpoint."""
    cfg, _ = resolve(load_config(DIGITS, []))  # as the job stored it: resolved
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r",
                                                   "tracking_uri": "http://127.0.0.1:9",
                                                   "config": cfg.to_dict()}))
    save_checkpoint(tmp_path / "ray_results" / "train-x" / "checkpoint_0", {"step": 22, "epoch": 0})
    return tmp_path


@pytest.mark.parametrize("overrides, culprits", [
    (["train.seed=1"], "train.seed"),
    (["train.global_batch_size=128", "train.base_lr=0.1"], "train.base_lr, train.global_batch_size"),
    (["batching.strategy=stratified"], "batching.strategy"),
    (["model.name=mlp"], "model.name"),
])
def test_a_changed_training_is_refused(started, overrides, culprits, capsys, monkeypatch):
    def no_cluster(*_a, **_k):
        raise AssertionError("the cluster was reached")

    monkeypatch.setattr("pipeline.launch.connect", no_cluster)
    argv = ["train", "--config", DIGITS, "--out", str(started), "--resume"]
    for o in overrides:
        argv += ["--set", o]
    rc = cli.run(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if "--resume" in ln]
    assert rc == 2 and len(lines) == 1, err
    assert f"differs from the run's in {culprits} (" in lines[0]
    assert "Traceback" not in err
    assert out + err == lines[0] + "\n"  # the refusal alone: not after the run's setup lines


def test_a_resume_without_a_checkpoint_is_refused_alone(started, capsys, monkeypatch):
    """No checkpoint under the run's folder: one line, before the run's setup lines."""
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    run = json.loads((started / "run.json").read_text())
    (started / "run.json").write_text(json.dumps({**run, "checkpoints": "train-y"}))
    rc = cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out + err == f"argument error: --resume: no checkpoint under {started}/ray_results/train-y\n"


def test_more_epochs_and_another_cluster_shape_may_resume(started, capsys, monkeypatch):
    class Reached(BaseException):  # (not an Exception: the CLI prints those, exit 1)
        pass

    def cluster(*_a, **_k):
        raise Reached

    monkeypatch.setattr("pipeline.launch.connect", cluster)
    argv = ["train", "--config", DIGITS, "--out", str(started), "--resume", "--set",
            "train.epochs=20", "--set", "scaling.num_workers=1", "--set", "train.eval_every=5"]
    with pytest.raises(Reached):  # past the checks, on its way to the cluster
        cli.run(argv)
    # 4 workers with the config's micro-batch of 32 cannot split a batch of 64: the
    # micro-batch changes with them (refused before: the resume could not grow the cluster)
    with pytest.raises(Reached):
        cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume", "--set",
                 "scaling.num_workers=4", "--set", "train.micro_batch_size=16"])


def test_resume_takes_its_own_runs_checkpoints_when_the_out_folder_held_another(
        tmp_path, capsys, monkeypatch):
    """An --out used by a finished run (its checkpoints at a higher step) and then by a fresh
    one: --resume continues the fresh one from its own latest checkpoint, the folder run.json
    names, never from the older run's."""
    class Reached(BaseException):  # (not an Exception: the CLI prints those, exit 1)
        pass

    def cluster(*_a, **_k):
        raise Reached

    cfg, _ = resolve(load_config(DIGITS, []))
    older = tmp_path / "ray_results" / "run-older" / "train-a" / "checkpoint_7"
    save_checkpoint(older, {"step": 176, "epoch": 7})
    own = tmp_path / "ray_results" / "run-newer" / "train-b" / "checkpoint_1"
    save_checkpoint(own, {"step": 44, "epoch": 1})
    (tmp_path / "run.json").write_text(json.dumps({
        "mlflow_run_id": "r", "tracking_uri": "http://127.0.0.1:9", "config": cfg.to_dict(),
        "checkpoints": "run-newer"}))
    monkeypatch.setattr("pipeline.launch.connect", cluster)
    with pytest.raises(Reached):
        cli.run(["train", "--config", DIGITS, "--out", str(tmp_path), "--resume"])
    assert f"resuming from {own} (epoch 2 done)" in capsys.readouterr().err


def test_a_resume_after_the_last_epoch_ends_at_its_checkpoint_with_its_metrics(tmp_path,
                                                                               monkeypatch):
    """The job stopped after its last epoch's checkpoint (while it logged its model, say):
    --resume trains no epoch, and the run ends at that checkpoint with its metrics -- not
    with empty metrics and no checkpoint (no model logged). Training is played by a `fit`
    that, like the worker with nothing left to train, reports nothing."""
    from mlflow.tracking import MlflowClient

    from pipeline.blocks import Blocks
    from pipeline.launch import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, info = resolve(load_config(DIGITS, ["train.epochs=2", f"tracking.uri={uri}",
                                             "tracking.log_model=false"]))
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("resume-last")).info.run_id
    c.set_terminated(run_id, "KILLED")
    last = tmp_path / "out" / "ray_results" / "run-a" / "train-a" / "checkpoint_1"
    save_checkpoint(last, {"step": 44, "epoch": 1,
                           "metrics": {"epoch": 2.0, "val_accuracy": 0.97, "step": 44.0}})
    (tmp_path / "out" / "run.json").write_text(json.dumps({
        "mlflow_run_id": run_id, "tracking_uri": uri, "config": cfg.to_dict(),
        "checkpoints": "run-a"}))
    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    result = run_training(cfg, info, tmp_path / "out", resume=True,
                          table_refs=Blocks("object_store", []), fit=lambda *a: ({}, None))
    assert result["checkpoint"] == str(last)
    assert result["metrics"] == {"epoch": 2.0, "val_accuracy": 0.97, "step": 44.0}
    assert c.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_resume_that_fails_before_it_trains_leaves_its_finished_run_as_it_was(
        tmp_path, monkeypatch, stop):
    """A FINISHED run resumed for more epochs, whose ingest fails (the data's store gone, a
    Ctrl-C): the job fails, and the run stays FINISHED (its end time too) with its
    result.json, without the resume's tags -- not FAILED (or KILLED) for epochs it never began."""
    from mlflow.tracking import MlflowClient

    from pipeline.launch import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, info = resolve(load_config(DIGITS, ["train.epochs=2", f"tracking.uri={uri}"]))
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("resume-finished")).info.run_id
    c.set_terminated(run_id, "FINISHED", end_time=1_700_000_000_000)
    out = tmp_path / "out"
    save_checkpoint(out / "ray_results" / "run-a" / "train-a" / "checkpoint_1",
                    {"step": 44, "epoch": 1, "metrics": {"epoch": 2.0, "step": 44.0}})
    (out / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri,
                                              "config": cfg.to_dict(), "checkpoints": "run-a"}))
    result = json.dumps({"status": "FINISHED", "mlflow_run_id": run_id})
    (out / "result.json").write_text(result)

    def ingest(*_a, **_k):
        raise stop("the data's store went away")

    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_workers_fit", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.ingest", ingest)
    more, _ = resolve(load_config(DIGITS, ["train.epochs=3", f"tracking.uri={uri}"]))
    with pytest.raises(stop, match="store went away"):
        run_training(more, info, out, resume=True)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == 1_700_000_000_000
    assert not any(k.startswith("resumed.") for k in run.data.tags)
    assert (out / "result.json").read_text() == result


def test_a_resume_whose_run_the_store_refuses_to_continue_is_one_line(tmp_path, monkeypatch,
                                                                      capsys):
    """The store answers the lookup but refuses to make the run RUNNING again (a server that
    lets this user read, not write: its 403 is injected here, a sqlite store has no
    permissions): one line and exit 2, as a refused new run -- not MLflow's traceback."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, _ = resolve(load_config(DIGITS, ["train.epochs=2", f"tracking.uri={uri}"]))
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("resume-refused")).info.run_id
    c.set_terminated(run_id, "KILLED")
    out = tmp_path / "out"
    save_checkpoint(out / "ray_results" / "run-a" / "train-a" / "checkpoint_0",
                    {"step": 22, "epoch": 0, "metrics": {"epoch": 1.0, "step": 22.0}})
    (out / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri,
                                              "config": cfg.to_dict(), "checkpoints": "run-a"}))

    def refuse(*_a, **_k):
        raise MlflowException("Permission denied for run", error_code=PERMISSION_DENIED)

    def no_ingest(*_a, **_k):
        raise AssertionError("the data was read")

    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_workers_fit", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.reopen_run", refuse)
    monkeypatch.setattr("pipeline.launch.ingest", no_ingest)
    rc = cli.run(["train", "--config", DIGITS, "--out", str(out), "--resume",
                  "--set", f"tracking.uri={uri}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "refused to continue" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"MLflow at {uri} refused to continue run {run_id} (" in lines[0]
    assert c.get_run(run_id).info.status == "KILLED"


def test_a_resume_uses_its_runs_store_and_workers_that_stop_early_fail_it(tmp_path, monkeypatch):
    """Resumed from another working directory (the default store is ./mlflow.db), the job
    continues its run in the store run.json names. Its workers then return after epoch 2 of
    3 with no failure the driver can read (rank 0's fatal.json on another node): the run is
    FAILED, not FINISHED with epoch 2's metrics, and the result.json an earlier run left in
    --out is gone (it named a finished run; this one did not finish)."""
    from mlflow.tracking import MlflowClient

    from pipeline.blocks import Blocks
    from pipeline.launch import TrainingStopped, run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # where the job started (its working directory)
    cfg, info = resolve(load_config(DIGITS, ["train.epochs=3", "tracking.log_model=false"]))
    assert cfg.tracking.uri is None
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("resume-elsewhere")).info.run_id
    c.set_terminated(run_id, "KILLED")
    out = tmp_path / "out"
    save_checkpoint(out / "ray_results" / "run-a" / "train-a" / "checkpoint_0",
                    {"step": 22, "epoch": 0, "metrics": {"epoch": 1.0, "step": 22.0}})
    (out / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri,
                                              "config": cfg.to_dict(), "checkpoints": "run-a"}))
    (out / "result.json").write_text(json.dumps({"status": "FINISHED", "mlflow_run_id": "older"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    with pytest.raises(TrainingStopped, match="stopped after epoch 2 of 3"):
        run_training(cfg, info, out, resume=True, table_refs=Blocks("object_store", []),
                     fit=lambda *a: ({"epoch": 2.0, "step": 44.0}, None))
    assert c.get_run(run_id).info.status == "FAILED"
    assert not (out / "result.json").exists() and not any(elsewhere.iterdir())


def test_a_curriculum_resumed_with_more_epochs_keeps_its_pacing(tmp_path, capsys, monkeypatch):
    """The default pacing_epochs follows train.epochs (half of them), which a resume may
    change: the resumed run keeps the pacing it started with (written out in run.json for the
    next resume), so its pool goes on widening as it did -- pool sizes of the resumed epochs
    as the first run planned them; a resume that sets another pacing is refused."""
    from pipeline.data.batches import split_train_val
    from pipeline.data.epochs import epoch_batches
    from pipeline.files import run_state

    seq = ["data.name=sequences", "batching.strategy=curriculum",
           "batching.options.difficulty=length", "batching.options.pacing=linear"]
    first, info = resolve(load_config(None, [*seq, "train.epochs=4"]))
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r",
                                                   "tracking_uri": "http://127.0.0.1:9",
                                                   "config": first.to_dict()}))
    save_checkpoint(tmp_path / "ray_results" / "train-x" / "checkpoint_1", {"step": 9, "epoch": 1})
    from pipeline.launch import run_training

    class Reached(BaseException):  # (not an Exception: the CLI prints those, exit 1)
        pass

    def ingest(info, cfg):  # the config the job goes on with reaches the ingest: stop there
        raise Reached(cfg)

    monkeypatch.setattr("pipeline.launch.connect", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_store_reachable", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.check_workers_fit", lambda cfg: None)
    # (the run, reopened before the ingest, waits for its store elsewhere: an actor; none here)
    monkeypatch.setattr("pipeline.launch._deferred_run", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.launch.ingest", ingest)
    resumed, _ = resolve(load_config(None, [*seq, "train.epochs=8"]))
    with pytest.raises(Reached) as reached:
        run_training(resumed, info, tmp_path, resume=True)
    cfg = reached.value.args[0]
    assert cfg.train.epochs == 8 and cfg.batching.options["pacing_epochs"] == 2.0
    st = info.small
    train, _ = split_train_val(len(st), st.labels, first.data.val_fraction, first.data.split_seed)
    pools = [epoch_batches(c, st, train, e, 1).plan.pool_size
             for c, e in [(first, 2), (first, 3), (cfg, 2), (cfg, 3)]]
    assert pools[:2] == pools[2:] == [len(train)] * 2  # whole from epoch 3 (pacing 2 epochs)
    without = epoch_batches(resumed, st, train, 2, 1).plan.pool_size
    assert without < len(train)  # as it would have shrunk: pacing over 4 epochs
    assert run_state(tmp_path)["config"] == first.to_dict()  # nothing written on the way
    # The next resume (run.json then holds the config above, pacing written out) keeps it too.
    from pipeline.config import changed_keys
    from pipeline.data.epochs import keep_pacing, with_pacing

    later = keep_pacing(resolve(load_config(None, [*seq, "train.epochs=12"]))[0], cfg.to_dict())
    assert later.batching.options["pacing_epochs"] == 2.0
    assert changed_keys(with_pacing(cfg.to_dict()), later.to_dict(), ("train.epochs",)) == []

    # Another pacing set on the resume is another training: refused, naming the options.
    argv = ["train", "--out", str(tmp_path), "--resume", *[a for o in seq for a in ("--set", o)],
            "--set", "train.epochs=8", "--set", "batching.options.pacing_epochs=4"]
    assert cli.run(argv) == 2
    assert "differs from the run's in batching.options (" in capsys.readouterr().err


@pytest.mark.mlflow
@pytest.mark.parametrize("deleted", ["run", "experiment"])
def test_a_resume_of_a_run_deleted_in_mlflow_is_refused_before_the_cluster(
        started, mlflow_server, deleted, capsys, monkeypatch):
    """The run (or its experiment) deleted in the UI since: one line and exit 2 before any
    cluster work (it was MLflow's traceback, exit 1, after the data was ingested), and that
    line alone (a "resuming from ..." line came first)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_server)
    exp = c.create_experiment(f"test-resume-deleted-{deleted}")
    run_id = c.create_run(exp).info.run_id
    c.set_terminated(run_id, "FAILED")
    c.delete_run(run_id) if deleted == "run" else c.delete_experiment(exp)
    run = json.loads((started / "run.json").read_text())
    (started / "run.json").write_text(json.dumps({**run, "mlflow_run_id": run_id,
                                                  "tracking_uri": mlflow_server}))
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    rc = cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    what = f"MLflow run {run_id}" if deleted == "run" else f"the experiment of MLflow run {run_id}"
    assert rc == 2 and lines == [f"argument error: --resume: {what} is deleted in {mlflow_server}: "
                                 "restore it in the MLflow UI, or train afresh (without --resume, "
                                 "or with another --out)"]


@pytest.mark.slow  # a tracking server of its own (MLflow's basic auth), not the session's
def test_a_resume_the_store_refuses_to_look_up_names_the_refusal_not_a_missing_run(
        started, tmp_path_factory, capsys, monkeypatch):
    """Wrong credentials (401) or none on the run (403) at a server behind MLflow's basic auth:
    one line saying the server refused, exit 2, before the cluster -- it read "the run is not
    in the store ... restore it in the MLflow UI", advice that cannot help. A run that is not
    there (404, as admin) still reads so."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from tests.servers import free_port, start_mlflow_server, stop_mlflow_server

    port, admin_pw = free_port(), "adm1n-for-tests-only"
    server = start_mlflow_server(tmp_path_factory.mktemp("auth"), port, admin_password=admin_pw)
    try:
        host = f"127.0.0.1:{port}"
        c = MlflowClient(f"http://admin:{admin_pw}@{host}")
        run_id = c.create_run(c.create_experiment("owned-by-admin")).info.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_pw)
        AuthServiceClient(f"http://{host}").create_user("bob", "b0b-for-tests-only")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
        run = json.loads((started / "run.json").read_text())

        def resume(user: str, rid: str) -> tuple[int, list[str]]:
            (started / "run.json").write_text(json.dumps({**run, "mlflow_run_id": rid,
                                                          "tracking_uri": f"http://{user}@{host}"}))
            rc = cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume"])
            return rc, [ln for ln in capsys.readouterr().err.splitlines() if "--resume" in ln]

        for user, status in [("bob:b0b-for-tests-only", 403), ("bob:wrong-password", 401)]:
            rc, lines = resume(user, run_id)
            assert rc == 2 and len(lines) == 1, lines
            assert lines[0].startswith(f"argument error: --resume: MLflow at http://bob:***@{host} "
                                       f"refused the lookup of run {run_id} (") and str(status) in lines[0]
            assert "is not in" not in lines[0] and "b0b" not in lines[0] and "wrong-password" not in lines[0]
        rc, lines = resume(f"admin:{admin_pw}", "0" * 32)
        assert rc == 2 and len(lines) == 1 and f"MLflow run {'0' * 32} is not in " in lines[0]
    finally:
        stop_mlflow_server(server)


def test_a_resume_to_fewer_epochs_than_trained_is_refused(tmp_path, capsys, monkeypatch):
    """A run that has trained 5 epochs, resumed with train.epochs=3: exit 2 before the
    cluster (it started Ray and a worker group, trained nothing and said "done after 5
    epochs"); the same 5 epochs is a resume that ends at the checkpoint, as before."""
    cfg, _ = resolve(load_config(DIGITS, []))
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r",
                                                   "tracking_uri": "http://127.0.0.1:9",
                                                   "config": cfg.to_dict()}))
    save_checkpoint(tmp_path / "ray_results" / "train-x" / "checkpoint_4", {"step": 110, "epoch": 4})
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    rc = cli.run(["train", "--config", DIGITS, "--out", str(tmp_path), "--resume",
                  "--set", "train.epochs=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (
        "argument error: --resume: train.epochs=3 is fewer than the 5 epochs the run has trained "
        "(checkpoint_4): a resume goes on to more epochs (the same number ends it there)")
    from pipeline.resume import resume_point

    resumed, _ = resolve(load_config(DIGITS, ["train.epochs=5"]))
    run = json.loads((tmp_path / "run.json").read_text())
    assert resume_point(resumed, tmp_path / "ray_results", run)[1].name == "checkpoint_4"


def test_a_run_train_max_steps_stopped_resumes_only_with_a_higher_cap(tmp_path, capsys,
                                                                      monkeypatch):
    """A run that train.max_steps=22 stopped after its first epoch and finished: resumed with
    more epochs and the same cap it trained nothing and reported its checkpoint's metrics as
    the resumed run's (exit 0); refused now, naming the cap, and a higher cap (or none) goes
    on."""
    cfg, _ = resolve(load_config(DIGITS, ["train.max_steps=22"]))
    (tmp_path / "run.json").write_text(json.dumps({"mlflow_run_id": "r",
                                                   "tracking_uri": "http://127.0.0.1:9",
                                                   "config": cfg.to_dict()}))
    save_checkpoint(tmp_path / "ray_results" / "train-x" / "checkpoint_0", {"step": 22, "epoch": 0})
    (tmp_path / "result.json").write_text("{}")  # it finished (a run that stopped before, in
    # log_model say, is resumed to end at its checkpoint)
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    rc = cli.run(["train", "--config", DIGITS, "--out", str(tmp_path), "--resume",
                  "--set", "train.max_steps=22", "--set", "train.epochs=20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (
        "argument error: --resume: the run has trained 22 steps (checkpoint_0), "
        "train.max_steps=22: raise train.max_steps (or unset it) to train on")
    from pipeline.resume import relaid_schedule, resume_point

    run = json.loads((tmp_path / "run.json").read_text())
    same, _ = resolve(load_config(DIGITS, ["train.max_steps=22"]))  # unfinished: ends there
    assert resume_point(same, tmp_path / "ray_results", run)[2] == {}
    from pipeline.resume import cut_epoch

    for cap in (["train.max_steps=44"], ["train.max_steps=null"]):
        resumed, _ = resolve(load_config(DIGITS, cap))
        _, at, changed = resume_point(resumed, tmp_path / "ray_results", run)
        assert at.name == "checkpoint_0" and list(changed) == ["train.max_steps"]
        assert cut_epoch(run, at, changed) == (
            "warning: the run stopped at its train.max_steps=22 in epoch 1: it goes on from "
            "epoch 2 (what the cap left of epoch 1 is not trained)")
    cosine, _ = resolve(load_config(DIGITS, ["train.max_steps=44", "train.schedule=cosine"]))
    assert relaid_schedule(cosine, {"train.max_steps": 44}).startswith(
        "warning: train.max_steps is now 44: the cosine LR schedule is laid over the new length")


def test_a_run_its_cap_stopped_in_its_last_epoch_resumes_only_with_more_epochs(tmp_path):
    """train.epochs=2, train.max_steps=30: the cap stops the run in epoch 2 (of 22 steps
    each). A resume goes on from the next epoch's start, so one with a higher cap and the same
    epochs trained nothing and ended FINISHED at the checkpoint: refused, naming the way on;
    with more epochs it goes on."""
    from pipeline.config import ConfigError
    from pipeline.resume import resume_point

    cfg, _ = resolve(load_config(DIGITS, ["train.epochs=2", "train.max_steps=30"]))
    run = {"mlflow_run_id": "r", "config": cfg.to_dict()}
    save_checkpoint(tmp_path / "train-x" / "checkpoint_1", {"step": 30, "epoch": 1})
    for cap in ("train.max_steps=44", "train.max_steps=null"):
        higher, _ = resolve(load_config(DIGITS, ["train.epochs=2", cap]))
        with pytest.raises(ConfigError) as err:
            resume_point(higher, tmp_path, run)
        assert str(err.value) == (
            "argument error: --resume: the run stopped at its train.max_steps=30 in its last "
            "epoch (2 of 2): a resume goes on from the next epoch's start, so it would train "
            "nothing; raise train.epochs too")
    more, _ = resolve(load_config(DIGITS, ["train.epochs=3", "train.max_steps=60"]))
    assert resume_point(more, tmp_path, run)[2] == {"train.epochs": "3", "train.max_steps": "60"}
    same, _ = resolve(load_config(DIGITS, ["train.epochs=2", "train.max_steps=30"]))
    assert resume_point(same, tmp_path, run)[2] == {}  # (unfinished: ends at the checkpoint)


def test_a_resume_never_caps_the_run_below_the_steps_it_trained(tmp_path):
    """A run started with train.max_steps=200 that crashed at step 80 (not finished): a resume
    with a cap of 50 was accepted, stopped at once and reported the checkpoint as the run (its
    cap below the steps it had trained); refused now, unfinished or not. A cap above the steps
    trained (100), or the same (80, an unfinished run ends at its checkpoint), goes on."""
    from pipeline.config import ConfigError
    from pipeline.resume import resume_point

    cfg, _ = resolve(load_config(DIGITS, ["train.max_steps=200"]))
    run = {"config": cfg.to_dict()}
    storage = tmp_path / "ray_results"
    save_checkpoint(storage / "train-x" / "checkpoint_3", {"step": 80, "epoch": 3})
    lower, _ = resolve(load_config(DIGITS, ["train.max_steps=50"]))
    with pytest.raises(ConfigError, match=r"^argument error: --resume: the run has trained 80 "
                       r"steps \(checkpoint_3\), train.max_steps=50: raise train.max_steps"):
        resume_point(lower, storage, run)
    for cap in (100, 80):
        resumed, _ = resolve(load_config(DIGITS, [f"train.max_steps={cap}"]))
        assert resume_point(resumed, storage, run)[2] == {"train.max_steps": str(cap)}


@pytest.mark.parametrize(("was", "now", "said"), [
    # adaptive: each rank's share is the noise scale's small batch
    (["scaling.num_workers=2"], ["scaling.num_workers=4"], "adaptive schedule's noise scale"),
    (["scaling.num_workers=1", "train.micro_batch_size=8"],
     ["scaling.num_workers=1", "train.micro_batch_size=4"], "adaptive schedule's noise scale"),
    (["scaling.num_workers=2", "train.micro_batch_size=8"],
     ["scaling.num_workers=2", "train.micro_batch_size=4"], None),  # (2 ranks: their shares)
    # hard mining: scored in chunks of the micro-batch (global / workers when unset)
    (["batching.strategy=hard_mining", "train.micro_batch_size=16"],
     ["batching.strategy=hard_mining", "train.micro_batch_size=8"], "hard_mining scores"),
    (["batching.strategy=hard_mining", "train.micro_batch_size=null", "scaling.num_workers=2"],
     ["batching.strategy=hard_mining", "train.micro_batch_size=null", "scaling.num_workers=4"],
     "hard_mining scores"),
    (["batching.strategy=hard_mining", "train.micro_batch_size=auto", "scaling.num_workers=2"],
     ["batching.strategy=hard_mining", "train.micro_batch_size=auto", "scaling.num_workers=4"],
     "hard_mining scores"),  # (auto starts at the share, global / workers)
    (["batching.strategy=hard_mining", "train.micro_batch_size=8", "scaling.num_workers=2"],
     ["batching.strategy=hard_mining", "train.micro_batch_size=8", "scaling.num_workers=4"],
     None),  # (the same chunks on any worker count)
])
def test_a_resume_that_may_move_the_batches_says_so(was, now, said):
    """Keys a resume may change, that still move what an adaptive schedule or hard mining
    trains from there: a warning line at the resume (README: the equivalence table)."""
    from pipeline.resume import moved_batches

    sched = ["train.batch_size_schedule=adaptive", "train.batch_size_min=32",
             "train.global_batch_size=128"]
    extra = [] if any("hard_mining" in k for k in was) else sched
    before = load_config(DIGITS, [*extra, *was])
    line = moved_batches(load_config(DIGITS, [*extra, *now]), {"config": before.to_dict()})
    assert (line is None) if said is None else (line.startswith("warning: ") and said in line)
    if said is not None:  # the same config: nothing to say
        assert moved_batches(before, {"config": before.to_dict()}) is None


def test_a_run_json_of_an_earlier_version_resumes(started, monkeypatch):
    """A key added to the config since the run started is not a change: at its default (every
    run of an earlier version was refused a resume after an upgrade)."""
    from pipeline.resume import resume_point

    run = json.loads((started / "run.json").read_text())
    del run["config"]["train"]["nonfinite_limit"]
    del run["config"]["train"]["noise_scale_ema"]
    cfg, _ = resolve(load_config(DIGITS, []))
    assert resume_point(cfg, started / "ray_results", run)[2] == {}
    run["config"]["train"]["seed"] = 7  # a change is still one
    with pytest.raises(Exception, match="differs from the run's in train.seed"):
        resume_point(cfg, started / "ray_results", run)


def test_a_resume_without_the_runs_state_is_refused(started, capsys, monkeypatch):
    """Checkpoints without run.json (deleted, or ray_results/ copied into a fresh --out): the
    config the checkpoints belong to and the MLflow run are unknown. It resumed from the newest
    checkpoint of any run there, with no config check, into a new MLflow run."""
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    (started / "run.json").unlink()
    rc = cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume",
                  "--set", "train.seed=1"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out + err == (f"argument error: --resume: {started}/run.json is missing (the run's "
                         "config, MLflow run and checkpoint folder): a resume could not check "
                         "that it continues the same training; start a new run in another "
                         "--out\n")


def test_a_resume_on_changed_data_is_refused_naming_the_change(tmp_path, capsys, monkeypatch):
    """The checkpoints belong to the data the run started on: rows appended (here 30, two of
    a new class) made the resumed workers fail to load the weights in every restart (a
    traceback, exit 1) -- or, with no new class, train on another split without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import data_fingerprint, make_digits

    data = tmp_path / "d.parquet"
    table = make_digits()
    pq.write_table(table, data)
    sets = [f"data.path={data}", "data.feature_column=features"]
    cfg, info = resolve(load_config(DIGITS, sets))
    out = tmp_path / "out"
    (out / "ray_results").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({
        "mlflow_run_id": "r", "tracking_uri": "http://127.0.0.1:9", "config": cfg.to_dict(),
        "checkpoints": "", "data": data_fingerprint(info)}))
    save_checkpoint(out / "ray_results" / "train-x" / "checkpoint_0", {"step": 22, "epoch": 0})
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    extra = table.slice(0, 30)
    labels = extra.column("label").to_pylist()
    grown = pa.concat_tables([table, extra.set_column(
        extra.schema.get_field_index("label"), "label",
        pa.array([10, 10, *labels[2:]], table.schema.field("label").type))])
    pq.write_table(grown, data)
    argv = ["train", "--config", DIGITS, "--out", str(out), "--resume"]
    for o in sets:
        argv += ["--set", o]
    rc = cli.run(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"data error: --resume: the data changed since the run started: "
                          f"{len(grown)} rows ({len(table)} when the run started)"), err
    # the same files elsewhere (`ray job submit` uploads the working directory to a new place
    # on each submit) are the same data
    moved = tmp_path / "elsewhere"
    (moved / "part").mkdir(parents=True)
    pq.write_table(table, moved / "part" / "d.parquet")
    pq.write_table(table, data)
    assert data_fingerprint(resolve(load_config(DIGITS, [
        f"data.path={moved / 'part'}", "data.feature_column=features"]))[1]) == \
        data_fingerprint(info)


def test_a_resume_may_change_the_workers_of_a_step_cost_read_from_the_finders_file(
        tmp_path, monkeypatch):
    """train.batch_size_throughput's cost is the file's per-worker cost times the workers: a
    resume on another cluster shape (which it may change) refills it -- it was refused as "the
    config differs ... in train.batch_size_step_cost", a key the user never set."""
    from pipeline.resume import resume_point

    fbs = tmp_path / "find_batch_size.json"
    fbs.write_text(json.dumps({"step_cost_per_worker": 10.0}))
    sets = ["train.batch_size_schedule=adaptive", "train.batch_size_min=32",
            "train.global_batch_size=256", f"train.batch_size_throughput={fbs}"]
    before, _ = resolve(load_config(DIGITS, [*sets, "scaling.num_workers=2"]))
    now, _ = resolve(load_config(DIGITS, [*sets, "scaling.num_workers=4"]))
    assert (before.train.batch_size_step_cost, now.train.batch_size_step_cost) == (20.0, 40.0)
    storage = tmp_path / "ray_results"
    save_checkpoint(storage / "train-x" / "checkpoint_0", {"step": 8, "epoch": 0})
    cfg, _, changed = resume_point(now, storage, {"config": before.to_dict()})
    assert cfg.scaling.num_workers == 4 and set(changed) == {"scaling.num_workers",
                                                            "train.batch_size_step_cost"}
    # the file measured again meanwhile (another c per worker): c would change mid-run
    fbs.write_text(json.dumps({"step_cost_per_worker": 12.0}))
    remeasured, _ = resolve(load_config(DIGITS, [*sets, "scaling.num_workers=4"]))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"differs from the run's in train.batch_size_step_cost"):
        resume_point(remeasured, storage, {"config": before.to_dict()})


@pytest.mark.parametrize("resumed", [False, True])
def test_a_local_store_on_several_nodes_is_refused_naming_where_it_came_from(resumed, monkeypatch):
    """The refusal names the store's source (the default store, MLFLOW_TRACKING_URI, or the
    resumed run's run.json), and on a resume does not advise a tracking.uri a resume refuses."""
    from pipeline import launch
    from pipeline.config import DEFAULT_STORE, ConfigError

    two = [{"Alive": True, "Resources": {"CPU": 2.0}}] * 2  # (ray.nodes() of two nodes)
    monkeypatch.setattr(launch.ray, "nodes", lambda: two)
    source = "/out/run.json: tracking_uri" if resumed else DEFAULT_STORE
    with pytest.raises(ConfigError) as err:
        launch.check_store_reachable("sqlite:////x/mlflow.db", source, resumed=resumed)
    line = str(err.value)
    assert line.startswith(f"config error: {source}{'=' if resumed else ' '}sqlite:////x/mlflow.db "
                           "is a local store but the cluster has 2 nodes")
    assert ("resume it on one node" in line) == resumed
    assert ("set tracking.uri" in line) != resumed
    cfg = load_config(DIGITS, [])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.tracking_source() == DEFAULT_STORE
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:5000")
    assert cfg.tracking_source() == "MLFLOW_TRACKING_URI"
    assert cfg.with_overrides({"tracking.uri": "http://h:1"}).tracking_source() == "tracking.uri"


def test_a_resume_whose_sqlite_store_is_gone_is_refused_before_the_cluster(started, capsys,
                                                                           monkeypatch):
    """run.json names a sqlite store whose file was moved or deleted: one line, exit 2, before
    Ray -- and no empty store made in its place (MLflow made one, then failed on the run after
    the cluster work: a traceback, exit 1; the next try was refused as "not in its store")."""
    monkeypatch.setattr("pipeline.launch.connect", lambda *_a, **_k: pytest.fail("connected"))
    store = started / "mlflow.db"
    run = json.loads((started / "run.json").read_text())
    (started / "run.json").write_text(json.dumps({**run, "tracking_uri": f"sqlite:///{store}"}))
    rc = cli.run(["train", "--config", DIGITS, "--out", str(started), "--resume"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out + err == (f"argument error: --resume: MLflow run r is in sqlite:///{store}, and "
                         "that database file is missing (moved or deleted?)\n")
    assert not store.exists()


@pytest.mark.parametrize("command", ["train", "inspect-batches"])
def test_a_job_refused_at_the_cluster_leaves_no_out_folder(command, tmp_path, capsys, monkeypatch):
    """Bad input found on connecting (no cluster to join, say) is refused as any other: one
    line, exit 2, and nothing left behind -- the --out folder was made before."""
    from pipeline.config import ConfigError

    def refused(*_a, **_k):
        raise ConfigError("config error: no Ray cluster to join at auto")

    monkeypatch.setattr("pipeline.launch.connect", refused)
    out = tmp_path / "new" / "run"
    rc = cli.run([command, "--config", DIGITS, "--out", str(out), "--set",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert rc == 2 and capsys.readouterr().err == "config error: no Ray cluster to join at auto\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resume_on_data_written_again_at_the_same_size_is_refused(tmp_path):
    """Two labels swapped and the file written again: the same size, rows and facts -- the
    listing saw nothing -- but the small columns the checks read differ."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import data_change, data_fingerprint, make_digits

    data = tmp_path / "d.parquet"
    table = make_digits()
    plain = {"compression": "none", "use_dictionary": False}  # (a swap keeps the size exact)
    pq.write_table(table, data, **plain)
    sets = [f"data.path={data}", "data.feature_column=features"]
    before = data_fingerprint(resolve(load_config(DIGITS, sets))[1])
    labels = table.column("label").to_pylist()
    i = next(k for k in range(1, len(labels)) if labels[k] != labels[0])
    labels[0], labels[i] = labels[i], labels[0]
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array(labels, table.schema.field("label").type)), data,
                   **plain)
    now = data_fingerprint(resolve(load_config(DIGITS, sets))[1])
    assert now["files"] == before["files"] and now["rows"] == before["rows"]
    assert data_change(before, now) == ("its ids, labels, lengths or difficulties differ (the "
                                        "same files and sizes: written again)")
    assert data_change(before, {k: v for k, v in now.items() if k != "small"}) is None  # (old)
