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
