"""Real parts, one of each per pytest session: a Ray cluster started with `ray start --head`
on this machine (token auth on, with a token of the session's own), and an `mlflow server` on
127.0.0.1 with a sqlite backend. Tests that need them ask for the fixtures; pure engine and
data tests start nothing."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.servers import free_port, start_mlflow_server, stop_mlflow_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def session_token() -> Path | None:
    """Token authentication on, for the session's cluster and every client: RAY_AUTH_MODE=token,
    and a token of this session's own (RAY_AUTH_TOKEN_PATH) unless the environment names one.
    `ray start` enables token auth only when a token already exists (~/.ray/auth_token, which
    a local `ray.init()` or `ray get-auth-token --generate` writes); with RAY_AUTH_MODE=token and
    no token it refuses to start -- so on a fresh machine the suite brings its own, and never
    writes into ~/.ray. Set before any test module imports ray (Ray reads both once per process).
    Returns the token's directory (removed at the end of the session) or None."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    d = Path(tempfile.mkdtemp(prefix="pytest-ray-token-"))
    token = d / "auth_token"
    token.write_text(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    return d


_TOKEN_DIR = session_token()


def pytest_unconfigure(config):
    if _TOKEN_DIR is not None:
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


# Each session fixture and the marker a test that uses it must carry, so that
# `-m "not ray and not mlflow and not slow"` (the pure tier) never starts either.
FIXTURE_MARKERS = {"ray_cluster": "ray", "mlflow_server": "mlflow"}


def marker_problems(items) -> list[str]:
    """One line per test whose markers say other than its fixtures: it uses `ray_cluster` /
    `mlflow_server` (directly or through another fixture: `item.fixturenames` is the closure)
    without the `ray` / `mlflow` marker, or carries the marker and uses no such fixture."""
    problems = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            marked = item.get_closest_marker(marker) is not None
            if fixture in used and not marked:
                problems.append(f"{item.nodeid}: uses {fixture} without @pytest.mark.{marker}")
            elif marked and fixture not in used:
                problems.append(f"{item.nodeid}: marked {marker} but does not use {fixture}")
    return problems


def pytest_collection_modifyitems(config, items):
    if problems := marker_problems(items):
        raise pytest.UsageError("markers that do not match the fixtures:\n  " + "\n  ".join(problems))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Embedded datasets are cached here for the whole session (and for subprocesses)."""
    d = tmp_path_factory.mktemp("datasets")
    os.environ["PIPELINE_DATA_DIR"] = str(d)
    return d


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, data_dir):
    """`ray start --head` on this machine; yields the env a client needs to join it."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port, dash = free_port(), free_port()
    # The cluster's `python` (a submitted job's entrypoint) is this environment's, as it is
    # when the tests run from an activated virtual environment.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--disable-usage-stats"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_ADDRESS": info["address"]})
    yield info
    import ray

    if ray.is_initialized():
        ray.shutdown()
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This pytest process joined to the session's cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"])
    return ray


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


def submit_job(cluster: dict, sub_id: str, *entrypoint: str,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """A real `ray job submit` of this repo (as the working dir) to the session's cluster,
    waiting for the job to end; the job server sets the job's RAY_ADDRESS."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin, "job", "submit", "--address", cluster["dashboard"], "--submission-id", sub_id,
           "--working-dir", str(REPO), "--", *entrypoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def job_status(cluster: dict, sub_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"]).get_job_status(sub_id).value


def run_cli(*args: str, timeout: float = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})})


def reference_job(cfg: dict, tmp_path: Path) -> dict:
    """The final checkpoint (loaded) of a stand-alone `python -m pipeline train` of a sweep's
    config `cfg` with one trial's values: its `tune` section dropped, logged to the experiment
    `<experiment>-ref` (not among the sweep's runs). What a sweep trial must end at."""
    import json

    import yaml

    from pipeline.engine.checkpoint import load_checkpoint

    ref = {k: v for k, v in cfg.items() if k != "tune"}
    ref["tracking"] = {**cfg["tracking"], "experiment": cfg["tracking"]["experiment"] + "-ref"}
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref))
    proc = run_cli("train", "--config", str(tmp_path / "ref.yaml"), "--out", str(tmp_path / "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(json.loads((tmp_path / "ref" / "result.json").read_text())["checkpoint"])


def digits_train_rows(val_fraction: float, split_seed: int) -> int:
    """Training rows of the embedded `digits` after the workers' train/validation split: the
    end-to-end tests derive their step counts from it, not from the dataset's size."""
    from pipeline.data.batches import split_train_val
    from pipeline.data.datasets import make_digits

    labels = make_digits().column("label").to_numpy()
    return len(split_train_val(len(labels), labels, val_fraction, split_seed)[0])


def cli_in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`python -m pipeline ARGV` in this process (`pipeline.cli.run`): (exit code, stdout,
    stderr). The console settings the CLI puts in the environment are undone after the test."""
    from pipeline import cli
    from pipeline.console import VERBOSE_ENV, ray_env

    for key in (VERBOSE_ENV, *ray_env(False), *ray_env(True)):
        monkeypatch.delenv(key, raising=False)
    capsys.readouterr()
    rc = cli.run(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err
