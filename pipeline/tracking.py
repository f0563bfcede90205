"""MLflow: one run per training job (nested under a sweep's parent run for Tune trials).

The driver creates the run, logs the whole resolved config as params, the config as an
artifact, and at the end the model and the final status (FINISHED; FAILED on an error, KILLED
when stopped: Ctrl-C, `ray job stop`, a trial Tune stopped).
Rank 0 logs the metric curves during training through `MetricLogger`, which talks to the same
store by URI. A local sqlite store is reachable from every process of a single-node cluster;
a multi-node cluster needs a tracking server (checked by `check_store_reachable`).

Every MLflow client of the project is made here (`client`), and every query: the runs
(`start_run`, `DeferredRun` for a job that starts while its server is away, `end_run`), the
metrics (`MetricLogger`), the model (`log_model`), and the sweep's reads (`nested_runs`,
`metric_histories`). The sweep's report writes its parent run's summary through `client`
(`pipeline/tune/report.py`, `pipeline/tune/results.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import WORKSPACE_URIS
from pipeline.console import error_line
from pipeline.redact import redact, redact_text, secret_env_values

log = logging.getLogger(__name__)
# Ending a run on a tracking server, MLflow reads the run back to print two "View run" lines: a
# round trip per run ended, and lines in every trial's console. The pipeline prints the run and
# where it is itself (a user's own setting wins; MLflow reads it whenever a run ends).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# MLflow's client retries a request 7 times, its waits doubling up to 2 minutes: about 4
# minutes before it says a server is away, during which a job's end (its run marked, its model
# logged) or a trial's start waited without a word -- twice that where the run was then marked
# FAILED. Here 2 retries: a blip, not an outage (what a job cannot send it keeps: `keep_unsent`,
# and a run it cannot end is ended by the next job, `launch._end`). Rank 0's MetricLogger
# retries on its own and takes none (`launch._worker_entry`, which knows this default from
# RETRIES_OURS: a Ray worker inherits it). A user's own setting wins, in every process.
RETRIES, RETRIES_OURS = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "PIPELINE_MLFLOW_RETRIES"
if RETRIES not in os.environ:
    os.environ[RETRIES] = os.environ[RETRIES_OURS] = "2"


def no_client_retries() -> None:
    """For rank 0's MetricLogger, which retries on its own: no retries by MLflow's client in
    this process -- unless the user set some (`RETRIES`), which stand."""
    if os.environ.get(RETRIES) in (None, os.environ.get(RETRIES_OURS)):
        os.environ[RETRIES] = "0"


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (reachable only from this node) rather than a server.

    >>> is_local_store("sqlite:////tmp/mlflow.db"), is_local_store("/tmp/mlruns")
    (True, True)
    >>> is_local_store("http://10.0.0.5:5000"), is_local_store("databricks")
    (False, False)
    """
    if uri in WORKSPACE_URIS:  # a remote workspace
        return False
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def server_reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """Whether the tracking server at `uri` answers its /health endpoint within timeout_s (a
    local store counts as reachable). A quick probe: MLflow's own client would retry a refused
    connection for minutes before giving up."""
    if is_local_store(uri) or not uri.startswith(("http://", "https://")):
        return True
    # Through MLflow's own request: with the settings its client uses (a server certificate,
    # MLFLOW_TRACKING_INSECURE_TLS, a client certificate, a token, a URI's user:password); a
    # bare request refused a server MLflow reached, and the job recorded no run.
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(get_default_host_creds(uri.rstrip("/")), "/health", "GET",
                            max_retries=0, timeout=timeout_s, raise_on_status=False
                            ).status_code == 200
    except Exception:  # (refused, timed out, a TLS failure, a malformed URI)
        return False


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another process created it between our two calls?
        exp = c.get_experiment_by_name(name)
        if exp is None:  # no: the store refused to make it (a 403, a name it does not take)
            raise
        return exp.experiment_id


def deleted_experiment(uri: str, name: str) -> bool:
    """Whether the store at `uri` (reachable) holds experiment `name` deleted (in the UI, say),
    where no run can be created: bad input, said before any cluster work."""
    exp = client(uri).get_experiment_by_name(name)
    return exp is not None and exp.lifecycle_stage == "deleted"


def deleted_run(uri: str, run_id: str) -> str | None:
    """What keeps the run `run_id` (a --resume's, at `uri`: reachable) from being continued:
    it, or its experiment, deleted (in the UI, say), or gone; None when it can go on."""
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except Exception as err:
        if _missing(err):  # (no such run: purged, or another store)
            return f"MLflow run {run_id} is not in {redact_text(uri)} ({error_line(err)})"
        raise  # (a refused lookup too: no access to the run, say, is not its absence)
    # (deleting an experiment deletes its runs: the experiment is the one to restore)
    if c.get_experiment(run.info.experiment_id).lifecycle_stage == "deleted":
        return f"the experiment of MLflow run {run_id} is deleted in {redact_text(uri)}"
    if run.info.lifecycle_stage == "deleted":
        return f"MLflow run {run_id} is deleted in {redact_text(uri)}"
    return None


def run_status(uri: str, run_id: str) -> str | None:
    """The status of run `run_id` at `uri` (RUNNING, FINISHED, FAILED, KILLED...), or None
    when the store cannot say (unreachable, no such run): bookkeeping, never an error."""
    try:
        return client(uri).get_run(run_id).info.status
    except Exception:
        return None


def _missing(err: BaseException) -> bool:
    """Whether the store answered that what was asked for does not exist (HTTP 404; a local
    store's RESOURCE_DOES_NOT_EXIST), as opposed to refusing to say (401, 403) or failing.

    >>> from mlflow.exceptions import MlflowException
    >>> from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST
    >>> _missing(MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST))
    True
    >>> _missing(MlflowException("Permission denied", error_code=PERMISSION_DENIED))
    False
    """
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() == 404


def git_commit() -> str | None:
    """The commit of the code that runs: `PIPELINE_GIT_COMMIT` when set (a job submitted with
    `--working-dir` runs an uploaded copy without `.git`, which Ray leaves out: the submitter
    passes it in), else `git rev-parse HEAD` where the package is; None when neither knows."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"].strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(uri: str, experiment: str, *, run_name: str | None, params: dict[str, str],
              config_yaml: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create the run, log params and the config artifact; return its id. Secrets are masked
    in all three first (pipeline/redact.py)."""
    c = client(uri)
    secrets = secret_env_values()
    params = redact(params, secrets)
    config_yaml = yaml.safe_dump(redact(yaml.safe_load(config_yaml), secrets))
    all_tags = redact({k: v for k, v in (tags or {}).items() if v}, secrets)
    run_name = redact(run_name, secrets)
    commit = git_commit()
    if commit:
        all_tags["git.commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    try:
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(run_id, params=[_param(k, v) for k, v in items[i : i + 100]])
        log_text(uri, run_id, config_yaml, "config.yaml")
    except Exception as err:
        # Half made (params or config missing): no job's run. FAILED, never left RUNNING; if
        # the store is gone too, the caller holds the id to try again (HalfRunError.run_id).
        raise HalfRunError(run_id, end_run(uri, run_id, "FAILED"), err) from err
    except BaseException:  # Ctrl-C or SIGTERM while it was made: no one else knows its id
        end_run(uri, run_id, "KILLED")
        raise
    return run_id


def creation_cause(err: BaseException) -> BaseException:
    """What made `start_run` fail: the store's own error behind a `HalfRunError`."""
    return err.__cause__ if isinstance(err, HalfRunError) and err.__cause__ else err


def creation_final(err: BaseException, uri: str) -> bool:
    """Whether a failed `start_run` would fail again however often it is tried: the store
    refused it (the experiment deleted, no access), or it is up -- it marked the half-made run
    FAILED -- but cannot complete one (an artifact store it cannot write). Otherwise the store
    went away meanwhile, and the run is made when it is back."""
    return refused(creation_cause(err)) or (isinstance(err, HalfRunError) and err.failed
                                            and server_reachable(uri))


class HalfRunError(RuntimeError):
    """`start_run` created a run but could not log its params or config. `failed`: whether the
    run was marked FAILED; if not (the store went away), it is still RUNNING."""

    def __init__(self, run_id: str, failed: bool, cause: Exception):
        super().__init__(f"MLflow run {run_id} was created but not completed "
                         f"({error_line(cause)})" + ("; marked FAILED" if failed else "; still RUNNING"))
        self.run_id, self.failed = run_id, failed


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(text)
        client(uri).log_artifact(run_id, str(p))


def reopen_run(uri: str, run_id: str) -> None:
    """A run continued (a --resume, a trial run again): RUNNING again until it ends anew."""
    client(uri).update_run(run_id, status="RUNNING")


def restore_status(uri: str, run_id: str, status: str) -> bool:
    """A run reopened by a resume that never trained put back to the `status` it had, its end
    time kept (`end_run` sets it to now); whether the store took it (never an error)."""
    try:
        client(uri).update_run(run_id, status=status)
        return True
    except Exception as err:
        log.warning("MLflow: run %s could not be put back to %s: %s", run_id, status,
                    error_line(err))
        return False


def log_summary(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """A run's closing metrics (at step 0) and tags, in one request."""
    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                          tags=[RunTag(k, v) for k, v in tags.items()])


def send_points(uri: str, run_id: str, points: list[dict[str, Any]]) -> None:
    """Metric points as `MetricLogger.unsent_points` lists them ({key, value, step,
    timestamp}), logged into the run, 1,000 a request."""
    c = client(uri)
    metrics = [Metric(p["key"], float(p["value"]), int(p["timestamp"]), int(p["step"]))
               for p in points]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])


def brief_error(err: BaseException, width: int = 160) -> str:
    """Why a request failed, short: the OS's reason where the message holds one (urllib3's
    run to hundreds of characters around it), else its first line, cut at `width`.

    >>> brief_error(ConnectionError("HTTPConnectionPool(host='h', port=5001): Max retries "
    ...     "exceeded with url: /api/2.0/mlflow/runs/log-batch (Caused by NewConnectionError("
    ...     "'<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a new "
    ...     "connection: [Errno 111] Connection refused'))"))
    'ConnectionError: [Errno 111] Connection refused'
    >>> brief_error(TimeoutError())
    'TimeoutError'
    """
    import re

    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
    line = found.group(0) if found else (str(err).splitlines() or [""])[0]
    line = redact_text(line)  # (a URL's password: MLflow's errors carry the whole URL)
    line = line if len(line) <= width else line[: width - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def keep_unsent(path: str | Path, unsent: int, points: list[dict[str, Any]],
                run_id: str | None, tracking_uri: str | None = None) -> int:
    """Metric points the store never got (`MetricLogger.close`'s count and `unsent_points`),
    added to `path` (a job's tracking.json) beside what an earlier attempt of the same job left
    there (a worker failed, Ray Train restarted the group from its checkpoint: the epochs
    before it are not trained again, so their points would be lost with the attempt). The file
    names the run they belong to (`mlflow_run_id`; None: not created yet) and its store
    (`tracking_uri`: a later job in the --out may record to another). Returns the count the
    file holds.

    >>> import tempfile; f = Path(tempfile.mkdtemp()) / "tracking.json"
    >>> keep_unsent(f, 2, [{"key": "a", "value": 1.0, "step": 1, "timestamp": 0}] * 2, None)
    2
    >>> keep_unsent(f, 1, [{"key": "a", "value": 2.0, "step": 2, "timestamp": 0}], "r1")
    3
    >>> import json; d = json.loads(f.read_text()); d["mlflow_run_id"], len(d["points"])
    ('r1', 3)
    """
    import json

    from pipeline.files import write_json

    path = Path(path)
    before: dict[str, Any] = {}
    if path.exists():
        try:
            before = json.loads(path.read_text())
            if not isinstance(before, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):  # unreadable: kept under a name of its own, not lost
            before = {}
            os.replace(path, path.with_name(f"{path.stem}-unreadable-{time.time_ns()}.json"))
    total = int(before.get("metrics_unsent") or 0) + int(unsent)
    write_json(path, {"metrics_unsent": total,
                      "mlflow_run_id": run_id or before.get("mlflow_run_id"),
                      "tracking_uri": tracking_uri or before.get("tracking_uri"),
                      "points": [*(before.get("points") or []), *points]},
               nan_as_null=False)  # (a NaN metric point is sent again as NaN)
    return total


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Mark the run FINISHED, FAILED or KILLED (`status`); an unreachable store (after MLflow's
    own HTTP retries) is a warning, never an error that would turn a trained job into a crashed
    one."""
    try:
        client(uri).set_terminated(run_id, status)
        return True
    except Exception as err:
        log.warning("MLflow: run %s could not be marked %s: %s", run_id, status,
                    error_line(err))
        return False


def nested_runs(uri: str, experiment: str, parent: str) -> list[Any]:
    """The runs nested under `parent` (a sweep's trials), oldest first."""
    c = client(uri)
    runs, token = [], None
    while True:  # a page holds at most 5,000 runs (a larger sweep has more pages)
        page = c.search_runs([experiment_id(c, experiment)],
                             filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                             max_results=5000, order_by=["attributes.start_time ASC"],
                             page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def close_open_runs(uri: str, experiment: str, parent: str) -> None:
    """The sweep itself stopped: no trial run may stay RUNNING (a resume reopens its own)."""
    try:
        for run in nested_runs(uri, experiment, parent):
            if run.info.status == "RUNNING":
                end_run(uri, run.info.run_id, "KILLED")
    except Exception as err:  # never hide the sweep's own error behind a tracking one
        print(f"[pipeline] could not close the trial runs: {error_line(err)}", flush=True)


def metric_histories(uri: str, run_id: str, keys: list[str]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} for each metric of a run (the last value logged at a step wins)."""
    c = client(uri)
    return {key: {m.step: m.value for m in c.get_metric_history(run_id, key)} for key in keys}


def log_model(uri: str, run_id: str, checkpoint_path: Path) -> str:
    """Rebuild the model from the last checkpoint and log it as an MLflow PyTorch model; return
    its format. `pt2` (a `torch.export` graph: loading it runs no pickled code) takes positional
    tensors, `model(features)` or `model(input_ids, attention_mask)`, with any batch size (and
    sequence length); a model that cannot be exported (a user's `import:` model, say) is logged
    as `pickle` instead, and the console says so. The run stays RUNNING: the job marks it
    FINISHED once its result.json is written (a job killed in between is never FINISHED)."""
    import torch

    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.models import build_model

    state = load_checkpoint(checkpoint_path)
    model = build_model(**state["model_spec"])
    model.load_state_dict(state["model"])
    # The model goes to the run's own experiment (not the process's active one: a notebook's
    # earlier set_experiment, say), logged into the run by its id: no `start_run`, whose end
    # would mark the run FINISHED (or stamp its end time) before the job ends it.
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    with _mlflow_pointed_at(uri, experiment_id):
        return _log_model(model, state["model_spec"], run_id,
                          requirements=[f"torch=={torch.__version__.split('+')[0]}"])


@contextlib.contextmanager
def _mlflow_pointed_at(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI and active experiment set to `uri` and
    `experiment_id` for the block, then put back as they were (and the two environment
    variables MLflow sets with them): `mlflow.pytorch.log_model` reads both, and a notebook that
    ran a job keeps its own (its next `mlflow.start_run()` goes where it went before). MLflow
    has no public way to unset them, hence its module globals."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    saved_uri, saved_experiment = tracking_utils._tracking_uri, fluent._active_experiment_id
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        fluent._active_experiment_id = saved_experiment
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _log_model(model: Any, model_spec: dict[str, Any], run_id: str, requirements: list[str]
               ) -> str:
    """`log_model`'s logging into run `run_id`: `pt2` if the model exports, else `pickle`."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.engine.models import positional_model

    try:
        wrapped, example = positional_model(model, model_spec)
        with torch.no_grad():
            out = wrapped(*example.values())

        def dynamic(shape: tuple[int, ...], seq: bool) -> tuple[int, ...]:  # -1: any size
            return (-1, -1, *shape[2:]) if seq else (-1, *shape[1:])

        seq = "input_ids" in example
        signature = ModelSignature(
            inputs=Schema([TensorSpec(v.numpy().dtype, dynamic(tuple(v.shape), seq), name=k)
                           for k, v in example.items()]),
            outputs=Schema([TensorSpec(np.dtype("float32"),
                                       dynamic(tuple(out.shape), seq and out.dim() == 3))]))
        mlflow.pytorch.log_model(wrapped, name="model", serialization_format="pt2",
                                 input_example=tuple(v.numpy() for v in example.values()),
                                 signature=signature, pip_requirements=requirements,
                                 run_id=run_id)
        return "pt2"
    except Exception as e:  # torch.export refuses some models; pickle still loads them
        if _store_error(e):  # the upload failed, not the export: no pickle in its place
            raise
        print(f"[pipeline] the model cannot be exported ({error_line(e)}); logged with "
              "serialization_format='pickle'", file=sys.stderr, flush=True)
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=requirements, run_id=run_id)
        return "pickle"


def _store_error(err: BaseException) -> bool:
    """Whether an error of `log_model` came from the tracking store or the network (a refused
    request, a dropped connection, a full disk) rather than from exporting the model."""
    import requests
    from mlflow.exceptions import RestException

    return isinstance(err, RestException | requests.RequestException | OSError)


class DeferredRun:
    """A job's run when its tracking server was unreachable at the start: `run_id()` creates it
    (`start_run` with the arguments given here) -- or, given `reopen`, the id of a run that
    exists (a --resume), makes that one RUNNING again -- on the first call that finds the
    server back, and returns its id from then on; None while the server is away (one probe per
    retry_s). The driver holds it in a Ray actor (pipeline/launch.py), so rank 0 and the driver
    ask the same one and the job gets one run, however many workers ask or restart."""

    def __init__(self, uri: str, retry_s: float = 2.0, reopen: str | None = None,
                 half_made: list[str] | None = None,
                 **run_args: Any):
        self.uri, self.retry_s, self.reopen, self.run_args = uri, retry_s, reopen, run_args
        self._id: str | None = None
        self._next_try = 0.0
        # why the run will never be made, once the store answered and would not make it (then
        # not asked again): (refused: bad input, the error's line)
        self._why: tuple[bool, str] | None = None
        # runs an attempt left RUNNING (the driver's included, handed over), marked FAILED later
        self.half_made: list[str] = list(half_made or [])

    def run_id(self, force: bool = False) -> str | None:
        """The run's id, or None while it cannot be made; `force`: try now, not only once
        `retry_s` has passed since the last try (the job's last question)."""
        if self._id is None and self._why is None and (force or time.monotonic() >= self._next_try):
            self._next_try = time.monotonic() + self.retry_s
            if server_reachable(self.uri):
                try:
                    if self.reopen is not None:
                        reopen_run(self.uri, self.reopen)
                        self._id = self.reopen
                    else:
                        self._id = start_run(self.uri, **self.run_args)
                    log.warning("MLflow reachable: run %s %s", self._id,
                                "RUNNING again" if self.reopen else "created")
                except Exception as err:  # went away again mid-creation: the next call retries
                    if isinstance(err, HalfRunError) and not err.failed:
                        self.half_made.append(err.run_id)
                    if creation_final(err, self.uri):  # again would make run after run
                        self._why = (refused(creation_cause(err)),
                                     error_line(creation_cause(err)))
                        log.warning("MLflow failed to make the run, not tried again: %s",
                                    error_line(err))
                    else:
                        log.warning("MLflow: the run could not be created yet: %s",
                                    error_line(err))
            if self._id is not None:
                self.half_made = [r for r in self.half_made if not end_run(self.uri, r, "FAILED")]
        return self._id

    def made(self) -> str | None:
        """The run's id if it was made (or reopened) already; never tries (a job stopping has
        no time to see a creation through: one begun then would be left RUNNING)."""
        return self._id

    def refusal(self) -> tuple[bool, str] | None:
        """Why the run will never be made, where the store came back and would not make it:
        (whether it refused it -- bad input, as at a job's start --, the error's line); None
        while it may yet be."""
        return self._why


def refused(err: BaseException) -> bool:
    """Whether the tracking store answered a request and refused it for good (a 4xx: the run
    deleted, a value out of range), as opposed to being away or failing for now (connection
    errors, 5xx, 429 too many requests, 408).

    >>> from mlflow.exceptions import MlflowException
    >>> from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    >>> refused(MlflowException("run is deleted", error_code=INVALID_PARAMETER_VALUE))
    True
    >>> refused(MlflowException("API request failed: connection refused"))  # INTERNAL_ERROR
    False
    >>> refused(ConnectionError("refused"))
    False
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class MetricLogger:
    """Metric logging for rank 0 that never holds training up and loses nothing to an outage.

    `add` buffers points and `flush` wakes a background thread that sends them in batches of
    1,000; while the store is unreachable they stay buffered (up to `max_points`: beyond, new
    points are dropped and counted) and the thread tries again every `retry_s` seconds, so an
    outage of the tracking server delays the curves but does not hold up a step or lose a point.
    One line says when the store became unreachable and one when it is back. `close` waits up
    to `timeout_s` for the buffer to drain and returns the number of points not sent
    (`unsent_points` lists them).

    A job that started while the store was unreachable has no run yet: `run_id` is None and
    `run_id_source` (asked before each attempt to send) returns the run's id once it exists;
    until then points and tags wait as in an outage."""

    def __init__(self, uri: str, run_id: str | None, retry_s: float = 2.0,
                 max_points: int = 1_000_000,
                 run_id_source: Callable[[], str | None] | None = None):
        self.client, self.run_id = client(uri), run_id
        self.retry_s, self.max_points = retry_s, max_points
        self._run_id_source = run_id_source
        self.dropped = 0  # points beyond max_points during an outage
        self._tags: dict[str, str] = {}  # tags waiting for the run to exist
        self._buffer: list[Metric] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = self._given_up = False
        self._down_since: float | None = None
        self._relog_from: int | None = None  # a check `mark_relogged_epochs_soon` left to the thread
        self._tags_wait = False  # tags the store failed: kept for its next points
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def mark_relogged_epochs(self, start_epoch: int) -> list[int]:
        """Training starts at epoch index start_epoch (0, or the checkpoint's next epoch after
        a worker-group restart or --resume). Epochs after it that the run already logged are
        trained, and logged, again -- MLflow cannot delete a point. Mark them: the tag
        `relogged_epochs` and one line; the replayed points are equal to the first ones (the
        pipeline is deterministic). Returns those epochs (1-based)."""
        if not self._known_run():
            return []  # the run does not exist yet: it has logged nothing
        try:
            done = {m.step for m in self.client.get_metric_history(self.run_id, "epoch_time_s")}
        except Exception:  # unreachable store: nothing to compare with; training goes on
            return []
        again = sorted(e for e in done if e > start_epoch)
        if again:
            shown = ",".join(map(str, again))
            try:
                previous = self.client.get_run(self.run_id).data.tags.get("relogged_epochs")
                self.client.set_tag(self.run_id, "relogged_epochs",
                                    f"{previous};{shown}" if previous else shown)
            except Exception as err:  # the store went away meanwhile: the line below still says it
                log.warning("MLflow: tag relogged_epochs not set: %s", error_line(err))
            log.warning("restarted at epoch %d: epoch(s) %s were logged before the restart and "
                        "are logged again (MLflow tag relogged_epochs)", start_epoch + 1, shown)
        return again

    def mark_relogged_epochs_soon(self, start_epoch: int) -> None:
        """`mark_relogged_epochs`, on the sending thread, before it sends a point: it asks the
        store, and a store that drops packets holds each call for MLflow's request timeout
        (minutes) -- never training's."""
        self._relog_from = start_epoch
        self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags from rank 0, set by the sending thread (training never waits on the store): at
        once, or when the run exists, or -- the store away: a warning -- with the next points
        it takes."""
        with self._lock:
            self._tags.update(tags)
        self._wake.set()

    def add(self, metrics: dict[str, float], step: int, at: float | None = None) -> None:
        """Points of `step`, stamped `at` (time.time(); default now): a step's points are
        buffered until its epoch ends, but MLflow's wall-time axis shows when they happened."""
        ts = int((time.time() if at is None else at) * 1000)
        points = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        with self._lock:
            room = max(0, self.max_points - len(self._buffer))
            self._buffer.extend(points[:room])
            self.dropped += len(points) - min(room, len(points))

    def flush(self, wait_s: float = 0.0) -> None:
        """Send what is buffered, in the background; wait up to wait_s for it to arrive (not
        at all while the store is known to be down). Training waits at each epoch's end, so
        that an epoch's points are in the store before its checkpoint is reported."""
        self._wake.set()
        deadline = time.monotonic() + wait_s
        while self.pending() and self._down_since is None and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def unreachable(self) -> bool:
        """Whether the last attempt to send failed (the points wait for the store)."""
        return self._down_since is not None

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def unsent_points(self) -> list[dict[str, Any]]:
        """The points still buffered: {key, value, step, timestamp} each."""
        with self._lock:
            return [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                    for m in self._buffer]

    def _known_run(self) -> bool:
        """Whether the run exists (asking `run_id_source` when it did not yet); its waiting
        tags are set as soon as it does."""
        if self.run_id is None and self._run_id_source is not None:
            try:
                self.run_id = self._run_id_source()
            except Exception as err:
                log.warning("MLflow: could not learn the run id yet: %s", error_line(err))
            if self.run_id is not None:  # said here: the DeferredRun actor's own log is not shown
                log.warning("MLflow is back: this job's metrics go to run %s", self.run_id)
            self._set_waiting_tags()
        return self.run_id is not None

    def _set_waiting_tags(self) -> None:
        """The tags waiting (`set_tags`): set where the run exists; those a store away did not
        take wait again (those it refused are dropped: again would not help), until it takes
        points (`_send_one` clears `_tags_wait`)."""
        if self._tags_wait:
            return
        with self._lock:
            tags, self._tags = self._tags, {}
        if not tags or self.run_id is None:
            with self._lock:
                self._tags = {**tags, **self._tags}
            return
        left = dict(tags)
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
                del left[key]
        except Exception as err:
            if refused(err) or not self._tags_wait:  # (said once an outage)
                log.warning("MLflow: tags %s not set%s: %s", sorted(left),
                            "" if refused(err) else " yet", error_line(err))
            if not refused(err):  # (away: kept, and set with the next points the store takes;
                with self._lock:  # newer values win)
                    self._tags = {**left, **self._tags}
                self._tags_wait = True

    def close(self, timeout_s: float = 120.0, *, give_up: bool = False) -> int:
        """Send what is left, waiting at most timeout_s; the number of points not sent.
        `give_up`: the sending thread also ends then, with points left (training was stopped
        or failed: no one waits for them; without it the thread goes on trying)."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        if give_up and self._thread.is_alive():
            self._given_up = True
            self._wake.set()
        return self.pending() + self.dropped

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(timeout=self.retry_s)
            self._wake.clear()
            if not self._given_up:
                self._asked_for()
            while not self._given_up and self._send_one():
                pass
            if self._given_up or (self._closing and not self.pending()):
                return

    def _asked_for(self) -> None:
        """What training asked of the store besides points: the relogged-epochs check (before
        any point of this attempt is sent: they would count as logged before) and tags."""
        start, self._relog_from = self._relog_from, None
        if start is not None:
            self.mark_relogged_epochs(start)
        with self._lock:
            waiting = bool(self._tags)
        if waiting and self._known_run():
            self._set_waiting_tags()

    def _send_one(self) -> bool:
        """Send the oldest batch; True when it went and more may follow."""
        with self._lock:
            chunk = self._buffer[:1000]
        if not chunk:
            return False
        try:
            if not self._known_run():
                raise ConnectionError("the run is not created yet (the store was unreachable "
                                      "when the job started)")
            self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:
            if refused(err):  # the store answered and refused them: again would not help
                with self._lock:
                    del self._buffer[: len(chunk)]
                    self.dropped += len(chunk)
                log.warning("MLflow refused %d metric point(s), not sent again: %s", len(chunk),
                            error_line(err))
                return True
            # the store is unreachable or failing: keep them, try later
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("MLflow unreachable, metric points kept and sent when it is back: %s",
                            brief_error(err))
            return False
        with self._lock:
            del self._buffer[: len(chunk)]  # add() only appends: the front is still this chunk
        self._tags_wait = False
        self._set_waiting_tags()  # (the store took points: it takes tags too)
        if self._down_since is not None:
            log.warning("MLflow reachable again after %.0f s: buffered metric points sent",
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True
