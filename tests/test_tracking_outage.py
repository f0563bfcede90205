"""The tracking server goes down mid-run: metric logging neither holds training up nor loses a
point -- the points wait in the buffer and reach the server when it is back; what could not be
sent by the end is counted exactly. Against a real `mlflow server` of the test's own (stopped
and restarted on the same port and store), so `slow`: it is not the session's server."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import MetricLogger
from tests.conftest import free_port, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture
def quick_http(monkeypatch):
    """MLflow's own HTTP retries (7, with backoff) would stretch every failed attempt to
    minutes; the logger retries by itself."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


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

    server = start_mlflow_server(tmp_path, port)  # back, same store
    try:
        logger.add({"val_accuracy": 0.9, "train_loss": 0.5}, step=4)
        assert logger.close(timeout_s=60) == 0
        assert not logger.unreachable
        history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "val_accuracy"))
        assert history == [(1, 0.5), (2, 0.7), (3, 0.8), (4, 0.9)]
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
