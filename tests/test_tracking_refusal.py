"""A tracking store that answers but refuses the job's run (no permission to write in the
experiment) is said before the cluster's data work: one line, exit 2, nothing ingested."""

from __future__ import annotations

import pytest

from pipeline import cli
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # (a tracking server of its own: basic auth)


def test_a_run_the_store_refuses_to_create_is_refused_before_the_ingest(
        ray_client, tmp_path_factory, tmp_path, capsys, monkeypatch):
    """Bob may read the experiment (so the lookup before the cluster passes) but not write in
    it: MLflow answers the run's creation 403. The job said so after ingesting the dataset
    (minutes for a large one); it is refused before, and no run is left behind."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from tests.servers import free_port, start_mlflow_server, stop_mlflow_server

    port, admin_pw = free_port(), "adm1n-for-tests-only"
    server = start_mlflow_server(tmp_path_factory.mktemp("auth"), port, admin_password=admin_pw)
    try:
        host = f"127.0.0.1:{port}"
        admin = MlflowClient(f"http://admin:{admin_pw}@{host}")
        experiment = admin.create_experiment("read-only-for-bob")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_pw)
        auth = AuthServiceClient(f"http://{host}")
        auth.create_user("bob", "b0b-for-tests-only")
        auth.grant_user_permission("bob", "experiment", experiment, "READ")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setattr("pipeline.launch.ingest", lambda *_a, **_k: pytest.fail("ingested"))
        rc = cli.run(["train", "--config", str(REPO / "jobs/configs/digits.yaml"),
                      "--out", str(tmp_path / "out"),
                      "--set", f"tracking.uri=http://bob:b0b-for-tests-only@{host}",
                      "--set", "tracking.experiment=read-only-for-bob"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, err
        assert err[-1].startswith(f"config error: MLflow at http://bob:***@{host} refused the run ("), err
        assert "403" in err[-1] and "b0b" not in "\n".join(err)
        assert admin.search_runs([experiment]) == []
    finally:
        stop_mlflow_server(server)
