"""cluster.yaml against Ray's own cluster-launcher schema (ray/autoscaler/ray-schema.json)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def schema():
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(schema, cluster):
    jsonschema.validate(cluster, schema)


def test_schema_check_can_fail(schema, cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_gpu_workers_autoscale_and_dashboard_stays_private(cluster):
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 < gpu["max_workers"]
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd  # reachable through `ray dashboard` only
    assert any("pip install -e ." in c for c in cluster["setup_commands"])
