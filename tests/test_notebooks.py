"""Every notebook runs end to end (small settings) against the session's cluster and MLflow
server, so none can rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, ray_cluster, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NB_EPOCHS", "2")
    monkeypatch.setenv("NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert os.path.exists(tmp_path / "out" / "result.json")
