"""The rehearsal for `cluster.yaml`, on this machine: a Ray cluster of a head and two worker
nodes (`ray.cluster_utils.Cluster`, as Ray's own tests simulate nodes; Ray's default node
address, small object stores), beside the session's one-node cluster, with the session's real
MLflow server. A 2-worker job is placed on the two worker nodes (one CPU each, none on the head)
and must train to exactly the weights and curve of the same job on one node: batches never
depend on where the ranks run. A worker node lost mid-job (its processes killed, as a crashed
machine) is survived like a killed worker once a replacement node joins, as an autoscaler
would bring one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.engine.checkpoint import find_latest_checkpoint, load_checkpoint
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
EPOCHS = 4


def _train(address: str, mlflow_server: str, out, experiment: str,
           extra: list[str] | None = None) -> subprocess.Popen:
    import os

    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", DIGITS,
         "--set", f"tracking.uri={mlflow_server}", "--set", f"tracking.experiment={experiment}",
         "--set", f"train.epochs={EPOCHS}", "--set", "tracking.log_model=false",
         *(extra or []), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": address})


def _finish(job: subprocess.Popen) -> None:
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_node(ray_cluster, mlflow_server, tmp_path_factory):
    """The reference: the job on the session's one-node cluster."""
    out = tmp_path_factory.mktemp("one-node")
    _finish(_train(ray_cluster["address"], mlflow_server, out, "test-nodes"))
    return json.loads((out / "result.json").read_text())


@pytest.fixture
def two_nodes(ray_cluster):
    """Beside the session's cluster (whose teardown's `ray stop` would also end this one)."""
    from ray.cluster_utils import Cluster

    # Dead nodes noticed in about 3 s instead of Ray's default 30 s.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000,
                                          "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def _same_training(got: dict, want: dict, client: MlflowClient) -> None:
    a, b = load_checkpoint(got["checkpoint"]), load_checkpoint(want["checkpoint"])
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == EPOCHS - 1
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())

    def curve(run_id: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}

    assert curve(got["mlflow_run_id"]) == curve(want["mlflow_run_id"])
    assert len(curve(got["mlflow_run_id"])) == EPOCHS


@pytest.mark.mlflow
def test_a_two_worker_job_on_two_nodes_trains_as_on_one(two_nodes, one_node, mlflow_server,
                                                        tmp_path):
    cluster, workers = two_nodes
    _finish(_train(cluster.address, mlflow_server, tmp_path, "test-nodes"))
    result = json.loads((tmp_path / "result.json").read_text())
    client = MlflowClient(mlflow_server)
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert tags["ray.num_nodes"] == "2"
    assert set(tags["ray.worker_nodes"].split(",")) == {w.node_id for w in workers}
    assert client.get_run(one_node["mlflow_run_id"]).data.tags["ray.num_nodes"] == "1"
    _same_training(result, one_node, client)


@pytest.mark.mlflow
def test_a_worker_node_lost_mid_job_is_survived_to_the_same_weights(two_nodes, one_node,
                                                                    mlflow_server, tmp_path):
    cluster, workers = two_nodes
    job = _train(cluster.address, mlflow_server, tmp_path, "test-nodes")
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(tmp_path / "ray_results") is None:  # epoch 1 saved
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)
    cluster.remove_node(workers[1], allow_graceful=False)
    replacement = cluster.add_node(num_cpus=1)
    _finish(job)
    result = json.loads((tmp_path / "result.json").read_text())
    client = MlflowClient(mlflow_server)
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    # The restarted group ran on the node that stayed and the replacement.
    assert set(tags["ray.worker_nodes"].split(",")) == {workers[0].node_id, replacement.node_id}
    _same_training(result, one_node, client)


@pytest.mark.mlflow
def test_a_sweeps_trials_run_on_both_nodes(two_nodes, mlflow_server, tmp_path):
    """Two 1-worker trials at a time on two 1-CPU nodes: each trial's worker takes a node."""
    import os

    import pandas as pd
    import yaml

    cluster, workers = two_nodes
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "sweep_digits.yaml").read_text())
    cfg["train"].update(epochs=6, warmup_epochs=0)
    cfg["scaling"] = {"num_workers": 1}
    cfg["tune"] = {"search_space": {"train.seed": {"grid": [0, 1]}}, "scheduler": "fifo",
                   "metric": "val_accuracy", "mode": "max", "max_concurrent": 2}
    cfg["tracking"] = {"uri": mlflow_server, "experiment": "test-nodes-sweep", "log_model": False}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "tune", "--config", str(tmp_path / "sweep.yaml"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "2 at a time" in proc.stdout + proc.stderr
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    client = MlflowClient(mlflow_server)
    nodes = [client.get_run(r).data.tags["ray.worker_nodes"] for r in trials["mlflow_run_id"]]
    assert sorted(nodes) == sorted(w.node_id for w in workers)


def test_a_local_tracking_store_is_refused_on_two_nodes(two_nodes, tmp_path):
    """One MLflow store for the whole job: a node-local sqlite store is refused (exit 2, one
    line), since each node would write its own."""
    import os

    cluster, _ = two_nodes
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", DIGITS,
         "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "local store" in ln]
    assert len(lines) == 1 and "3 nodes" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _probe(address: str, world: int, mode: str = "streaming") -> dict:
    """`tests/stream_probe.py`: the global batches `world` ranks draw in the streaming mode."""
    import os

    proc = subprocess.run([sys.executable, "-m", "tests.stream_probe", address, str(world), mode],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_global_batches_do_not_depend_on_workers_or_nodes(two_nodes, ray_cluster):
    """The streaming mode's invariance rule, through the real fetch from the blocks' nodes: 1
    rank on one node, 1 rank and 2 ranks (one per node) on two nodes draw the same global
    batches, ids and features alike; on two nodes the blocks are on both, and each rank
    fetches about its share of the rows, not the dataset."""
    cluster, workers = two_nodes
    one = _probe(ray_cluster["address"], 1)
    alone = _probe(cluster.address, 1)
    pair = _probe(cluster.address, 2)
    assert len(one["steps"]) > 2 * 20
    assert one["steps"] == alone["steps"] == pair["steps"]
    # each id's features are its own row of the data (a row gathered for another id, or
    # swapped between ranks, shows here: the steps above compare the same draw three times)
    from pipeline.data.datasets import make_digits
    from tests.stream_probe import row_digest

    table = np.asarray(make_digits().column("features").to_pylist(), np.float32)
    for step in pair["steps"]:
        assert step["rows"] == [row_digest(table[i]) for i in step["ids"]]
    # the embedded dataset's file is on the driver's machine alone (a cluster's head, with no
    # CPU for a read task here as in cluster.yaml): no other node reads it, in either mode
    assert pair["file_reads_elsewhere"] == []
    whole = _probe(cluster.address, 2, "object_store")
    assert whole["file_reads_elsewhere"] == [] and whole["steps"] == pair["steps"]
    assert sorted(pair["nodes"]) == sorted(w.node_id for w in workers)
    assert pair["block_nodes"] == sorted(w.node_id for w in workers)
    features = 64 * 4  # bytes of a digits row's features (the only large column)
    drawn = sum(len(s["ids"]) for s in pair["steps"])  # two epochs of training rows
    for fetched in pair["fetched"]:  # each rank its half, each row once
        assert fetched == pytest.approx(drawn / 2 * features, rel=0.02)
    assert sum(pair["fetched"]) == one["fetched"][0]


def _lose_a_node_after_epoch_1(cluster, workers, job: subprocess.Popen, out) -> Any:
    """Kill the second worker node once the job's first checkpoint is saved, and add a
    replacement node, as an autoscaler would; return the replacement."""
    deadline = time.monotonic() + 300
    while find_latest_checkpoint(out / "ray_results") is None:  # epoch 1 saved
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)
    cluster.remove_node(workers[1], allow_graceful=False)
    return cluster.add_node(num_cpus=1)


@pytest.mark.mlflow
def test_a_node_lost_in_streaming_mode_is_survived_to_the_same_weights(
        two_nodes, one_node, mlflow_server, tmp_path):
    """`data.mode=streaming` on two nodes: the blocks are spread over both. A lost node takes
    its share of the blocks with it; Ray Train restarts the worker group (on the node that
    stayed and the replacement), whose ranks find the lost blocks read again from the Parquet
    data (the keeper says so), and the job ends at the weights and curve of the object-store
    job on one node, each rank receiving its rows every epoch."""
    cluster, workers = two_nodes
    job = _train(cluster.address, mlflow_server, tmp_path, "test-nodes",
                 ["--set", "data.mode=streaming"])
    replacement = _lose_a_node_after_epoch_1(cluster, workers, job, tmp_path)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    assert "data: streaming mode" in err and "over 2 node(s)" in err
    assert "block(s) of 1 lost node(s) read again from the Parquet data" in out + err, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    client = MlflowClient(mlflow_server)
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert set(tags["ray.worker_nodes"].split(",")) == {workers[0].node_id, replacement.node_id}
    _same_training(result, one_node, client)
    fetched = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"],
                                                                   "data_fetched_mib")}
    assert sorted(fetched) == list(range(1, EPOCHS + 1)) and min(fetched.values()) > 0


@pytest.mark.mlflow
def test_a_node_lost_in_streaming_mode_without_a_restart_ends_the_job_and_resume_finishes_it(
        two_nodes, one_node, mlflow_server, tmp_path):
    """The same loss with `scaling.max_failures=0`: the job ends (exit 1, its line saying why,
    the run FAILED), and `--resume` on the cluster as it is now reads the data again and
    finishes the run at the same weights."""
    cluster, workers = two_nodes
    job = _train(cluster.address, mlflow_server, tmp_path, "test-nodes",
                 ["--set", "data.mode=streaming", "--set", "scaling.max_failures=0"])
    _lose_a_node_after_epoch_1(cluster, workers, job, tmp_path)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 1, err[-3000:]
    # the job's own line (the failed ranks' tracebacks, forwarded by Ray, may come after it)
    lines = [ln for ln in err.splitlines()
             if ln.startswith("data lost: a node holding part of the dataset is gone")]
    assert len(lines) == 1, err[-3000:]
    assert "scaling.max_failures=0" in lines[0] and "--resume" in lines[0]
    run_id = json.loads((tmp_path / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FAILED"
    resumed = _train(cluster.address, mlflow_server, tmp_path, "test-nodes",
                     ["--set", "data.mode=streaming", "--set", "scaling.max_failures=0",
                      "--resume"])
    _finish(resumed)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id
    _same_training(result, one_node, client)
