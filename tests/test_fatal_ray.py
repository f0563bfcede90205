"""A rank's deterministic failure reaches the driver where its --out is not on the driver's
node: each rank tells it as well as writing its file (`worker.train_func`, `launch.raise_fatal`)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.ray


def test_a_ranks_failure_told_to_the_driver_is_the_jobs_line_without_its_file(ray_client, tmp_path,
                                                                              monkeypatch):
    import pipeline.worker as worker
    from pipeline.config import ConfigError
    from pipeline.launch import Box, _told_failures, raise_fatal

    class OneRank(worker.Session):
        device, rank, world = torch.device("cpu"), 0, 1
        reported: dict | None = None

        def report(self, metrics, checkpoint_dir):
            self.reported = metrics

    def train(loop_config, session):  # its rows changed since the checks (a credential in the URI)
        raise ConfigError("data error: s3://b/d.parquet?secret_key=hunter22 changed (label 7)")

    monkeypatch.setattr(worker, "_train", train)
    box = ray_client.remote(num_cpus=0)(Box).remote()
    fatal = tmp_path / "fatal.json"  # (on the rank's node)
    session = OneRank()
    worker.train_func({"fatal_file": str(fatal), "fatal_box": box}, session)
    assert session.reported == {worker.FATAL: 1.0}
    line = "data error: s3://b/d.parquet?secret_key=*** changed (label 7)"  # masked in --out too
    assert json.loads(fatal.read_text()) == {"kind": "input", "message": line, "peer": False}
    fatal.unlink()  # not on the driver's node
    told = _told_failures(box)
    assert told == {0: {"kind": "input", "message": line, "peer": False}}
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal, None, told)
    assert str(err.value) == line
    with pytest.raises(ray_client.exceptions.RayActorError):  # the box ended once asked
        ray_client.get(box.get.remote(), timeout=30)
    raise_fatal(fatal, None, {})  # nothing told, no file: no failure
