"""Deterministic failures on the workers end the job at once, through the real cluster:
non-finite training under `train.nonfinite=stop` (issue 9, hole 5)."""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import run
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


def test_nonfinite_loss_stops_the_job_failed_without_nonfinite_checkpoint(
        ray_client, mlflow_server, tmp_path, capsys):
    rc = run(["train", "--config", DIGITS, "--set", "train.base_lr=1e30", "--set", "train.epochs=3",
              "--set", "scaling.max_failures=2", "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=test-nonfinite", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if "non-finite" in ln]
    assert len(lines) == 1 and "epoch 1, step" in lines[0] and "train.nonfinite=stop" in lines[0], err
    run_id = json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FAILED"
    # the steps up to the divergence are what explains it: logged though no epoch ended
    failed_at = int(re.search(r"epoch 1, step (\d+)", lines[0]).group(1))
    steps = sorted(m.step for m in MlflowClient(mlflow_server).get_metric_history(
        run_id, "step/train_loss_step"))
    assert steps and steps == list(range(1, len(steps) + 1)) and steps[-1] <= failed_at, steps
    assert not (tmp_path / "result.json").exists()
    # It stopped within epoch 1, so no epoch ended and nothing was checkpointed (that the end of
    # an epoch never writes non-finite weights: tests/engine/test_exactness.py).
    assert not list(tmp_path.rglob("state.pt"))
    assert json.loads((tmp_path / "fatal.json").read_text())["kind"] == "nonfinite"


@pytest.mark.parametrize(("label", "line", "mode"), [
    (-1, r"negative label \(-1\)", "object_store"),  # the table's own check on the workers
    (5, r"changed since the checks: label 5, the model has 3 outputs", "object_store"),
    (5, r"label 5, the model has 3 outputs", "streaming"),  # each fetched chunk's check
])
def test_data_changed_after_the_checks_fails_at_once_with_one_line(ray_client, mlflow_server,
                                                                   tmp_path, label, line, mode):
    """The file is checked (labels 0-2: a model of 3 outputs), then changed before training: a
    data error the driver's checks could not see ends the job with the workers' one line, as
    bad input. The workers return instead of raising -- so Ray Train, which restarts only a
    raising worker group (scaling.max_failures=3 here), has nothing to retry; a raise would
    surface as its TrainingFailedError, not as this ConfigError."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError, load_config
    from pipeline.data.datasets import resolve
    from pipeline.launch import run_training

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    path = tmp_path / "data.parquet"

    def write() -> None:
        pq.write_table(pa.table({"x": list(rng.normal(size=(200, 4)).astype("float32")),
                                 "y": labels}), path)

    write()
    cfg, info = resolve(load_config(None, [
        f"data.path={path}", "data.feature_column=x", "data.label_column=y", "model.name=mlp",
        "train.epochs=1", "train.global_batch_size=32", "scaling.max_failures=3",
        f"data.mode={mode}",
        f"tracking.uri={mlflow_server}", "tracking.experiment=test-worker-input-error"]))
    assert info.facts["max_label"] == 2
    labels[7] = label
    write()
    with pytest.raises(ConfigError, match=rf"^data error: .*{line}") as err:
        run_training(cfg, info, tmp_path / "out")
    assert "\n" not in str(err.value)
    run_id = json.loads((tmp_path / "out" / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FAILED"
    assert json.loads((tmp_path / "out" / "fatal.json").read_text())["kind"] == "input"
