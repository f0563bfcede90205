"""Deterministic failures on the workers end the job at once, through the real cluster:
non-finite training under `train.nonfinite=stop` (issue 9, hole 5)."""

from __future__ import annotations

import json

import pytest
import torch
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
    assert not (tmp_path / "result.json").exists()
    for state_file in tmp_path.rglob("state.pt"):  # if any epoch ended, its weights were finite
        state = torch.load(state_file, weights_only=False)
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values()
                   if v.is_floating_point())
    assert json.loads((tmp_path / "fatal.json").read_text())["kind"] == "nonfinite"
