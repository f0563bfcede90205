"""Launch one training job: Ray Data ingest, the TorchTrainer, the MLflow run, result.json.

`run_training(cfg, info, out_dir)` is what `python -m pipeline train` and `jobs/train.py` call after
the config and the dataset have been validated (so bad input never reaches the cluster).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipeline import console, tracking
from pipeline.blocks import (  # ingest: also imported from here
    DATA_LOST,
    Blocks,
    ingest,
    mode_line,
    on_head,
)
from pipeline.config import Config, ConfigError, missing_resumed_store, named_store, sqlite_file
from pipeline.data.datasets import DatasetInfo, data_fingerprint
from pipeline.engine.checkpoint import epochs_done, find_latest_checkpoint, load_checkpoint
from pipeline.files import run_state, write_json
from pipeline.redact import redact, redact_text
from pipeline.resume import (
    cut_epoch,
    moved_batches,
    moved_ghost_batch,
    relaid_schedule,
    resume_folder,
    resume_point,
)
from pipeline.tracking import (
    DeferredRun,
    HalfRunError,
    creation_cause,
    creation_final,
    deleted_experiment,
    deleted_run,
    end_run,
    is_local_store,
    log_model,
    log_summary,
    log_text,
    refused,
    reopen_run,
    restore_status,
    run_status,
    send_points,
    server_reachable,
    start_run,
)
from pipeline.worker import FATAL, rank_fatal_files, train_func

# Ray Train V2 waits for the controller's poll on every report (default 2 s); 0.2 s keeps short
# epochs from idling. The driver's value is propagated to the controller and the workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def connect(address: str | None = None, verbose: bool | None = None) -> None:
    """Join the cluster at RAY_ADDRESS / `address`, or start a local one (laptop) when neither
    is given. `address="auto"` only joins: it fails rather than start a second cluster.
    The console shows the pipeline's lines unless `verbose` (default: `--verbose` given)."""
    verbose = console.is_verbose() if verbose is None else verbose
    if not ray.is_initialized():
        given = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "address"
        address = os.environ.get("RAY_ADDRESS") or address
        if address in (None, "", "local"):  # starts its own Ray: its processes inherit this env
            for key, value in console.local_ray_env(verbose).items():
                os.environ.setdefault(key, value)
        try:
            ray.init(address=address, **console.ray_init_kwargs(verbose))
        except ConnectionError as err:
            if "could not find any running ray instance" not in str(err).lower():
                raise  # (a cluster there not answering in time, several found: Ray's own)
            raise ConfigError(
                f"argument error: {given}={address}: no Ray cluster to join "
                f"({console.error_line(err)}); start one (`ray start --head`) or submit the job "
                "to one (`ray job submit`)") from None
    quiet_ray_data_and_loggers(verbose)


def quiet_ray_data_and_loggers(verbose: bool) -> None:
    """Ray Data's progress bars and execution plans, and the Python loggers (pipeline/console.py)."""
    ctx = ray.data.DataContext.get_current()
    for key, value in console.ray_data_flags(verbose).items():
        setattr(ctx, key, value)
    console.quiet_loggers(verbose)


def check_store_reachable(uri: str, source: str = "tracking.uri", resumed: bool = False) -> None:
    """A local sqlite/file store on a multi-node cluster would split the job over several
    stores (one per node): require a tracking server there (`local_store_problem`). `source`:
    where the URI came from (`Config.tracking_source`, or the resumed state file's field);
    `resumed`: the store is a resumed run's own, which a resume cannot change."""
    nodes = ray.nodes()
    problem = local_store_problem(uri, nodes)
    if problem:
        do = ("the run it resumes is recorded there, and a resume keeps its store: resume it on "
              "one node with CPUs, or start a new run with tracking.uri set to an MLflow "
              "tracking server" if resumed else
              "set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow tracking server")
        raise ConfigError(f"config error: {named_store(uri, source)} is a local store but "
                          f"{problem}; {do}")
    problem = loopback_problem(uri, nodes)
    if problem:  # a warning: each node may reach the one server at that address (a tunnel)
        _log(f"warning: the tracking server {redact_text(uri)} {problem}: rank 0, which logs "
             "the metrics, reaches it only where that address leads to the same server on its "
             "machine too (a tunnel); else give its address on the network the nodes share")


def loopback_problem(uri: str, nodes: list[dict[str, Any]]) -> str | None:
    """Why a tracking server at a loopback address (localhost, 127.0.0.1, ::1) may not be
    reached by rank 0, which logs the metrics, or None: the cluster's nodes are on more than
    one machine (their `NodeManagerAddress`), and there the address is each machine itself --
    the driver's probe answered, but rank 0 on another machine waited for the server all job
    long (unless each machine tunnels it to the one server: a warning, not a refusal). Nodes
    simulated on one machine share it (the tests', `ray.cluster_utils.Cluster`).

    >>> one = {"Alive": True, "NodeManagerAddress": "10.0.0.4"}
    >>> loopback_problem("http://127.0.0.1:5000", [one, one]) is None
    True
    >>> loopback_problem("http://localhost:5000", [one, {**one, "NodeManagerAddress": "10.0.0.5"}])
    'is this machine itself (a loopback address), and the cluster has nodes on 2 machines'
    >>> loopback_problem("http://10.0.0.4:5000", [one, {**one, "NodeManagerAddress": "10.0.0.5"}])
    """
    import ipaddress
    from urllib.parse import urlparse

    if not uri.startswith(("http://", "https://")):
        return None
    host = urlparse(uri).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: not resolved here
        loopback = False
    machines = {n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}
    if not loopback or len(machines) < 2:
        return None
    return (f"is this machine itself (a loopback address), and the cluster has nodes on "
            f"{len(machines)} machines")


def autoscaler_most() -> dict[str, float] | None:
    """The most resources the cluster's autoscaler may bring up (its node types' resources x
    their max_workers; what Ray Train checks a worker group against; `sys.maxsize` for a node
    group without a maximum), or None without one. LookupError when the cluster cannot say
    (a private API: moved in another Ray, or its lookup failing)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception as err:
        raise LookupError(console.error_line(err)) from err


def workers_problem(cfg: Config, cluster: dict[str, float], nodes: list[dict[str, float]],
                    most: dict[str, float] | None) -> str | None:
    """Why the cluster can never run the job's workers, or None: more CPUs (or GPUs) than it
    has in all -- or, with an autoscaler (`most`), than it may grow to -- or, without one,
    more workers than its nodes hold (a worker's CPUs and GPU on one node). (Ray Train would
    wait for them for ever, a timeout and a traceback every minute.)

    >>> from pipeline.config import load_config
    >>> cfg = load_config(None, ["scaling.num_workers=64"])
    >>> print(workers_problem(cfg, {"CPU": 4.0}, [{"CPU": 4.0}], None))  # doctest: +ELLIPSIS
    it needs 64 CPU(s) in all, the cluster has 4; lower ...cpus_per_worker (or add nodes)
    >>> gpus = load_config(None, ["scaling.use_gpu=true"])
    >>> print(workers_problem(gpus, {"CPU": 8.0}, [{"CPU": 8.0}], None))  # doctest: +ELLIPSIS
    it needs 2 GPU(s) in all, the cluster has 0; lower ..., or set scaling.use_gpu=false (or add GPU nodes)
    >>> workers_problem(cfg, {"CPU": 0.0}, [{"CPU": 0.0}], {"CPU": 64.0}) is None
    True
    >>> three = load_config(None, ["scaling.num_workers=3", "scaling.cpus_per_worker=2",
    ...                            "train.global_batch_size=96"])
    >>> print(workers_problem(three, {"CPU": 6.0}, [{"CPU": 3.0}, {"CPU": 3.0}], None))  # doctest: +ELLIPSIS
    its nodes hold 2 worker(s) of 2 CPU(s) at most; lower scaling.num_workers or ... (or add nodes)
    """
    sc = cfg.scaling
    fix = "; lower scaling.num_workers or scaling.cpus_per_worker (or add nodes)"
    for key, amount in sc.need().items():
        have = max(cluster.get(key, 0.0), (most or {}).get(key, 0.0))
        if amount > have + 1e-9:
            grow = " (at most, as its autoscaler may grow it)" if most else ""
            if key == "GPU":  # (fewer CPUs a worker would not help)
                fix = "; lower scaling.num_workers, or set scaling.use_gpu=false (or add GPU nodes)"
            return f"it needs {amount:g} {key}(s) in all, the cluster has {have:g}{grow}{fix}"
    if most is None and nodes:
        def holds(node: dict[str, float]) -> int:
            n = math.floor(node.get("CPU", 0.0) / sc.cpus_per_worker + 1e-9)
            return min(n, math.floor(node.get("GPU", 0.0) + 1e-9)) if sc.use_gpu else n

        slots = sum(holds(n) for n in nodes)
        if slots < sc.num_workers:
            return (f"its nodes hold {slots} worker(s) of {sc.cpus_per_worker:g} CPU(s)"
                    f"{' and a GPU' if sc.use_gpu else ''} at most{fix}")
    return None


def check_workers_fit(cfgs: list[Config], note: Callable[[Config], str] | None = None) -> None:
    """ConfigError (exit 2) when the cluster can never run the workers of one of `cfgs` (a job,
    or a sweep's trials; `note` adds which) (`workers_problem`), before anything is ingested
    or recorded. The cluster is asked once, each shape of workers checked once."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        cluster, most = ray.cluster_resources(), autoscaler_most()
    except LookupError as err:  # unknown is not "no autoscaler": a valid job is not refused
        _log(f"warning: the cluster's autoscaler could not be asked ({err}): whether the "
             "workers can ever start is not checked")
        return
    seen = set()
    for cfg in cfgs:
        sc = cfg.scaling
        if (shape := (sc.num_workers, sc.cpus_per_worker, sc.use_gpu)) in seen:
            continue
        seen.add(shape)
        if problem := workers_problem(cfg, cluster, nodes, most):
            raise ConfigError(
                f"config error: scaling.num_workers={sc.num_workers} x {sc.cpus_per_worker:g} "
                f"CPU{' and a GPU' if sc.use_gpu else ''} each: {problem}"
                + (note(cfg) if note is not None else ""))


def local_store_problem(uri: str, nodes: list[dict[str, Any]]) -> str | None:
    """Why a local store (on the driver's disk) cannot record this job on a cluster of these
    nodes (`ray.nodes()`), or None: more than one node, or one without a CPU (the head of an
    autoscaling cluster, as `cluster.yaml`'s: the workers would start on nodes that join
    later, rank 0 writing to a store of its own there).

    >>> head = {"Alive": True, "Resources": {"CPU": 0.0}}
    >>> local_store_problem("sqlite:////x.db", [head])[:46]
    'the only node of the cluster has no CPU for a '
    >>> local_store_problem("http://h:5000", [head]) is None
    True
    >>> local_store_problem("sqlite:////x.db", [{**head, "Resources": {"CPU": 2.0}}])
    """
    if not is_local_store(uri):
        return None
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"the cluster has {len(alive)} nodes"
    if alive and not alive[0].get("Resources", {}).get("CPU"):
        return ("the only node of the cluster has no CPU for a training worker (the workers "
                "would start on nodes that join later)")
    return None


def _store_to_ask(uri: str) -> bool:
    """Whether the checks before the cluster can ask the store at `uri`: it answers, and (a
    sqlite store) exists -- it is not made here: a refused job writes no store."""
    local = sqlite_file(uri)
    return server_reachable(uri) and (local is None or Path(local).exists())


def check_experiment(uri: str, experiment: str) -> None:
    """Refuse, before any cluster work, an experiment the store holds deleted (no run can be
    created in it); a store that is away is left to the job (it trains without it), a sqlite
    store not made yet holds none (and is not made here: a refused job writes no store)."""
    if not _store_to_ask(uri):
        return
    try:
        deleted = deleted_experiment(uri, experiment)
    except Exception as err:
        if refused(err):  # the server answered and refused (no access, say): bad input too
            raise ConfigError(f"config error: MLflow at {redact_text(uri)} refused the lookup of "
                              f"tracking.experiment={experiment!r} ({console.error_line(err)})"
                              ) from None
        return  # failing for now: left to the job, which trains without the server if need be
    if deleted:
        raise ConfigError(f"config error: tracking.experiment={experiment!r} is deleted in "
                          f"{redact_text(uri)}: restore it, or name another")


def check_resumed_run(uri: str, run_id: str) -> None:
    """Refuse, before any cluster work, a --resume whose MLflow run cannot go on: deleted (it,
    or its experiment) or gone from the store (`deleted_run`); a store that is away is left to
    the job (the run is continued when it is back), one failing for now too."""
    if (missing := missing_resumed_store(run_id, uri)) is not None:
        raise missing
    if not _store_to_ask(uri):
        return
    try:
        problem = deleted_run(uri, run_id)
    except Exception as err:
        if refused(err):  # the server answered and refused (wrong credentials, no access)
            raise ConfigError(f"argument error: --resume: MLflow at {redact_text(uri)} refused the "
                              f"lookup of run {run_id} ({console.error_line(err)})") from None
        return  # failing for now: left to the job
    if problem is not None:
        raise ConfigError(f"argument error: --resume: {problem}: restore it in the MLflow UI, or "
                          "train afresh (without --resume, or with another --out)")


def ray_job_tags() -> dict[str, str]:
    """The Ray job id, and the submission id when started by `ray job submit`."""
    tags = {"ray.job_id": ray.get_runtime_context().get_job_id()}
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by the job server for the driver
    if raw:
        sub = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        if sub:
            tags["ray.submission_id"] = sub
    return tags


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def _progress_callback(epochs: int) -> Any:
    """One console line per epoch and per failing rank. It runs on the Train controller (an
    actor): its prints reach the driver's console through Ray's worker-log stream."""

    class Progress(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if FATAL not in metrics[0]:  # a worker's deterministic failure: said on its own
                console.say(console.epoch_line(metrics[0], epochs))

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]):
            for rank, err in sorted(worker_exceptions.items()):
                last = redact_text((str(err).strip().splitlines() or [""])[-1])
                console.say(f"rank {rank} failed: {type(err).__name__}: {last[:300]}")

    return Progress()


def _worker_entry(func: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any]) -> Any:
    """Each worker (a job's `train_func`, the finder's `find_func`): the console settings
    (Ray's per-rank report lines), then the worker function."""
    console.quiet_worker_logs(loop_config.get("verbose", False))
    console.say_pipeline_warnings()
    # Rank 0's MetricLogger retries on its own (points buffered, a try every 2 s, one line when
    # the store goes and one when it is back); MLflow's client would first retry each request
    # itself, saying nothing.
    tracking.no_client_retries()
    return func(loop_config)


# How the training runs once the run is set up: (cfg, loop_config, Ray run name, storage) ->
# (the last reported metrics, the last checkpoint folder). `fit_torch_trainer` by default; a
# one-worker sweep trial runs it in its own actor instead (pipeline/tune/trial.py).
Fit = Callable[[Config, dict[str, Any], str, Path], tuple[dict[str, Any], Path | None]]


def run_training(cfg: Config, info: DatasetInfo, out_dir: Path, *, resume: bool = False,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 extra_callbacks: list[Any] | None = None, address: str | None = None,
                 show_progress: bool = True, table_refs: Blocks | None = None,
                 started_at: float | None = None, fit: Fit | None = None,
                 run_id: str | None = None) -> dict[str, Any]:
    """Train one job. `show_progress=False` (a Tune trial: the sweep prints per trial) keeps
    the per-epoch lines, the progress bar and the run's own lines off the console.
    `table_refs`: the dataset already in the object store (a sweep ingests it once for all its
    trials); `started_at`: when the job started (time.time(); the `startup_s` metric counts
    from it); `fit`: how the training runs (default: a TorchTrainer, `fit_torch_trainer`);
    `run_id`: an MLflow run to continue from the start (a sweep trial that failed before its
    first checkpoint, run again by Tune)."""
    started_at = started_at or time.time()
    if not info.facts:  # the workers size the model from them (a DatasetInfo made by hand?)
        raise ValueError("run_training needs the DatasetInfo resolve() returns: it has no facts "
                         "of the data")
    out_dir = out_dir.resolve()  # (made once the checks below pass: a refused job leaves none)
    state_file = out_dir / "run.json"
    started = run_state(out_dir) if resume else {}
    before = {} if resume else _earlier_state(out_dir)  # an earlier job's in this --out
    # the store the run is in (resolved when it started: the default depends on the working
    # directory and MLFLOW_TRACKING_URI, which a resume may not share)
    uri = started.get("tracking_uri") or cfg.tracking_uri()
    # Each run keeps its checkpoints in a folder of its own under ray_results/, named in
    # run.json: an --out used again for a fresh run must not hand the older run's checkpoints
    # (more steps, so "latest") to a --resume or a restart of the newer one. A run.json
    # without the name (written before it was kept) resumes from the whole of ray_results/.
    checkpoints = (resume_folder(started) if resume
                   else f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    storage = out_dir / "ray_results" / checkpoints
    resume_from = None
    resumed_with: dict[str, str] = {}  # the keys a --resume changed (allowed), their new values
    # what a --resume compares the data with (a job's: a sweep's trial, maybe on a node without
    # the files, has none)
    fingerprint = data_fingerprint(info) if table_refs is None else None
    if resume:
        run_id = started.get("mlflow_run_id") if started else run_id
        if run_id is not None:  # (refused before a line about the checkpoints is printed)
            check_resumed_run(uri, run_id)
        cfg, resume_from, resumed_with = resume_point(
            cfg, storage, started, on_skip=lambda folder, why: _log(f"skipping checkpoint: {why}"),
            data=fingerprint)
        if show_progress:
            _log(f"resuming from {resume_from} (epoch {epochs_done(resume_from)} done)")
            for line in (relaid_schedule(cfg, resumed_with), moved_ghost_batch(cfg, started),
                         moved_batches(cfg, started),
                         cut_epoch(started, resume_from, resumed_with)):
                if line is not None:
                    _log(line)
    if run_id is None and parent_run_id is None:  # a job's new run (a sweep checks its own)
        check_experiment(uri, cfg.tracking.experiment)
    verbose = console.is_verbose()
    connect(address, verbose)
    if started.get("tracking_uri"):
        check_store_reachable(uri, f"{state_file}: tracking_uri", resumed=True)
    else:
        check_store_reachable(uri, cfg.tracking_source())
    if table_refs is None:  # (a sweep checks its trials' workers itself)
        check_workers_fit([cfg])
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = None  # this job's own ingest: ended with it
    marked = None  # the run made, or made RUNNING again, below
    earlier = None  # a resumed run's status before it was made RUNNING again
    fresh = False  # the run was made here (named in run.json before the ingest)
    half: list[str] = []  # a run half made while the store went away (left RUNNING)
    pending = None  # the run, when the tracking server is unreachable at the start
    try:
        if run_id is None:
            # masked here (start_run masks again): a deferred run is made in an actor on the
            # head node, whose environment may lack the secrets this driver's holds
            run_name = cfg.tracking.run_name
            run_args = {"experiment": cfg.tracking.experiment,
                        "run_name": redact_text(run_name) if run_name else run_name,
                        "params": redact(cfg.flat_params()),
                        "config_yaml": yaml.safe_dump(redact(cfg.to_dict())),
                        "parent_run_id": parent_run_id,
                        "tags": redact({**ray_job_tags(), **(tags or {})})}
            if server_reachable(uri):
                try:
                    run_id = marked = start_run(uri, **run_args)
                except Exception as err:
                    cause = creation_cause(err)
                    if refused(cause):  # the store answered and refused it: bad input
                        raise ConfigError(f"config error: MLflow at {redact_text(uri)} refused the "
                                          f"run ({console.error_line(cause)})") from None
                    if creation_final(err, uri):  # the store up but unable: the job fails on it
                        raise
                    # it went away while the run was made: made when it is back, as below (a run
                    # half made and still RUNNING is marked FAILED then)
                    half = [err.run_id] if isinstance(err, HalfRunError) and not err.failed else []
                    for rid in half:  # owed: the next job in --out marks it, should the store
                        _owe(out_dir, rid, {"status": "FAILED", "tracking_uri": uri})  # not
                        # come back while this one runs (`_end_owed_runs` at this job's end)
                    pending = _deferred_run(uri, half_made=half, **run_args)
                    _log(f"MLflow at {redact_text(uri)} failed while the run was made "
                         f"({console.error_line(cause)}): training starts without it; the run is created, "
                         "and its metrics sent, when the server is back")
                if marked is not None:
                    # named in run.json at once: a driver killed during the ingest (minutes,
                    # for data that outgrows a node) leaves it there for the next job in --out
                    # to mark KILLED -- not RUNNING with nothing naming it (a setup that fails
                    # or is stopped puts the earlier job's run.json back, below)
                    fresh = True
                    _write_state(state_file, run_id, uri, cfg, checkpoints, fingerprint)
                    _end_abandoned_run(out_dir, before, run_id)  # (run.json named it)
            else:  # training does not wait for tracking: the run is created when the server is back
                pending = _deferred_run(uri, **run_args)
                _log(f"MLflow at {redact_text(uri)} is unreachable: training starts without it; the run is "
                     "created, and its metrics sent, when the server is back")
        elif server_reachable(uri):
            earlier = run_status(uri, run_id)
            try:
                reopen_run(uri, run_id)
            except Exception as err:
                if refused(creation_cause(err)):  # as a refused new run: bad input, one line
                    raise ConfigError(f"config error: MLflow at {redact_text(uri)} refused to "
                                      f"continue run {run_id} ({console.error_line(err)})"
                                      ) from None
                if earlier is not None:  # failing for now: applied or not, it ends as it was
                    marked = run_id  # (below); a status not known is not put on it
                raise
            marked = run_id
        else:  # a resume while the server is away: the run is RUNNING again when it is back
            pending = _deferred_run(uri, reopen=run_id)
            _log(f"MLflow at {redact_text(uri)} is unreachable: training goes on without it; run {run_id} "
                 "gets its metrics when the server is back")
        # the data after the run: a store that answers but refuses the run (no permission to
        # write in the experiment) is said before the ingest's minutes, not after them
        refs = table_refs if table_refs is not None else ingest(info, cfg)
        owned = refs if table_refs is None else None
        line = mode_line(refs)
        if show_progress and line:
            _log(line)
        if marked is not None and resumed_with:  # MLflow params never change: the new values
            _record_resume(uri, run_id, resumed_with, cfg)  # as tags, and the config
    except BaseException as err:
        if owned is not None:
            owned.release()
        status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
        if marked is not None and earlier in ("FINISHED", "FAILED", "KILLED"):
            # a resume that failed (or was stopped) before it trained: the run's record is as
            # it was, its status and end time too (a FINISHED run turned FAILED by data gone
            # since)
            if not restore_status(uri, marked, earlier):
                _end(out_dir, uri, marked, earlier)  # (owed, should the store not take it)
        elif marked is not None:  # stopped or failed while it was set up: not left RUNNING
            _end(out_dir, uri, marked, status)  # (owed, should the store not take it)
            if fresh:  # run.json names the earlier job's run again
                _put_back_state(state_file, before)
        if pending is not None:  # a run made once the store came back (during the ingest) is
            # ended too; one not made yet is not made for a job that never ran
            with contextlib.suppress(Exception):
                made = ray.get(pending.made.remote(), timeout=1.5)
                if made is not None:
                    end_run(uri, made, status)
            with contextlib.suppress(Exception):
                ray.kill(pending)
        if half:  # (as at the job's end, below)
            _end_owed_runs(out_dir, None)
        raise
    try:  # from here on the run exists (or is pending): however the job ends, it ends too
        _write_state(state_file, run_id, uri, cfg, checkpoints, fingerprint)
        if show_progress and run_id:
            _log(f"MLflow run {run_id} in {redact_text(uri)}")
        fatal_file = out_dir / "fatal.json"  # a worker's deterministic failure (see worker.train_func)
        for old in (fatal_file, *rank_fatal_files(fatal_file)):  # (an earlier job's)
            old.unlink(missing_ok=True)
        tracking_file = out_dir / "tracking.json"  # metric points rank 0 could not send to MLflow
        # an earlier job's in this --out (this run's, resumed, or another's): sent to their
        # run now, or kept under a name of their own (never dropped)
        # (a resume's tracking.json is this training's, run or not yet: it stays, and the
        # run gets it once made -- parked, without a run to name, it was never sent)
        _send_kept_points(tracking_file, uri, run_id if resume else None, park=not resume)
        _end_owed_runs(out_dir, run_id)  # an earlier job's run it could not mark ended
        _end_abandoned_run(out_dir, before, run_id)  # (its driver killed: RUNNING, no more named)
        result_file = out_dir / "result.json"  # an earlier run's: this one has not finished
        result_file.unlink(missing_ok=True)
        name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # never reuse: Ray
        # Train silently resumes a reused (name, storage_path); resume is explicit via resume_from.
        loop_config = {"config": cfg.to_dict(), "table_refs": refs,
                       # rank 0 asks `pending` for the run while the server is away
                       "run_id": None if pending is not None else run_id,
                       "model_facts": info.facts,  # what the model needs to know of the data
                       "tracking_uri": uri, "fatal_file": str(fatal_file), "storage": str(storage),
                       "tracking_file": str(tracking_file), "pending_run": pending,
                       "resume_from": str(resume_from) if resume_from else None,
                       # rank 0 draws a bar per epoch (ray.experimental.tqdm_ray) when set
                       "progress_bar": show_progress and console.progress_bar_wanted(),
                       "verbose": verbose, "started_at": started_at}
        # each rank's deterministic failure told to the driver too: its file is on the rank's
        # node, which an --out that not every node sees leaves unread here
        told = (ray.remote(num_cpus=0)(Box).options(scheduling_strategy=on_head()).remote()
                if ray.is_initialized() else None)  # (None: a `fit` played without Ray)
        loop_config["fatal_box"] = told
        if fit is None:
            fit = partial(fit_torch_trainer, callbacks=[
                *([_progress_callback(cfg.train.epochs)] if show_progress else []),
                *(extra_callbacks or [])])
        # a run made mid-job goes into run.json as soon as it exists (a driver killed later
        # leaves it there for --resume, not a second run beside a RUNNING one)
        watching = (_watch_deferred_run(pending, state_file)
                    if pending is not None and run_id is None else None)
        try:
            metrics, checkpoint_path = fit(cfg, loop_config, name, storage)
        finally:
            if watching is not None:
                watching.set()
            failures = _told_failures(told)
        raise_fatal(fatal_file, metrics, failures)
        if checkpoint_path is None and resume_from is not None:
            # a resume from the last epoch's checkpoint (the job stopped while it logged its
            # model, say) trains no epoch: the run ends at that checkpoint, with its metrics
            checkpoint_path = resume_from
            metrics = metrics or dict(load_checkpoint(resume_from)["metrics"])
        raise_unfinished(cfg, metrics)
        if pending is not None and run_id is None:
            run_id = _deferred_run_id(pending, state_file)
            if run_id is None:
                try:
                    why = ray.get(pending.refusal.remote(), timeout=10)
                except Exception:  # the actor gone: nothing known
                    why = None
                raise_refusal(why, uri, tracking_file)
        if run_id is None:
            _log(f"MLflow at {redact_text(uri)} was unreachable for the whole job: no run was recorded; the "
                 f"metric points are in {tracking_file}")
        elif checkpoint_path is not None and cfg.tracking.log_model:
            try:
                log_model(uri, run_id, checkpoint_path)
            except Exception as e:  # tracking never fails a trained job: the weights are kept
                _log(f"the model could not be logged to MLflow ({console.error_line(e)}); it is "
                     f"in {checkpoint_path}")
        unsent = _kept_at_end(tracking_file, uri, run_id)
        if unsent and run_id is not None:  # (no run at all: said above)
            _log(f"MLflow run {run_id} misses {unsent} metric point(s): the store was "
                 "unreachable when training ended (result.json: metrics_unsent)")
        summary = {
            "status": "FINISHED", "metrics": metrics, "mlflow_run_id": run_id,
            "metrics_unsent": unsent,
            "tracking_uri": uri, "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "config": cfg.to_dict(), "ray_run_name": name,
        }
        # (masked: the file users share; run.json keeps what a --resume needs)
        write_json(result_file, redact(summary))
        if run_id is not None and not _end(out_dir, uri, run_id, "FINISHED"):
            write_json(result_file, redact({**summary, "mlflow_run_ended": False}))
    except (SystemExit, KeyboardInterrupt) as err:
        if isinstance(err, SystemExit) and threading.current_thread() is not threading.main_thread():
            raise  # Tune stopped this sweep trial (ASHA): the sweep ends its run (KILLED)
        _unfinished(out_dir)
        # Ctrl-C or SIGTERM (`ray job stop`) on the driver: Ray ends its wait with SystemExit;
        # a Ctrl-C after it (logging the model, say) is a KeyboardInterrupt. A run created
        # once the server came back is asked for briefly (`ray job stop` kills 3 s after).
        if pending is not None:
            # the run made (or a resume's run reopened) already, if any: none is begun now (it
            # would outlive the 1.5 s and be left RUNNING); a resume's run not reopened yet is
            # as it was, not this job's to mark
            run_id = _deferred_run_id(pending, state_file, timeout_s=1.5, force=False)
        if isinstance(err, SystemExit) and err.code == signal.SIGTERM and ray.is_initialized():
            # SIGTERM (`ray job stop`): the process ends, and training with it now -- the Train
            # controller and workers are this driver's actors -- not after the run is marked
            # KILLED (they trained, checkpointed and logged on until the SIGKILL 3 s later)
            try:
                ray.shutdown()
            except Exception:  # the run is marked all the same
                pass
        ended = ""
        if run_id is not None:  # the store may refuse: say so rather than claim it ended
            ended = (f"; MLflow run {run_id} KILLED" if _end(out_dir, uri, run_id, "KILLED",
                                                              say=False)
                     else f"; MLflow run {run_id} could not be marked KILLED (still RUNNING: the "
                          "next job in this --out marks it)")
        # `ray job stop` kills 3 s after its SIGTERM: no checksum of a large state read here
        how = (f"continue it from its last checkpoint with --resume --out {out_dir}"
               if find_latest_checkpoint(storage, checksum=False) is not None
               else "no checkpoint was written yet: start it again")
        raise TrainingInterrupted(f"training interrupted{ended}; {how}") from None
    except BaseException:
        _unfinished(out_dir)
        if pending is not None:  # (a resume's run not reopened yet: as it was, unmarked)
            run_id = _deferred_run_id(pending, state_file, force=run_id is None)
        if run_id is not None:
            # the points rank 0 kept (those up to a divergence, say: what explains the failure)
            _kept_at_end(out_dir / "tracking.json", uri, run_id)
            _end(out_dir, uri, run_id, "FAILED")
        raise
    finally:
        if owned is not None:  # the streaming mode's servers and keeper (a notebook's job
            owned.release()  # would keep them, and the data, for its kernel's life)
        if half:  # a run half made while the store went away: marked FAILED where it is back
            # (the pending run may have done so), else left owed in --out for the next job
            _end_owed_runs(out_dir, run_id)
        if pending is not None:  # (so would a failed job's traceback its handle: asked above)
            with contextlib.suppress(Exception):
                ray.kill(pending)
    return summary


def _record_resume(uri: str, run_id: str, changed: dict[str, str], cfg: Config) -> None:
    """A --resume that changed what a resume may change (train.epochs, say): MLflow keeps a
    run's params as first logged, so the new values go on as tags `resumed.<key>` and the
    config resumed with as the artifact `config.resumed.yaml` (the latest resume's)."""
    try:
        log_summary(uri, run_id, {}, redact({f"resumed.{k}": v for k, v in changed.items()}))
        log_text(uri, run_id, yaml.safe_dump(redact(cfg.to_dict())), "config.resumed.yaml")
    except Exception as err:  # tracking never stops training
        _log(f"the resumed config could not be recorded in MLflow ({console.error_line(err)})")


def _send_kept_points(tracking_file: Path, uri: str, run_id: str | None, *,
                      park: bool) -> None:
    """Metric points jobs in this --out could not send: `tracking.json`, and the
    `tracking-<time>-<id>.json` files an earlier start kept. Each goes to the run its file
    names (`mlflow_run_id`), in the store it names (`tracking_uri`; else `uri`, this job's: a
    file of an older version); a tracking.json without a run (written before the run existed,
    or by an older version) belongs to `run_id` (a --resume's run, or the job's own at its end;
    None: a fresh run's start, whose run it is not). Sent: the file goes. Not (no run, no server):
    `park` (a job's start) renames tracking.json to a name of its own, which the new job's
    tracking.json does not replace; the others stay as they are. At a job's end (not `park`)
    tracking.json keeps its count of points not sent (`metrics_unsent`: those the store
    refused, or dropped beyond the buffer, are counted but not listed)."""
    files = [*sorted(tracking_file.parent.glob("tracking-*.json")),
             *([tracking_file] if tracking_file.exists() else [])]
    reachable: dict[str, bool] = {}  # each store asked once, when there is something to send
    for f in files:
        try:
            data = json.loads(f.read_text())
            points = data.get("points") or []
            target = data.get("mlflow_run_id") or (run_id if f == tracking_file else None)
            store = data.get("tracking_uri") if isinstance(data.get("tracking_uri"), str) else uri
            unlisted = int(data.get("metrics_unsent") or 0) - len(points)
        except (OSError, ValueError, AttributeError, TypeError):
            points, target, store, unlisted = None, None, uri, 0  # unreadable: kept, below
        if points and target is not None and store not in reachable:
            reachable[store] = server_reachable(store)
        if points and target is not None and reachable[store]:
            try:
                send_points(store, target, points)
                _log(f"sent {len(points)} metric point(s) that run {target} could not send "
                     f"before ({f.name})")
                points = []
            except Exception as err:
                _log(f"the earlier metric points could not be sent ({console.error_line(err)})")
                # (failing: not asked again per file)
                reachable[store] = reachable[store] and refused(err)
        if points == []:
            if not park and f == tracking_file and unlisted > 0:  # this job's count stays
                write_json(f, {**data, "metrics_unsent": unlisted, "points": []}, nan_as_null=False)
            else:
                f.unlink(missing_ok=True)
            continue
        if park and f == tracking_file:
            kept = tracking_file.with_name(f"tracking-{time.strftime('%Y%m%d-%H%M%S')}-"
                                           f"{uuid.uuid4().hex[:6]}.json")
            os.replace(tracking_file, kept)
            _log(f"the metric points {'run ' + target if target else 'a run'} could not send "
                 f"before are kept in {kept}")


OWED = "mlflow_status.json"  # {run id: {status its job could not mark it with, tracking_uri}}


def _end(out_dir: Path, uri: str, run_id: str, status: str, say: bool = True) -> bool:
    """End the job's run as `status`; the status is owed first -- kept in --out (`OWED`), for
    the next job there to mark (`_end_owed_runs`) should the store not take it, or the process
    be killed meanwhile (`ray job stop` kills 3 s after its SIGTERM) -- and settled once the
    store took it. Said when `say` and not taken. Whether the run was marked."""
    _owe(out_dir, run_id, {"status": status, "tracking_uri": uri})
    if end_run(uri, run_id, status):
        _owe(out_dir, run_id, None)
        return True
    if say:
        _log(f"MLflow run {run_id} could not be marked {status}: it stays RUNNING until the "
             f"next job in {out_dir} marks it ({OWED})")
    return False


def _owed(out_dir: Path) -> dict[str, Any]:
    """`OWED`'s entries ({} for none, or for a file that is not such a list)."""
    try:
        owed = json.loads((out_dir / OWED).read_text())
    except (OSError, ValueError):
        return {}
    return {run: e for run, e in owed.items() if isinstance(e, dict)
            and isinstance(e.get("status"), str) and isinstance(e.get("tracking_uri"), str)
            } if isinstance(owed, dict) else {}


def _owe(out_dir: Path, run_id: str, entry: dict[str, str] | None) -> None:
    """`run_id`'s entry in `OWED` set (None: removed). Bookkeeping: never an error."""
    try:
        owed = {**_owed(out_dir), run_id: entry}
        left = {run: e for run, e in owed.items() if e is not None}
        if left:
            write_json(out_dir / OWED, left)
        else:
            (out_dir / OWED).unlink(missing_ok=True)
    except Exception as err:
        _log(f"{out_dir / OWED} could not be written ({console.error_line(err)})")


def _end_owed_runs(out_dir: Path, current: str | None) -> None:
    """The runs earlier jobs in `out_dir` could not mark ended (`_end`), marked now where their
    store takes it -- but a run FINISHED since (a --resume finished it) keeps its status, and
    its entry goes (one KILLED or FAILED takes a FINISHED owed: a resume that trained to its
    end while the store was away); `current` (this job's run: a --resume continues it) is this
    job's to end, and dropped from the list."""
    owed = _owed(out_dir)
    if current in owed:
        _owe(out_dir, current, None)
    others = {run: e for run, e in owed.items() if run != current}
    reachable = {e["tracking_uri"]: server_reachable(e["tracking_uri"]) for e in others.values()}
    for run, e in others.items():
        if not reachable[e["tracking_uri"]]:
            continue
        if run_status(e["tracking_uri"], run) == "FINISHED":
            _owe(out_dir, run, None)
        elif end_run(e["tracking_uri"], run, e["status"]):
            _owe(out_dir, run, None)
            _log(f"MLflow run {run} marked {e['status']}, as the job that ran it could not")


def _put_back_state(state_file: Path, before: dict[str, Any]) -> None:
    """run.json as the earlier job in --out left it (`before`; none: removed), where this job's
    setup failed: its run never trained, and a --resume there goes on with that job's.
    Bookkeeping, never an error."""
    try:
        if before:
            write_json(state_file, before)
        else:
            state_file.unlink(missing_ok=True)
    except OSError as err:
        _log(f"{state_file} could not be put back ({console.error_line(err)})")


def _earlier_state(out_dir: Path) -> dict[str, Any]:
    """run.json of an earlier job in `out_dir` (one this fresh job overwrites), {} when none or
    damaged (overwritten all the same)."""
    try:
        return run_state(out_dir)
    except ConfigError:
        return {}


def _end_abandoned_run(out_dir: Path, before: dict[str, Any], current: str | None) -> None:
    """A fresh job in an --out whose earlier job's driver was killed outright (SIGKILL: it
    marked nothing) takes over run.json, the only file naming that job's run: left RUNNING, it
    would stay so for good (no --resume could reach it any more). Marked KILLED here -- only
    where that driver is known gone (`driver_alive`: two jobs may share an --out, the default
    runs/train of one checkout; one on another host, or of an older run.json, is left); a run
    that ended is left as it is, and `current`, this job's run (a sweep trial Tune runs again
    continues its own), too. Bookkeeping, never an error."""
    run_id, uri = before.get("mlflow_run_id"), before.get("tracking_uri")
    if not (isinstance(run_id, str) and isinstance(uri, str)) or run_id == current \
            or driver_alive(before.get("driver")) is not False or not server_reachable(uri):
        return
    if run_status(uri, run_id) == "RUNNING" and _end(out_dir, uri, run_id, "KILLED"):
        _log(f"MLflow run {run_id} of the earlier job in {out_dir} was still RUNNING (its driver "
             "was killed): marked KILLED, as this job's run replaces it in run.json")


def _kept_at_end(tracking_file: Path, uri: str, run_id: str | None) -> int:
    """At a trained job's end: the points kept in this --out sent where the store is back
    (`_send_kept_points`: an attempt before a restart left some, or an earlier job), and the
    count of this job's points still not sent (`metrics_unsent`). Bookkeeping never fails a
    trained job: a file it cannot read or write is said, and left."""
    try:
        _end_owed_runs(tracking_file.parent, run_id)
        if run_id is not None:
            _send_kept_points(tracking_file, uri, run_id, park=False)
        return int(json.loads(tracking_file.read_text())["metrics_unsent"]
                   if tracking_file.exists() else 0)
    except Exception as err:
        _log(f"{tracking_file} could not be read ({console.error_line(err)}); its points stay "
             "there")
        return 0


def _unfinished(out_dir: Path) -> None:
    """A job stopped or failed after its result.json was written (while its run was marked
    FINISHED): the file goes, as the run is KILLED or FAILED instead."""
    (out_dir / "result.json").unlink(missing_ok=True)


def raise_unfinished(cfg: Config, metrics: dict[str, Any] | None) -> None:
    """The workers returned before the last epoch (or train.max_steps) without a failure the
    driver could read -- rank 0's fatal.json on a node this one does not see, say: the run is
    FAILED, never FINISHED with the last epoch's metrics.

    >>> from pipeline.config import load_config
    >>> raise_unfinished(load_config(None, ["train.epochs=3"]), {"epoch": 3.0, "step": 30.0})
    >>> raise_unfinished(load_config(None, ["train.epochs=3", "train.max_steps=20"]),
    ...                  {"epoch": 2.0, "step": 20.0})
    >>> raise_unfinished(load_config(None, ["train.epochs=3"]), {"epoch": 1.0, "step": 10.0})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.launch.TrainingStopped: the workers stopped after epoch 1 of 3 without a result...
    """
    m = metrics or {}
    epoch, step, cap = int(m.get("epoch", 0)), int(m.get("step", 0)), cfg.train.max_steps
    if epoch < cfg.train.epochs and not (cap is not None and step >= cap):
        raise TrainingStopped(
            f"the workers stopped after epoch {epoch} of {cfg.train.epochs} without a result "
            "or a failure this node can read (a worker's fatal.json is written under --out: "
            "give it a path every node sees); see the workers' logs")


def fit_torch_trainer(cfg: Config, loop_config: dict[str, Any], name: str, storage: Path, *,
                      callbacks: list[Any]) -> tuple[dict[str, Any], Path | None]:
    """The training on `scaling.num_workers` Ray Train workers (a TorchTrainer): restarts of
    the worker group from the last checkpoint up to `scaling.max_failures`."""
    trainer = TorchTrainer(
        partial(_worker_entry, train_func), train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(
                log_level=console.train_log_level(loop_config["verbose"]))),
    )
    # Ray Train installs its own SIGINT handler in `fit` (the first Ctrl-C aborts the run, the
    # third exits) and leaves it installed: put ours back, so that a Ctrl-C after training
    # (logging the model, say) is a KeyboardInterrupt that ends the run KILLED.
    main = threading.current_thread() is threading.main_thread()
    held = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except ray.train.TrainingFailedError as err:
        _raise_if_data_lost(err, loop_config.get("table_refs"), cfg)
        raise
    finally:
        if held is not None:
            signal.signal(signal.SIGINT, held)
    return dict(result.metrics or {}), Path(result.checkpoint.path) if result.checkpoint else None


def find_on_workers(cfg: Config, info: DatasetInfo, max_memory: int | None, *,
                    address: str | None = None, progress: bool = False) -> dict[str, Any]:
    """`find-batch-size --on-workers`: the search on `scaling.num_workers` Ray Train workers
    (`pipeline.worker.find_func`), each rank on its own device (a cluster's GPU workers, where
    its head has none), the ranks agreeing on every size; the content of find_batch_size.json,
    as rank 0 measured it. The dataset reaches the workers through the object store, as a
    job's does in the object-store mode (the ranks read no file; Ray Data's read needs the
    data readable where its tasks run, as for `train`). Not tried again
    on a failure (a search is not resumed: run it again); an input error the workers met is
    raised as the ConfigError it was (exit 2)."""
    import tempfile

    from pipeline.worker import find_func

    connect(address)
    check_workers_fit([cfg])
    whole = cfg.with_overrides({"data.mode": "object_store"})
    blocks = ingest(info, whole)
    box = ray.remote(num_cpus=0)(Box).options(scheduling_strategy=on_head()).remote()
    name = f"find-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    verbose = console.is_verbose()
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-find-") as storage:  # (run state only)
            trainer = TorchTrainer(
                partial(_worker_entry, find_func),
                train_loop_config={"config": whole.to_dict(), "info": info, "table_refs": blocks,
                                   "max_memory": max_memory, "progress": progress, "box": box,
                                   "verbose": verbose},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                    resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                run_config=ray.train.RunConfig(
                    name=name, storage_path=storage,
                    failure_config=ray.train.FailureConfig(max_failures=0),
                    logging_config=ray.train.LoggingConfig(
                        log_level=console.train_log_level(verbose))))
            main = threading.current_thread() is threading.main_thread()
            held = signal.getsignal(signal.SIGINT) if main else None  # (as fit_torch_trainer)
            try:
                result = trainer.fit()
            except SystemExit as err:  # Ray Train's Ctrl-C: its abort, then exit 0
                if err.code == signal.SIGTERM:  # (`ray job stop`: as it is)
                    raise
                raise KeyboardInterrupt from None
            finally:
                if held is not None:
                    signal.signal(signal.SIGINT, held)
        if result.error:
            raise result.error
        found = ray.get(box.get.remote())
    finally:
        try:
            ray.kill(box)
        except Exception:  # gone already (Ray shut down)
            pass
        blocks.release()
    if found is None:  # the workers ended without an answer: Ray Train's own Ctrl-C abort
        raise KeyboardInterrupt
    if "error" in found:
        raise ConfigError(found["error"])
    return found["result"]


class Box:
    """One value handed from a worker to the driver (an actor of no CPU, on the head)."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def put_item(self, key: Any, value: Any) -> None:
        """One of several values, by key (each rank's own, say)."""
        self.value = {**(self.value or {}), key: value}


LOST_NODE_WAIT_S = 30.0  # how long a failed streaming job waits for Ray to call a node lost


def _raise_if_data_lost(err: Exception, blocks: Any, cfg: Config) -> None:
    """A job that failed with part of its streamed dataset gone ends on one line saying so
    (TrainingStopped), not Ray's traceback: its restarts (`scaling.max_failures`) ran out. The
    first rank to fail is often one whose peer's node went (a gloo connection reset), before
    Ray has noticed the node gone: its servers are asked again for up to LOST_NODE_WAIT_S."""
    if not isinstance(blocks, Blocks) or blocks.keeper is None:
        return
    deadline = time.monotonic() + LOST_NODE_WAIT_S
    lost = DATA_LOST in str(err) or blocks.lost_nodes(LOST_NODE_WAIT_S)
    while not lost and time.monotonic() < deadline - 1.0:
        time.sleep(1.0)
        lost = bool(blocks.lost_nodes(max(5.0, deadline - time.monotonic())))
    if lost:
        raise TrainingStopped(
            f"{DATA_LOST} (data.mode=streaming) and the job has no restart left "
            f"(scaling.max_failures={cfg.scaling.max_failures}); run it again with --resume: "
            "it reads the data again and continues from the last checkpoint") from None


def _deferred_run(uri: str, **kwargs: Any) -> Any:
    """A `DeferredRun` actor (no CPU), on the head node: never on a node that goes."""
    return ray.remote(num_cpus=0)(DeferredRun).options(
        scheduling_strategy=on_head()).remote(uri, **kwargs)


def _watch_deferred_run(pending: Any, state_file: Path, every_s: float = 2.0
                        ) -> threading.Event:
    """A thread asking the `DeferredRun` actor every `every_s` for the run, which it writes
    into run.json once made; set the event returned to stop it."""
    stop = threading.Event()

    def watch() -> None:
        asked = None  # one question at a time: the actor answers them in turn
        while not stop.wait(every_s):
            try:
                asked = asked or pending.run_id.remote()
                if not ray.wait([asked], timeout=0)[0]:
                    continue  # still making the run: asked again later
                run_id, asked = ray.get(asked), None
                if run_id is not None and not stop.is_set():
                    _write_run_id(state_file, run_id)
                    return
            except Exception:  # the actor gone (the job ending), or run.json not writable
                return

    threading.Thread(target=watch, name="deferred-run-watch", daemon=True).start()
    return stop


def _deferred_run_id(pending: Any, state_file: Path, timeout_s: float = 60,
                     force: bool = True) -> str | None:
    """The id of the run a job created when the server came back (None: it never did); kept
    in run.json, so that a --resume continues that run. `force=False`: the run made already,
    if any -- none is begun (`DeferredRun.made`)."""
    try:
        asked = pending.run_id.remote(force=True) if force else pending.made.remote()
        run_id = ray.get(asked, timeout=timeout_s)
    except Exception:  # the actor is gone with a failing job
        return None
    if run_id is not None:
        _write_run_id(state_file, run_id)
    return run_id


def _write_state(state_file: Path, run_id: str | None, uri: str, cfg: Config,
                 checkpoints: str, data: dict[str, Any] | None = None) -> None:
    """run.json: the job's MLflow run (None until a deferred run exists), its config and its
    data's `data_fingerprint`, which a --resume continues and compares against, its
    checkpoints' folder under ray_results/, and its driver (`driver_alive` asks after it)."""
    write_json(state_file, {"mlflow_run_id": run_id, "tracking_uri": uri, "config": cfg.to_dict(),
                            "checkpoints": checkpoints, "data": data,
                            "driver": this_driver()})


def this_driver() -> dict[str, Any]:
    """What run.json keeps of the driver (`driver_alive` asks after it): its host and pid, and
    where Linux's /proc says them, the machine's boot (a cloned VM of the same hostname has
    another), its pid namespace (a container sharing the hostname has another) and its start
    time (a pid used again by a later process starts later)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), **_proc_facts(os.getpid())}


def _proc_facts(pid: int) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    try:
        facts["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        facts["pid_ns"] = os.stat(f"/proc/{pid}/ns/pid").st_ino
        # field 22 of /proc/PID/stat, counted after the command's closing parenthesis
        facts["started"] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):  # not Linux, or the process gone meanwhile
        pass
    return facts


def driver_alive(driver: Any) -> bool | None:
    """Whether the driver a run.json names (`this_driver`) still runs: None when this
    machine cannot tell (another host, boot or pid namespace -- a cloned VM, a container --, or
    a run.json written before the driver was kept; Windows, where the probe would end it).

    >>> driver_alive(this_driver())
    True
    >>> driver_alive({**this_driver(), "started": -1})  # its pid, taken by a later process
    False
    >>> driver_alive({"host": "elsewhere", "pid": 1}), driver_alive(None)
    (None, None)
    >>> driver_alive({**this_driver(), "pid_ns": -1}) if "pid_ns" in this_driver() else None
    """
    if os.name == "nt" or not isinstance(driver, dict) \
            or driver.get("host") != socket.gethostname() or not isinstance(driver.get("pid"), int):
        return None
    here = _proc_facts(os.getpid())
    if any(key in driver and driver[key] != here.get(key) for key in ("boot", "pid_ns")):
        return None
    try:
        os.kill(driver["pid"], 0)  # (no signal sent: does it exist?)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid: it exists
        pass
    now = _proc_facts(driver["pid"]).get("started")
    if "started" in driver and now is not None and now != driver["started"]:
        return False  # the pid is another, later process's
    return True


def raise_refusal(why: tuple[bool, str] | None, uri: str, tracking_file: Path) -> None:
    """The store came back during the job and would not make its run (`why`:
    `DeferredRun.refusal`): as at a job's start, a ConfigError where it refused it (exit 2),
    else a failure in one line (`TrainingStopped`, exit 1; a traceback around the line before)
    -- not "unreachable for the whole job" and exit 0. The checkpoints and tracking.json stay.

    >>> raise_refusal(None, "http://h:5000", Path("tracking.json"))  # not refused: nothing
    >>> raise_refusal((True, "RestException: RESOURCE_DOES_NOT_EXIST: experiment deleted"),
    ...               "http://me:pw@h:5000", Path("out/tracking.json"))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: config error: MLflow at http://me:***@h:5000 refused the job's...
    >>> raise_refusal((False, "MlflowException: database is locked"), "http://h:5000",
    ...               Path("tracking.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.launch.TrainingStopped: MLflow at http://h:5000 could not make the job's run when...
    """
    if why is None:
        return
    refused_it, line = why
    msg = (f"MLflow at {redact_text(uri)} {'refused' if refused_it else 'could not make'} the "
           f"job's run when it was back ({line}): no run was recorded; the training's metric "
           f"points are in {tracking_file}, its checkpoints kept")
    if refused_it:
        raise ConfigError(f"config error: {msg}")
    raise TrainingStopped(msg)


def _write_run_id(state_file: Path, run_id: str) -> None:
    """run.json with the run made once the server came back (the rest as `_write_state` wrote
    it) -- where it is still this job's: two jobs may share an --out (the default runs/train),
    and a later one's run.json, overwritten with this job's run, resumed this run with the other
    job's checkpoints."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):  # (not written yet: the job failed as it began)
        return
    driver, here = state.get("driver") or {}, this_driver()
    if (driver.get("host"), driver.get("pid")) != (here["host"], here["pid"]):
        return
    write_json(state_file, {**state, "mlflow_run_id": run_id})


class TrainingInterrupted(KeyboardInterrupt):
    """The driver was interrupted (Ctrl-C, SIGTERM) while training: the run is KILLED."""


class TrainingStopped(RuntimeError):
    """Training ended early and is not retried: a deterministic failure (a non-finite loss
    under train.nonfinite=stop, say), or streamed data lost with the node that held it."""


def _told_failures(box: Any) -> dict[int, dict[str, Any]]:
    """The deterministic failures the ranks told `box` (rank -> its fatal record), and the box
    ended; {} when none was told or the box cannot be asked."""
    if box is None:
        return {}
    try:
        return ray.get(box.get.remote(), timeout=10) or {}
    except Exception:  # (gone with Ray, say: the files are read still)
        return {}
    finally:
        with contextlib.suppress(Exception):
            ray.kill(box)


def raise_fatal(fatal_file: Path, metrics: dict[str, Any] | None = None,
                told: dict[int, dict[str, Any]] | None = None) -> None:
    """A worker met a deterministic failure and ended the run without a retry: raise it here,
    as ConfigError (bad input: exit 2) or TrainingStopped (exit 1), with the worker's line.
    The ranks' records: their files in --out (`worker.fatal_path`), else what they `told` the
    driver (rank -> record: a file on another node's disk is not read here). `metrics`: the
    job's last report, a last resort: its `fatal_error` ends the run unFINISHED where neither
    is at hand (Ray Train V2 keeps a report's metrics only with a checkpoint, which a failing
    rank never reports: with it the line is the one below).

    >>> raise_fatal(Path("/nowhere/fatal.json"), None, {0: {"kind": "input", "message": "x",
    ...                                                    "peer": False}})
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: x

    >>> import tempfile
    >>> raise_fatal(Path(tempfile.mkdtemp()) / "fatal.json", {"fatal_error": 1.0})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.launch.TrainingStopped: a worker ended training on a deterministic failure, but...
    """
    told = told or {}
    fatal = json.loads(fatal_file.read_text()) if fatal_file.exists() else told.get(0)
    if fatal is None:
        if metrics and FATAL in metrics:
            raise TrainingStopped(
                f"a worker ended training on a deterministic failure, but its message "
                f"({fatal_file.name}) is not on this node: give --out a path on storage every "
                "node sees")
        return
    if fatal.get("peer"):  # rank 0 knows only that another rank met bad input: that rank's own
        # line, in its file where that is on this node (`worker.fatal_path`), else as told,
        # names the culprit
        own = [told[r] for r in sorted(told) if r != 0]
        for path in rank_fatal_files(fatal_file):
            with contextlib.suppress(OSError, ValueError):
                own.insert(0, json.loads(path.read_text()))
                break
        fatal = own[0] if own else fatal
    if fatal["kind"] == "input":
        raise ConfigError(fatal["message"])
    raise TrainingStopped(fatal["message"])
