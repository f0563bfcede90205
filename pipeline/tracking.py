"""MLflow: one run per training job (nested under a sweep's parent run for Tune trials).

The driver creates the run, logs the whole resolved config as params, the config as an
artifact, and at the end the model and the final status (FINISHED, or FAILED on any error).
Rank 0 logs the metric curves during training through `MetricLogger`, which talks to the same
store by URI. A local sqlite store is reachable from every process of a single-node cluster;
a multi-node cluster needs a tracking server (checked by `check_store_reachable`).
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (reachable only from this node) rather than a server.

    >>> is_local_store("sqlite:////tmp/mlflow.db"), is_local_store("/tmp/mlruns")
    (True, True)
    >>> is_local_store("http://10.0.0.5:5000")
    False
    """
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another process created it between our two calls
        return c.get_experiment_by_name(name).experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(uri: str, experiment: str, *, run_name: str | None, params: dict[str, str],
              config_yaml: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create the run, log params and the config artifact; return its id."""
    c = client(uri)
    all_tags = {k: v for k, v in (tags or {}).items() if v}
    commit = git_commit()
    if commit:
        all_tags["git.commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = sorted(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=[_param(k, v) for k, v in items[i : i + 100]])
    log_text(uri, run_id, config_yaml, "config.yaml")
    return run_id


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(text)
        client(uri).log_artifact(run_id, str(p))


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status)


class MetricLogger:
    """Buffered, retrying metric logging for rank 0 (a transient store error never kills
    training: after the retries it warns and drops that batch of points)."""

    def __init__(self, uri: str, run_id: str, retries: int = 3):
        self.client, self.run_id, self.retries = client(uri), run_id, retries
        self.buffer: list[Metric] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())

    def flush(self) -> None:
        while self.buffer:
            chunk, self.buffer = self.buffer[:1000], self.buffer[1000:]
            for attempt in range(self.retries):
                try:
                    self.client.log_batch(self.run_id, metrics=chunk)
                    break
                except Exception as err:  # network or store hiccup
                    if attempt == self.retries - 1:
                        log.warning("MLflow logging failed, %d points dropped: %s", len(chunk), err)
                    else:
                        time.sleep(0.5 * 2**attempt)
