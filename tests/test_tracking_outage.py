"""The tracking server goes down mid-run: metric logging neither holds training up nor loses a
point -- the points wait in the buffer and reach the server when it is back; what could not be
sent by the end is counted exactly. Against a real `mlflow server` of the test's own (stopped
and restarted on the same port and store), so `slow`: it is not the session's server."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import DeferredRun, MetricLogger, server_reachable
from tests.conftest import free_port, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture
def quick_http(monkeypatch):
    """MLflow's own HTTP retries (7, with backoff) would stretch every failed attempt to
    minutes; the logger retries by itself."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def tracking_said():
    """What pipeline.tracking logs at WARNING and above during the test, whatever the session
    did to logging: its messages, in order."""
    import logging

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    tracking_log, keep = logging.getLogger("pipeline.tracking"), Keep()
    was = (tracking_log.level, tracking_log.disabled)
    tracking_log.addHandler(keep)
    tracking_log.setLevel(logging.WARNING)
    tracking_log.disabled = False
    yield said
    tracking_log.removeHandler(keep)
    tracking_log.setLevel(was[0])
    tracking_log.disabled = was[1]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_points_logged_during_an_outage_arrive_when_the_server_is_back(tmp_path, quick_http):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("outage")).info.run_id
    logger = MetricLogger(uri, run_id, retry_s=0.2)
    logger.add({"val_accuracy": 0.5, "train_loss": 2.0}, step=1)
    logger.flush()
    _wait_for(lambda: logger.pending() == 0)

    stop_mlflow_server(server)  # the outage
    for epoch in (2, 3):
        logger.add({"val_accuracy": 0.5 + 0.1 * epoch, "train_loss": 2.0 / epoch}, step=epoch)
        logger.flush()  # returns at once: training goes on
    assert logger.pending() == 4
    _wait_for(lambda: logger.unreachable)  # an attempt failed ...
    assert logger.pending() == 4  # ... and the points were kept, not dropped
    logger.set_tags({"ray.num_nodes": "2"})  # (rank 0's placement, said during the outage)

    server = start_mlflow_server(tmp_path, port)  # back, same store
    try:
        logger.add({"val_accuracy": 0.9, "train_loss": 0.5}, step=4)
        assert logger.close(timeout_s=60) == 0
        assert not logger.unreachable
        history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "val_accuracy"))
        assert history == [(1, 0.5), (2, 0.7), (3, 0.8), (4, 0.9)]
        assert c.get_run(run_id).data.tags["ray.num_nodes"] == "2"  # kept, set once back
    finally:
        stop_mlflow_server(server)


def test_points_that_never_got_through_are_counted_exactly(tmp_path, quick_http):
    port = free_port()
    logger = MetricLogger(f"http://127.0.0.1:{port}", "no-such-run", retry_s=0.2, max_points=5)
    logger.add({"a": 1.0, "b": 2.0, "c": 3.0}, step=1)
    logger.add({"a": 1.0, "b": 2.0, "c": 3.0}, step=2)  # one over max_points: dropped, counted
    logger.flush()
    assert logger.dropped == 1 and logger.pending() == 5
    assert logger.close(timeout_s=1.0) == 6  # nothing listens on the port
    assert [(p["key"], p["step"]) for p in logger.unsent_points()] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2)]  # what was not sent, exactly


def test_a_logger_closed_giving_up_ends_its_thread_and_one_closed_waiting_keeps_trying(
        quick_http):
    """Training stopped or failed (a trial Tune stopped, in an actor that lives on): its
    logger is closed giving up, so its sending thread ends though points are left; the normal
    close keeps trying past its timeout (a job's driver waits for the points)."""
    port = free_port()
    loggers = [MetricLogger(f"http://127.0.0.1:{port}", "no-such-run", retry_s=0.1)
               for _ in range(2)]
    for logger in loggers:
        logger.add({"a": 1.0}, step=1)
    assert loggers[0].close(timeout_s=0.3, give_up=True) == 1
    assert loggers[1].close(timeout_s=0.3) == 1
    loggers[0]._thread.join(5.0)
    assert not loggers[0]._thread.is_alive() and loggers[1]._thread.is_alive()


def test_a_job_started_while_the_server_is_down_gets_its_run_when_it_is_back(tmp_path,
                                                                              quick_http,
                                                                              tracking_said):
    """The server is down when the job starts: points and tags wait; once it is up, the run is
    created (once, however often it is asked) with its params and config, then they arrive."""
    said = tracking_said
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    assert not server_reachable(uri) and server_reachable(f"sqlite:///{tmp_path}/x.db")
    deferred = DeferredRun(uri, retry_s=0.0, experiment="deferred", run_name="late",
                           params={"train.epochs": "3"}, config_yaml="train:\n  epochs: 3\n",
                           tags={"ray.job_id": "01000000"})
    logger = MetricLogger(uri, None, retry_s=0.2, run_id_source=deferred.run_id)
    assert logger.mark_relogged_epochs(0) == []  # no run yet: nothing was logged
    logger.set_tags({"ray.num_nodes": "1"})
    for epoch in (1, 2):
        logger.add({"train_loss": 1.0 / epoch}, step=epoch)
        logger.flush(wait_s=5.0)  # returns once an attempt found no run
    _wait_for(lambda: logger.unreachable)
    assert logger.run_id is None and logger.pending() == 2

    server = start_mlflow_server(tmp_path, port)
    try:
        logger.add({"train_loss": 1.0 / 3}, step=3)
        assert logger.close(timeout_s=60) == 0
        c = MlflowClient(uri)
        assert logger.run_id is not None and deferred.run_id() == logger.run_id
        created = [m for m in said if "this job's metrics go to run" in m]
        assert created == [f"MLflow is back: this job's metrics go to run {logger.run_id}"]
        # once, on the console of rank 0
        (run,) = c.search_runs([c.get_experiment_by_name("deferred").experiment_id])
        assert run.info.run_id == logger.run_id and run.info.run_name == "late"
        assert run.data.params["train.epochs"] == "3"
        assert run.data.tags["ray.job_id"] == "01000000" and run.data.tags["ray.num_nodes"] == "1"
        assert sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "train_loss")) \
            == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    finally:
        stop_mlflow_server(server)


def test_a_resume_while_the_server_is_down_continues_its_run_when_it_is_back(tmp_path,
                                                                             quick_http):
    """`--resume` of a run (KILLED when its job stopped) while the server is down: nothing
    waits for it; once the server is back the run is RUNNING again -- the same run, no second
    one -- and the points logged meanwhile arrive there."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        c = MlflowClient(uri)
        run_id = c.create_run(c.create_experiment("resumed")).info.run_id
        c.set_terminated(run_id, "KILLED")
    finally:
        stop_mlflow_server(server)
    deferred = DeferredRun(uri, retry_s=0.0, reopen=run_id)
    assert deferred.run_id() is None  # the server is away
    logger = MetricLogger(uri, None, retry_s=0.2, run_id_source=deferred.run_id)
    logger.add({"train_loss": 0.5}, step=3)
    logger.flush(wait_s=5.0)
    _wait_for(lambda: logger.unreachable)
    server = start_mlflow_server(tmp_path, port)
    try:
        logger.add({"train_loss": 0.25}, step=4)
        assert logger.close(timeout_s=60) == 0
        assert logger.run_id == run_id == deferred.run_id()
        assert c.get_run(run_id).info.status == "RUNNING"
        assert len(c.search_runs([c.get_experiment_by_name("resumed").experiment_id])) == 1
        assert sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss")) \
            == [(3, 0.5), (4, 0.25)]
    finally:
        stop_mlflow_server(server)


def test_a_store_refusing_to_make_the_experiment_says_so():
    """`experiment_id` retries the lookup when creating fails (another process may have made
    it in between); when it is still not there, the store's own refusal is raised (a 403, or
    Databricks' 400 for a name that is not a workspace path). It was an AttributeError on
    None, which the job took for an unreachable store: it trained with no run and exited 0.
    (A stand-in client: a store that refuses to make an experiment but answers lookups is not
    one this machine can run.)"""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from pipeline.tracking import experiment_id, refused

    class Refusing:
        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            raise MlflowException(f"no permission to create {name}", error_code=PERMISSION_DENIED)

    with pytest.raises(MlflowException, match="no permission to create batch-pipeline") as err:
        experiment_id(Refusing(), "batch-pipeline")
    assert refused(err.value)  # so the job refuses it as bad input (exit 2)


def test_tags_and_the_relogged_epochs_check_never_hold_up_training(quick_http):
    """A store that takes connections and never answers (a stopped VM behind a load balancer
    drops packets the same way): rank 0's tags and its relogged-epochs check, asked at the
    start of each worker attempt, are the sending thread's -- training went on at once; each
    call held it up for MLflow's request timeout (5 s here, 120 s by default), in turn."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections queue; none is ever answered
    try:
        logger = MetricLogger(f"http://127.0.0.1:{silent.getsockname()[1]}", "a-run", retry_s=0.2)
        start = time.monotonic()
        logger.mark_relogged_epochs_soon(1)
        logger.set_tags({"ray.num_nodes": "2", "ray.worker_nodes": "a,b"})
        logger.add({"train_loss": 1.0}, step=1)
        logger.flush()
        assert time.monotonic() - start < 1.0
        logger.close(timeout_s=0.2, give_up=True)
    finally:
        silent.close()


def test_tags_a_store_away_did_not_take_are_said_once_and_kept_for_its_next_points(
        quick_http, tracking_said):
    """Tags the store failed wait for the next points it takes (as before they moved to the
    sending thread): one line for the outage, not one every retry_s (1,800 an hour at 2 s)."""
    import time

    logger = MetricLogger(f"http://127.0.0.1:{free_port()}", "a-run", retry_s=0.05)
    logger.set_tags({"ray.num_nodes": "2"})
    time.sleep(1.0)  # about 20 wake-ups of the sending thread
    logger.close(timeout_s=0.2, give_up=True)
    said = tracking_said
    assert sum("tags ['ray.num_nodes'] not set yet" in line for line in said) == 1, said
    assert logger._tags == {"ray.num_nodes": "2"}  # kept
