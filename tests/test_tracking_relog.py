"""A restarted worker group (or --resume) trains again the epochs after its checkpoint; the
ones the run had already logged are marked (tag `relogged_epochs`), since MLflow keeps every
point."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import MetricLogger

pytestmark = pytest.mark.mlflow


def test_epochs_logged_before_a_restart_are_marked_when_logged_again(mlflow_server):
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("test-relog") or c.create_experiment("test-relog")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run_id = c.create_run(exp_id).info.run_id
    logger = MetricLogger(mlflow_server, run_id)
    assert logger.mark_relogged_epochs(0) == []  # a new run: nothing logged yet
    for epoch in (1, 2, 3):
        logger.add({"epoch_time_s": 0.5, "train_loss": 1.0 / epoch}, step=epoch)
    assert logger.close() == 0
    assert MlflowClient(mlflow_server).get_run(run_id).data.tags.get("relogged_epochs") is None
    restarted = MetricLogger(mlflow_server, run_id)
    assert restarted.mark_relogged_epochs(1) == [2, 3]  # restarted from epoch 1's checkpoint
    assert restarted.mark_relogged_epochs(3) == []  # --resume after the last: nothing again
    assert restarted.mark_relogged_epochs(0) == [1, 2, 3]  # a second restart, from the start
    assert c.get_run(run_id).data.tags["relogged_epochs"] == "2,3;1,2,3"
    restarted.close()


def test_a_run_half_made_is_failed_never_left_running(mlflow_server, monkeypatch):
    """The config artifact cannot be logged (the store fails between creating the run and
    completing it): `start_run` marks that run FAILED and says so; a `DeferredRun` that met it
    while the store could not even mark it marks it FAILED once its own run exists."""
    import pipeline.tracking as tracking

    def broken(*_args, **_kwargs):
        raise OSError("artifact store unreachable")

    c = MlflowClient(mlflow_server)
    args = {"run_name": "half", "params": {"train.epochs": "3"}, "config_yaml": "a: 1\n"}
    monkeypatch.setattr(tracking, "log_text", broken)
    with pytest.raises(tracking.HalfRunError, match="marked FAILED") as caught:
        tracking.start_run(mlflow_server, "test-half", **args)
    assert caught.value.failed and c.get_run(caught.value.run_id).info.status == "FAILED"

    # Ctrl-C (or SIGTERM) while the run is being made: it is KILLED, not left RUNNING (the
    # caller never got its id)
    made: list[str] = []
    create = MlflowClient.create_run

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    def recording(self, *a, **k):
        made.append(create(self, *a, **k).info.run_id)
        return c.get_run(made[-1])

    monkeypatch.setattr(tracking, "log_text", interrupted)
    monkeypatch.setattr(MlflowClient, "create_run", recording)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_run(mlflow_server, "test-half", **args)
    monkeypatch.setattr(MlflowClient, "create_run", create)
    monkeypatch.setattr(tracking, "log_text", broken)  # the store failing again, as above
    assert len(made) == 1 and c.get_run(made[0]).info.status == "KILLED"

    # the store also refuses the FAILED mark (gone), then comes back: the next attempt makes
    # the run and marks the half-made one
    deferred = tracking.DeferredRun(mlflow_server, retry_s=0.0, experiment="test-half", **args)
    monkeypatch.setattr(tracking, "end_run", lambda *_args: False)
    assert deferred.run_id() is None and len(deferred.half_made) == 1
    stuck = deferred.half_made[0]
    assert c.get_run(stuck).info.status == "RUNNING"
    monkeypatch.undo()
    run_id = deferred.run_id()
    assert run_id is not None and deferred.half_made == []
    assert c.get_run(stuck).info.status == "FAILED" and c.get_run(run_id).info.status == "RUNNING"
    assert c.get_run(run_id).data.params == {"train.epochs": "3"}


def test_points_the_server_refuses_are_counted_once_not_retried_for_ever(mlflow_server):
    """A run deleted while its job logs: the server answers 400 for its points. They are
    dropped and counted as unsent at once -- not retried every 2 s as if the server were away,
    which held every later point behind them."""
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("test-refused") or c.create_experiment("test-refused")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run_id = c.create_run(exp_id).info.run_id
    c.delete_run(run_id)
    logger = MetricLogger(mlflow_server, run_id, retry_s=0.2)
    logger.add({"train_loss": 1.0, "val_loss": 2.0}, step=1)
    logger.add({"train_loss": 0.5}, step=2)
    assert logger.close(timeout_s=30) == 3
    assert logger.pending() == 0 and logger.dropped == 3
    assert not logger.unreachable


def test_a_deleted_experiment_is_bad_input_before_any_cluster_work(mlflow_server, monkeypatch,
                                                                   tmp_path, capsys, data_dir):
    """No run can be made in an experiment deleted in the UI: `train` exits 2 with one line
    before Ray is touched; a `DeferredRun` (the store was away at the start) is refused once
    and asks no more, where it used to retry every 2 s for the whole job."""
    import pipeline.launch
    import pipeline.tracking as tracking
    from pipeline.cli import run
    from tests.conftest import REPO

    c = MlflowClient(mlflow_server)
    c.delete_experiment(c.create_experiment("test-deleted-experiment"))

    def no_cluster(*_args, **_kwargs):
        raise AssertionError("reached the cluster")

    monkeypatch.setattr(pipeline.launch, "connect", no_cluster)
    rc = run(["train", "--config", str(REPO / "jobs" / "configs" / "digits.yaml"),
              "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=test-deleted-experiment", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("config error: tracking.experiment='test-deleted-experiment' is deleted")

    deferred = tracking.DeferredRun(mlflow_server, retry_s=0.0, half_made=["0" * 32],
                                    experiment="test-deleted-experiment", run_name="late",
                                    params={}, config_yaml="a: 1\n")
    asked = []
    probe = tracking.server_reachable
    monkeypatch.setattr(tracking, "server_reachable", lambda uri: asked.append(uri) or probe(uri))
    assert deferred.run_id() is None and deferred.run_id() is None
    assert len(asked) == 1  # refused once, not asked again
    assert deferred.half_made == ["0" * 32]  # handed over by the driver, kept to mark later


def test_a_resume_sends_the_points_its_earlier_part_could_not_or_keeps_them(mlflow_server,
                                                                          tmp_path):
    """`tracking.json` of a job that ended with points unsent: a --resume sends them to the run
    before it trains on; with no run to send them to, the file is kept under its own name (a
    resume used to delete it, losing the only list of them)."""
    import json

    from pipeline.launch import _send_kept_points

    c = MlflowClient(mlflow_server)
    run_id = c.create_run(c.create_experiment("test-resume-sends")).info.run_id
    points = [{"key": "train_loss", "value": 1.0 / s, "step": s, "timestamp": 1000 + s}
              for s in (1, 2, 3)]
    unsent = tmp_path / "tracking.json"
    unsent.write_text(json.dumps({"metrics_unsent": 3, "points": points}))
    _send_kept_points(unsent, mlflow_server, run_id, park=True)
    got = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss"))
    assert got == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert not unsent.exists()
    unsent.write_text(json.dumps({"metrics_unsent": 3, "points": points}))
    _send_kept_points(unsent, mlflow_server, None, park=True)  # no run yet: kept, not dropped
    kept = list(tmp_path.glob("tracking-*.json"))
    assert not unsent.exists() and len(kept) == 1
    assert json.loads(kept[0].read_text())["points"] == points
    # What a --resume relies on (`run_training` passes park=not resume; its own path needs a
    # DeferredRun actor, not exercised here): a tracking.json that names no run, not parked,
    # stays in place and goes to the run once one exists (the job's end: `_kept_at_end`);
    # parked, it named no run and was never sent.
    kept[0].unlink()
    unsent.write_text(json.dumps({"metrics_unsent": 3, "points": points}))
    _send_kept_points(unsent, mlflow_server, None, park=False)
    assert unsent.exists() and not list(tmp_path.glob("tracking-*.json"))
    later = c.create_run(c.get_experiment_by_name("test-resume-sends").experiment_id).info.run_id
    _send_kept_points(unsent, mlflow_server, later, park=False)
    assert len(c.get_metric_history(later, "train_loss")) == 3


def test_points_kept_for_a_run_go_to_that_run_whatever_job_starts_next(mlflow_server, tmp_path):
    """A tracking.json names its run (`keep_unsent`): a fresh job in the same --out sends its
    points to that earlier run (it used to delete the file), and a file kept earlier under a
    name of its own is sent, to its run, at the next start that finds the store."""
    import json

    from pipeline.launch import _send_kept_points
    from pipeline.tracking import keep_unsent

    c = MlflowClient(mlflow_server)
    exp = c.create_experiment("test-kept-points")
    old, older = (c.create_run(exp).info.run_id for _ in range(2))
    points = [{"key": "val_loss", "value": float(s), "step": s, "timestamp": 1000 + s}
              for s in (1, 2)]
    keep_unsent(tmp_path / "tracking.json", 1, points[:1], old)  # an attempt, then a restart
    keep_unsent(tmp_path / "tracking.json", 1, points[1:], None)  # (the run not known there)
    parked = tmp_path / "tracking-20261206-000000-abcdef.json"
    parked.write_text(json.dumps({"metrics_unsent": 2, "points": points, "mlflow_run_id": older}))
    anonymous = tmp_path / "tracking-20261206-000001-abcdef.json"  # whose run is not known
    anonymous.write_text(json.dumps({"metrics_unsent": 2, "points": points}))
    _send_kept_points(tmp_path / "tracking.json", mlflow_server, None, park=True)  # a fresh job
    for run in (old, older):
        assert sorted((m.step, m.value) for m in c.get_metric_history(run, "val_loss")) == [
            (1, 1.0), (2, 2.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [anonymous.name]  # left as it was
    # A job's end: what it could send goes; the points the store refused (counted, not listed)
    # stay counted for its result.json.
    keep_unsent(tmp_path / "tracking.json", 3, points[:1], old)  # 1 listed, 2 refused
    _send_kept_points(tmp_path / "tracking.json", mlflow_server, old, park=False)
    assert json.loads((tmp_path / "tracking.json").read_text())["metrics_unsent"] == 2
    assert json.loads((tmp_path / "tracking.json").read_text())["points"] == []
    # A file kept for a run of another store (an earlier job in the --out recorded elsewhere)
    # goes to that store, not to this job's (it was refused there, and retried at every job).
    (tmp_path / "tracking.json").unlink()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    o = MlflowClient(other)
    elsewhere = o.create_run(o.create_experiment("test-kept-elsewhere")).info.run_id
    keep_unsent(tmp_path / "tracking.json", 2, points, elsewhere, other)
    _send_kept_points(tmp_path / "tracking.json", mlflow_server, None, park=True)
    assert sorted((m.step, m.value) for m in o.get_metric_history(elsewhere, "val_loss")) == [
        (1, 1.0), (2, 2.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([anonymous.name, "other.db"])


def test_a_deferred_run_the_store_cannot_complete_is_not_made_again_and_again(mlflow_server,
                                                                             monkeypatch):
    """The server up but the run's config not storable (an artifact store it cannot write):
    the half-made run is FAILED, and the deferred run stops there, where it used to make one
    more FAILED run at every try for the whole job."""
    import pipeline.tracking as tracking

    def broken(*_args, **_kwargs):
        raise OSError("artifact store not writable")

    monkeypatch.setattr(tracking, "log_text", broken)
    c = MlflowClient(mlflow_server)
    exp = c.create_experiment("test-deferred-gives-up")
    deferred = tracking.DeferredRun(mlflow_server, retry_s=0.0, experiment="test-deferred-gives-up",
                                    run_name="late", params={}, config_yaml="a: 1\n")
    assert [deferred.run_id() for _ in range(3)] == [None, None, None]
    runs = c.search_runs([exp])
    assert [r.info.status for r in runs] == ["FAILED"]  # one, not three
