"""Every notebook runs end to end (small settings) against the session's cluster and MLflow
server, so none can rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# What each notebook leaves in NB_OUT when it ran to the end.
WRITES = {"01_train_and_review.ipynb": ["result.json"],
          "02_batch_size_sweep.ipynb": ["result.json", "trials.csv", "accuracy_vs_batch.png"],
          "03_batch_composition.ipynb": ["classes-stratified/batches.parquet",
                                         "padding-length_bucket/summary.json"],
          "04_which_batch_size.ipynb": ["find/find_batch_size.json", "constant/result.json",
                                        "adaptive/result.json"]}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS) == sorted(WRITES)


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, ray_cluster, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NB_EPOCHS", "2")
    monkeypatch.setenv("NB_BATCHES", "32,128")  # the sweep notebook: 2 trials
    monkeypatch.setenv("NB_RULES", "linear")
    monkeypatch.setenv("NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    nb = nbformat.read(path, as_version=4)
    # A cell that raises fails the test here: CellExecutionError (allow_errors is off).
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    ran = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert ran and all(c.get("execution_count") for c in ran)  # every code cell ran
    for name in WRITES[path.name]:
        assert (tmp_path / "out" / name).is_file(), name
