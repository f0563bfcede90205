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


def _commands(cluster) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cluster.get(k) or []]


def test_token_authentication_is_on_on_every_node(cluster):
    """Every node gets the token of the machine that runs `ray up` (~/.ray/auth_token), and
    every `ray start` runs with RAY_AUTH_MODE=token: Ray 2.60's `ray start` turns token auth on
    by itself only for a head that finds a token (ray/scripts/scripts.py calls
    `maybe_enable_token_auth_if_token_available` on the head's path alone), so a worker started
    without it cannot join a head that has it. Nothing may turn the mode off."""
    text = yaml.safe_dump(cluster)
    import re

    assert set(re.findall(r"RAY_AUTH_MODE=(\S+)", text)) == {"token"} and "auth-mode" not in text
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in (REPO / "cluster.yaml").read_text()
    starts = [c for c in _commands(cluster) if "ray start" in c]
    assert len(starts) == 2 and all("0.0.0.0" not in c for c in starts)
    assert all(c.startswith("RAY_AUTH_MODE=token ray start ") for c in starts), starts


def test_the_job_api_is_on_the_heads_loopback_and_the_readme_says_why(cluster):
    (head,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head.split()  # the job server lives in the dashboard
    readme = (REPO / "README.md").read_text()
    assert "CVE-2023-48022" in readme and "ray dashboard cluster.yaml" in readme
