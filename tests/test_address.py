"""A job with no Ray cluster to join (`python jobs/train.py`, which only joins:
`address="auto"`) is one line and exit 2, not Ray's 33-line ConnectionError traceback.

Real Ray decides that there is none: its lookup of the last `ray start` (in its temporary
folder, here an empty one) and of the GCS processes running on the machine (any Ray there would
be joined: `auto`'s legacy fallback). So this file runs before the session's cluster starts
(pytest takes the files in name order: `test_address` before the first Ray test), and is
skipped where a Ray instance is up anyway (a developer's own) -- failed in CI (`PIPELINE_CI`,
set by `.ci/run`), where none should be.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_a_job_with_no_cluster_to_join_is_one_line_and_exit_2(tmp_path):
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # (in CI, `.ci/run`, a fresh machine: no skip goes unseen)
        (pytest.fail if os.environ.get("PIPELINE_CI") else pytest.skip)(
            "a Ray instance runs on this machine: `address=auto` would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "jobs/configs/digits.yaml",
         "--set", "tracking.uri=http://127.0.0.1:9", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**env, "RAY_TMPDIR": str(tmp_path / "ray")})
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("argument error: address=auto: no Ray cluster to join ("), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
