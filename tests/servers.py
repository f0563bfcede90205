"""The servers the tests (and `bench/asha_vs_fifo.py`) start on this machine, without side
effects on import (tests/conftest.py sets Ray's auth mode for the test session): a free port,
a real `mlflow server` on 127.0.0.1 with a sqlite store, the addresses a process listens on."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def start_mlflow_server(root: Path, port: int, admin_password: str | None = None
                        ) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with its sqlite store and artifacts under root,
    once healthy (a restart on the same root and port finds the same runs). `admin_password`:
    with MLflow's basic auth (`--app-name basic-auth`: user `admin`, users' default permission
    none, the users' store under root too)."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(root / "server.log", "a")  # noqa: SIM115 (closed by stop_mlflow_server)
    env, auth = dict(os.environ), []
    if admin_password is not None:
        (root / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
            f"admin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
                   MLFLOW_FLASK_SERVER_SECRET_KEY="tests-only-csrf-key")
        auth = ["--app-name", "basic-auth"]
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", *auth],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env)
    proc.log = log  # type: ignore[attr-defined]

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    _wait(healthy, 90, "mlflow server")
    listening = listening_addresses(proc.pid)
    if listening != {"127.0.0.1"}:  # network tests stay on this machine
        stop_mlflow_server(proc)
        raise RuntimeError(f"mlflow server listens on {sorted(listening)}, not 127.0.0.1 alone")
    return proc


def listening_addresses(pid: int) -> set[str]:
    """The addresses a process and its children listen on (TCP)."""
    import psutil  # comes with Ray

    root, found = psutil.Process(pid), set()
    for p in (root, *root.children(recursive=True)):
        try:
            found |= {c.laddr.ip for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # a short-lived helper gone since
            pass
    return found


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a busy machine: gunicorn workers may not stop in time
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    proc.log.close()  # type: ignore[attr-defined]
