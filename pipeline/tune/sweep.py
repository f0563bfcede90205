"""Ray Tune sweeps: batch size x LR scaling rule x base LR (x anything the config has), ASHA or
FIFO, one MLflow parent run per sweep with one nested run per trial.

    python -m pipeline tune --config jobs/configs/sweep_digits.yaml --out runs/sweep

How a trial runs. Under Ray Train V2 a `TorchTrainer` cannot itself be a Tune trainable, so
each trial is a *function* (`_run_trial`) that applies the trial's overrides -- Tune's search
space uses the config's own dotted keys -- to the base config and calls `run_training`, whose
TorchTrainer forwards every epoch's report to Tune (`TuneReportCallback`). The trial's MLflow
run is `run_training`'s own run, nested under the sweep's parent run.

A trial of one worker on the sweep's dataset (`tune.trial_runner: auto`) skips the
TorchTrainer: it calls the same worker function in its own Tune actor (pipeline/tune/trial.py),
which spares it Ray Train's start-up (a controller, a worker group, a process group); when
every trial does, Tune hands a finished trial's actor to the next one (`reuse_actors`), which
finds the pipeline imported. Every trial reads the dataset the driver ingested once for the
whole sweep; a trial that changes `data.*` ingests its own.

Resources. A trial that trains in its actor reserves the worker's CPUs (and GPU) through Tune.
A TorchTrainer trial's function takes no CPU (`trial.trial_resources`); its TorchTrainer asks
Ray for its workers itself. We do *not* reserve those workers in a Tune placement group: Train
V2 makes its own placement group for them, so a Tune reservation would hold the CPUs twice.
Instead the number of concurrent trials is capped at what the cluster can run at once at its
largest (the autoscaler's maximum where one is configured), floor(CPUs / (num_workers x
cpus_per_worker)) (and GPUs likewise, `trial_concurrency`): every running trial's workers fit
together, so no trial waits forever on workers (no deadlock), and a trial that ASHA stops frees
them when its actor exits (its controller and workers go with it). Trials that all train in
their actors need no such cap: Tune starts those its reservations fit.

Where things go (`out_dir`):

    sweep.json                         the sweep's name, parent run id, base config (--resume)
    ray_results/<sweep>/               Tune's experiment state (restored by --resume)
    trials/<sweep>/<trial_id>/         each trial's run_training folder (checkpoints, run.json)
    trials.csv, result.json, summary.md, accuracy_vs_batch.png, steps_vs_batch.png

Resume. Every sweep gets a fresh name (reusing a Tune name silently resumes; resuming is
explicit). `resume=True` restores the sweep recorded in sweep.json with `Tuner.restore`:
finished, early-stopped and errored trials are not run again; an interrupted trial continues
its own MLflow run from its last epoch checkpoint.

After the trials: `results.settle_trials` reads them back from MLflow, `report.write_report`
writes the answer (pipeline/tune/results.py, report.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import console
from pipeline.config import Config, ConfigError, changed_keys, validate
from pipeline.data.datasets import DatasetInfo
from pipeline.files import run_state, write_json
from pipeline.redact import redact, redact_text
from pipeline.tracking import (
    close_open_runs,
    end_run,
    log_text,
    reopen_run,
    server_reachable,
    start_run,
)
from pipeline.tune import LOADED_AT
from pipeline.tune.analysis import summary_table
from pipeline.tune.report import clear_report, write_report
from pipeline.tune.results import error_summary, ran_its_budget, settle_trials
from pipeline.tune.space import (
    check_trials,
    count_trials,
    parse_search_space,
    trial_concurrency,
    with_absolute_paths,
)

# Per-process state, on purpose: the first trial an actor runs counts its fixed cost from when
# the actor loaded the pipeline (`LOADED_AT`: its imports, then torch's and MLflow's in the
# trial); the actor's later trials count from their own start. Not counted: the Ray worker's
# own start and its import of Ray Tune.
_ACTOR_STARTED_AT: float | None = LOADED_AT


# -- the search space -------------------------------------------------------------------------
def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's param space, keyed by the config's dotted keys. `tune.search: grid` expands every
    `grid` spec (each point run `num_samples` times); `random` draws every `grid` list like a
    `choice`, `num_samples` trials in all. `choice`/`uniform`/`loguniform` are drawn per trial.
    `optuna` treats a `grid` like `random` does; Optuna's TPE sampler picks the values."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, (kind, values) in parse_search_space(cfg).items():
        if kind == "grid":
            space[key] = (tune.grid_search(values) if cfg.tune.search == "grid"
                          else tune.choice(values))
        elif kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        else:
            space[key] = tune.loguniform(*values)
    return space


def search_algorithm(cfg: Config, concurrency: int | None = None) -> Any:
    """Tune's search algorithm, seeded with `train.seed` (the same draws on every run of the
    sweep): Tune's own grid/random generator, which takes the limit of `concurrency` trials at
    a time itself (None: no limit; Tune ignores TuneConfig's `max_concurrent_trials` beside
    it), or for `tune.search: optuna` Optuna's TPE sampler (limited through TuneConfig)."""
    seed = cfg.train.seed % 2**32  # NumPy's RandomState: below 2^32
    if cfg.tune.search != "optuna":
        from pipeline.tune.resumable import Generator

        return Generator(max_concurrent=concurrency or 0, random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped before every trial ended (Ctrl-C, or SIGTERM as `ray job stop`
    sends): its runs are KILLED, --resume goes on."""


@contextlib.contextmanager
def _tune_stops_on_ctrl_c() -> Iterator[threading.Event]:
    """Around Tune's `fit`: Ctrl-C stops Tune its own graceful way (it saves the experiment's
    state one last time, for --resume) and the event says it happened. Tune's `fit` returns as
    if the sweep were done (the trial it stopped reads TERMINATED), so without the event an
    interrupted sweep would be reported and its parent run marked FINISHED. Tune registers its
    stop handler for SIGUSR1 as well as SIGINT; ours, in SIGINT's place, sets the event and
    raises SIGUSR1. Before Tune has installed its handler (`fit` sets up the experiment first)
    and at a second Ctrl-C, ours interrupts at once (KeyboardInterrupt). Only the main thread
    may set handlers: elsewhere nothing changes."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if stopped.is_set() or signal.getsignal(signal.SIGUSR1) is handlers[signal.SIGUSR1]:
            raise KeyboardInterrupt  # again, or before this fit's Tune listens to SIGUSR1
        stopped.set()
        signal.raise_signal(signal.SIGUSR1)  # Tune's own stop

    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by `fit` (ray/tune/tune.py)
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield stopped
    finally:
        for s, handler in handlers.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


# -- Tune pieces (Ray is imported here, after the input has been validated) ---------------------
def asha(max_epochs: int, max_steps: int | None = None) -> Any:
    """The sweep's ASHA (`pipeline.tune.resumable`: never stops a trial at its last result; its
    rungs survive --resume)."""
    from pipeline.tune.resumable import FinalEpochASHA

    return FinalEpochASHA(max_epochs, max_steps)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # results map back to trials (and MLflow runs) through it


def _short(overrides: dict[str, Any]) -> str:
    names = short_names(list(overrides))
    return " ".join(f"{names[k]}={v}" for k, v in overrides.items())


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest ending that no other key shares (a trial's name, a
    column of the live table).

    >>> list(short_names(["train.seed", "batching.seed", "train.global_batch_size"]).values())
    ['train.seed', 'batching.seed', 'global_batch_size']
    """
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail))
                       for other in keys):
                break
        out[key] = tail
    return out


def _run_trial(overrides: dict[str, Any], *, base: dict[str, Any], info: DatasetInfo, root: str,
               parent_run_id: str, sweep: str, table_refs: Any) -> None:
    """One trial, inside its Tune actor: the base config with the trial's overrides, trained by
    `run_training` (its own nested MLflow run; in this actor or through a TorchTrainer,
    `trial.runs_in_actor`), every epoch reported to Tune."""
    global _ACTOR_STARTED_AT
    # the trial's fixed cost (`startup_s`) counts from here, or from its actor's start
    started_at, _ACTOR_STARTED_AT = _ACTOR_STARTED_AT or time.time(), None
    # A reused actor waits this long for the trial Tune stopped in it to leave (Tune's default
    # is 2 s, after which it fails the next trial; read in this process when Tune resets it).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    import ray.actor
    import ray.data
    from ray import tune

    from pipeline.launch import raise_fatal

    # Several trials ingest at once: their Ray Data progress bars would interleave on the driver.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if isinstance(table_refs, ray.actor.ActorHandle):  # the sweep's holder of its dataset
        table_refs = ray.get(table_refs.get.remote())
    trial_id = tune.get_context().get_trial_id()
    out = Path(root) / trial_id
    if (out / "fatal.json").exists():  # Tune retries a failed trial; bad input or non-finite
        raise_fatal(out / "fatal.json")  # training would fail the same way: not trained again
    try:
        _trial_in(out, overrides, base=base, info=info, parent_run_id=parent_run_id,
                  sweep=sweep, table_refs=table_refs, started_at=started_at)
    except ConfigError as err:  # bad input found in the trial (a combination of swept keys
        # past the sweep's checks, data changed since): kept as the workers keep theirs, so
        # that Tune's retry fails at once, not after reading the data again
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "fatal.json", {"kind": "input", "message": str(err), "peer": False})
        raise


def _trial_in(out: Path, overrides: dict[str, Any], *, base: dict[str, Any], info: DatasetInfo,
              parent_run_id: str, sweep: str, table_refs: Any, started_at: float) -> None:
    """`_run_trial`'s trial in its folder `out`."""
    from ray import tune

    from pipeline.engine.checkpoint import find_latest_checkpoint
    from pipeline.launch import run_training
    from pipeline.tune.space import changes_data, trial_config
    from pipeline.tune.trial import epochs_to_tune, fit_in_actor, runs_in_actor

    trial_id = out.name
    cfg, info = trial_config(Config.model_validate(base), info, {
        **overrides, "tracking.run_name": f"{trial_id} {_short(redact(overrides))}".strip()})
    own_data = changes_data(overrides)
    if (out / "result.json").exists():  # it ended just before the sweep's driver was killed,
        # after Tune last saved its state: not trained again; Tune gets its final metrics
        metrics = json.loads((out / "result.json").read_text())["metrics"]
        tune.report({k: math.nan if v is None else v for k, v in metrics.items()})  # (null: NaN)
        return
    # A trial the sweep's interruption (or a failure Tune retries) cut short continues its
    # MLflow run, from its checkpoint or, before its first one, from the start.
    started = run_state(out)
    resume = bool(started) and find_latest_checkpoint(out / "ray_results") is not None
    in_actor = runs_in_actor(cfg, overrides)
    run_training(cfg, info, out, resume=resume, parent_run_id=parent_run_id,
                 tags={"tune.trial_id": trial_id, "tune.sweep": sweep,
                       "tune.overrides": json.dumps(redact(overrides), default=str),
                       "tune.trial_runner": "actor" if in_actor else "worker_group"},
                 extra_callbacks=[] if in_actor else [epochs_to_tune()], show_progress=False,
                 table_refs=None if own_data else table_refs, started_at=started_at,
                 fit=fit_in_actor if in_actor else None,
                 run_id=None if resume else started.get("mlflow_run_id"))


# -- the sweep ----------------------------------------------------------------------------------
def run_sweep(cfg: Config, info: DatasetInfo, out_dir: Path, *, resume: bool = False,
              address: str | None = None, checked: list[Config] | None = None) -> pd.DataFrame:
    """Run (or with `resume`, continue) the sweep `cfg.tune` describes over `cfg`; return one row
    per trial and write trials.csv, result.json and the plots to `out_dir` and to MLflow.
    `checked`: what `check_trials(cfg)` returned, when the caller has run it already. A sweep
    stopped (Ctrl-C, SIGTERM) raises `SweepInterrupted` with its runs KILLED; from the main
    thread, SIGINT is Tune's graceful stop while its `fit` runs (`_tune_stops_on_ctrl_c`)."""
    out_dir = out_dir.resolve()
    cfg = with_absolute_paths(cfg)  # a trial runs in a folder of Tune's
    # bad input raises ConfigError here, before Ray is imported
    trials = checked if checked is not None else check_trials(cfg, info)
    max_epochs = max(c.train.epochs for c in trials)
    state_file = out_dir / "sweep.json"
    state = _load_state(state_file, cfg) if resume else {
        "name": f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "config": cfg.to_dict()}
    name = state["name"]
    # Resolved here, once: a trial's actor has another working directory and environment.
    uri = state.get("tracking_uri") or cfg.tracking_uri()
    if not server_reachable(uri):  # a job carries on without it; a sweep is read back from it
        raise ConfigError(f"config error: tracking.uri={redact_text(uri)}: no MLflow server "
                          "answers there; a sweep records and compares its trials in it (start "
                          "it first)")
    exp_path = out_dir / "ray_results" / name
    # Tune saves the sweep's state at most every 10 s by default: a driver killed within that
    # time of a trial's end would find it unfinished on --resume. Every second instead (the
    # state is a small file); `_run_trial` does not retrain a trial that had ended anyway.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    import ray
    from ray import tune

    from pipeline.blocks import check_streaming_nodes, on_head
    from pipeline.launch import (
        Box,
        autoscaler_most,
        check_experiment,
        check_store_reachable,
        check_workers_fit,
        connect,
        ingest,
        ray_job_tags,
    )
    from pipeline.tune.trial import every_trial_in_actor, trial_resources

    space = search_space(cfg)
    if resume and not tune.Tuner.can_restore(str(exp_path)):
        raise ConfigError(f"argument error: --resume: no Tune experiment to restore in {exp_path}")
    if not resume:
        check_experiment(uri, cfg.tracking.experiment)
    connect(address)
    if state.get("tracking_uri"):
        check_store_reachable(uri, f"{state_file}: tracking_uri", resumed=True)
    else:
        check_store_reachable(uri, cfg.tracking_source())
    check_streaming_nodes(cfg)  # before the parent run: a refusal leaves no run behind

    def which(trial: Config) -> str:
        now = trial.flat_params()
        shown = ", ".join(f"{k}={now.get(k)}" for k in changed_keys(cfg.to_dict(), trial.to_dict())
                          if k in cfg.tune.search_space)
        return f" [tune.search_space trial {shown}]" if shown else ""

    check_workers_fit(trials, which)  # a trial whose workers could never start would wait
    # result.json is this sweep's answer: an earlier sweep's in the same --out must not stand
    # beside this one's trials.csv while it runs, nor after it fails or is stopped (a refused
    # command leaves it); nor its table and plots (a batch_schedule.png stayed beside a new
    # sweep of constant batches, which draws none)
    clear_report(out_dir)
    in_actors = every_trial_in_actor(cfg)
    # (Optuna's TPE learns from finished trials: as many at once as fit now, as before)
    try:
        most = autoscaler_most()
    except LookupError:  # (check_workers_fit said so): the trials the cluster fits now
        most = None
    concurrency = trial_concurrency(ray.cluster_resources(), trials, cfg.tune.max_concurrent,
                                    in_actors=in_actors and cfg.tune.search != "optuna",
                                    most=most)
    if concurrency is not None:  # (an autoscaler without a maximum: every trial at once)
        concurrency = min(concurrency, count_trials(cfg))
    if resume and cfg.tune.search == "optuna":  # (Tune restores Optuna's limit as it was)
        concurrency = state.get("concurrency", concurrency)
    state["concurrency"] = concurrency
    parent = state.get("parent_run_id")
    resumed = parent is not None
    if resumed:
        reopen_run(uri, parent)
    else:
        params = {**cfg.flat_params(),  # (a swept secret masked: the key's name hides it not)
                  "tune.search_space": json.dumps(redact(cfg.tune.search_space))}
        parent = start_run(uri, cfg.tracking.experiment,
                           run_name=cfg.tracking.run_name or name, params=params,
                           config_yaml=yaml.safe_dump(cfg.to_dict()),
                           tags={**ray_job_tags(), "pipeline.kind": "sweep", "tune.sweep": name,
                                 "tune.scheduler": cfg.tune.scheduler,
                                 "tune.search": cfg.tune.search})

    def interrupted() -> str:
        """What to do next: --resume where Tune saved the sweep (stopped before, during the
        ingest, there is nothing to restore: it starts again)."""
        if tune.Tuner.can_restore(str(exp_path)):
            return f"sweep {name} interrupted; continue it with --resume --out {out_dir}"
        return (f"sweep {name} interrupted before its trials started; run it again (without "
                "--resume: there is nothing to continue)")

    refs = holder = None  # the sweep's dataset, once ingested, and the trials' way to it
    try:  # from here on, however the sweep ends, its parent run ends with it
        if not resumed:
            log_text(uri, parent, json.dumps(redact(cfg.tune.search_space), indent=2),
                     "search_space.json")  # (a swept secret: masked, as in the params)
        state.update(parent_run_id=parent, tracking_uri=uri)
        write_json(state_file, state)
        at_a_time = (f"{concurrency} at a time" if concurrency is not None
                     else "as many at a time as the cluster fits")
        console.say(f"sweep {name}: {count_trials(cfg)} trial(s), {at_a_time}, "
                    f"{cfg.tune.scheduler} scheduler, ranked by {cfg.tune.metric} "
                    f"({cfg.tune.mode})")
        console.say(f"MLflow parent run {parent} in {redact_text(uri)} "
                    f"(experiment '{cfg.tracking.experiment}')")
        refs = ingest(info, cfg)  # once for the sweep: every trial on this dataset reads them
        # The trials reach it through a holder actor, ended with the sweep: Tune keeps the
        # parameters it is given for the life of the process (`with_parameters` registers them
        # with Ray's post-init hooks), so blocks handed to it stayed pinned in a notebook's
        # object store after every sweep.
        holder = ray.remote(num_cpus=0)(Box).options(scheduling_strategy=on_head()).remote()
        ray.get(holder.put.remote(refs))

        def resources(overrides: dict[str, Any]) -> Any:
            swept = {k: v for k, v in overrides.items() if k in cfg.tune.search_space}
            return tune.PlacementGroupFactory(
                [trial_resources(cfg.with_overrides(swept), swept)])

        trainable = tune.with_resources(
            tune.with_parameters(_run_trial,
                                 base=cfg.with_overrides({"tracking.uri": uri}).to_dict(),
                                 info=info, root=str(out_dir / "trials" / name),
                                 parent_run_id=parent, sweep=name, table_refs=holder),
            resources)
        if resume:
            from pipeline.tune.resumable import Generator

            Generator.limit_now = concurrency or 0  # (not the first run's: restored with it)
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric, mode=cfg.tune.mode,
                    scheduler=(asha(max_epochs, cfg.train.max_steps)
                               if cfg.tune.scheduler == "asha" else None),
                    search_alg=search_algorithm(cfg, concurrency),
                    num_samples=cfg.tune.num_samples,
                    # (Tune's own generator takes its limit itself: search_algorithm)
                    max_concurrent_trials=concurrency if cfg.tune.search == "optuna" else None,
                    reuse_actors=in_actors,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(out_dir / "ray_results"),
                    # Tune runs a failed trial again from its checkpoint (its actor killed,
                    # its node lost): also a worker-group trial, whose Tune actor (no CPU)
                    # may sit on a node that goes, and a one-worker trial of a sweep that
                    # also has worker-group trials (Ray Train restarts only worker groups)
                    failure_config=tune.FailureConfig(
                        max_failures=cfg.scaling.max_failures, fail_fast=False),
                    callbacks=[trial_console(cfg, live=console.progress_bar_wanted()
                                             and not console.is_verbose())],
                    verbose=console.tune_verbosity(console.is_verbose())))
        with _tune_stops_on_ctrl_c() as ctrl_c:
            grid = tuner.fit()
        if ctrl_c.is_set() or grid.num_terminated + grid.num_errors < len(grid):
            raise SweepInterrupted(interrupted())
        df = write_report(*settle_trials(grid, cfg, uri, parent), cfg, uri, parent, out_dir,
                          name, grid.experiment_path, info)
    except BaseException as err:
        # Stopped: Ctrl-C, or SIGTERM (`ray job stop`), which Ray's handler turns into SystemExit
        stopped = isinstance(err, KeyboardInterrupt | SystemExit)
        if isinstance(err, SystemExit):  # `ray job stop` kills the driver 3 s after SIGTERM:
            end_run(uri, parent, "KILLED")  # the parent first (one run), then the trials'
        try:
            close_open_runs(uri, cfg.tracking.experiment, parent)
        except KeyboardInterrupt:  # another Ctrl-C while the trials' runs close
            stopped = True
        finally:  # the parent run ends whatever happened while the trials' runs closed
            end_run(uri, parent, "KILLED" if stopped else "FAILED")
        if stopped and not isinstance(err, SweepInterrupted):
            raise SweepInterrupted(interrupted()) from None
        raise
    finally:  # Tune's trials are over: the streaming mode's servers go (a notebook's sweep
        if refs is not None:  # would keep them, and the data, for its kernel's life)
            refs.release()
        if holder is not None:  # and with it the sweep's references to the blocks
            with contextlib.suppress(Exception):  # (gone with its node, or Ray shut down)
                ray.kill(holder)
        if resume:  # (read as Tune restored the generator, inside fit)
            from pipeline.tune.resumable import Generator

            Generator.limit_now = None
    end_run(uri, parent, "FINISHED")
    return df


def _load_state(state_file: Path, cfg: Config) -> dict[str, Any]:
    if not state_file.exists():
        raise ConfigError(f"argument error: --resume: no sweep.json in {state_file.parent}")
    state = run_state(state_file.parent, state_file.name)  # (ConfigError when damaged)
    if not isinstance(state.get("config"), dict) or "name" not in state:
        raise ConfigError(f"argument error: {state_file} is not a sweep's state (no config or "
                          "name): remove it, or use another --out")
    before = state["config"]
    with contextlib.suppress(ConfigError):  # a sweep.json of before the sweep's paths were made
        before = with_absolute_paths(validate(before)).to_dict()  # absolute
    changed = changed_keys(before, cfg.to_dict())
    if changed:
        raise ConfigError(f"argument error: --resume: the config differs from the sweep's "
                          f"in {', '.join(changed)}")
    return state


# -- after the sweep ----------------------------------------------------------------------------
def print_sweep(trials: pd.DataFrame, out_dir: Path) -> None:
    """What `python -m pipeline tune` prints at the end: the table, the best trial, the files."""
    result = json.loads((out_dir / "result.json").read_text())
    best = result["best"]
    tuned = best["config"]["tune"]
    print(summary_table(trials.drop(columns=["error", "mlflow_run_id"]), metric=tuned["metric"],
                        mode=tuned["mode"], score=trials.attrs.get("score")), flush=True)
    shown = "  ".join(f"{k}={best['metrics'][k]:.4f}" for k in ("val_accuracy", "val_loss")
                      if best["metrics"].get(k) is not None)
    print(f"[pipeline] best trial {best['trial_id']} ({_short(best['overrides'])}): {shown}")
    print(f"[pipeline] {result['critical_batch']['sentence']}")
    print(f"[pipeline] result: {out_dir / 'result.json'}; trials: {out_dir / 'trials.csv'}")
    print(f"[pipeline] MLflow parent run {result['parent_run_id']} in {redact_text(result['tracking_uri'])}")
    if result["tracking_uri"].startswith("sqlite:///"):
        print(f"[pipeline] see it: mlflow ui --backend-store-uri {redact_text(result['tracking_uri'])}")


# -- the console: one line per finished trial, a live table on a terminal -----------------------


def trial_line(trial_id: str, overrides: dict[str, Any], status: str, result: dict[str, Any],
               metric: str, error: str = "") -> str:
    """The console line of a finished trial.

    >>> trial_line("ab12_00003", {"train.global_batch_size": 128, "train.lr_scaling": "sqrt"},
    ...            "done", {"epoch": 3, "step": 33, "val_accuracy": 0.95822}, "val_accuracy")
    'trial ab12_00003 (global_batch_size=128 lr_scaling=sqrt): done after 3 epochs, val_accuracy=0.9582'
    >>> trial_line("t3", {"train.global_batch_size": 128}, "done",
    ...            {"epoch": 3, "val_accuracy": 0.95822, "startup_s": 2.04}, "val_accuracy")
    'trial t3 (global_batch_size=128): done after 3 epochs, val_accuracy=0.9582, first step after 2.0 s'
    >>> trial_line("ab12_00004", {}, "ERROR", {}, "val_accuracy", error="ValueError: boom")
    'trial ab12_00004: ERROR after 0 epochs: ValueError: boom'
    """
    shown = f" ({_short(overrides)})" if overrides else ""
    value = result.get(metric)
    score = f", {metric}={value:.4f}" if isinstance(value, int | float) else ""
    startup = result.get("startup_s")
    fixed = f", first step after {startup:.1f} s" if isinstance(startup, int | float) else ""
    why = f": {error}" if error else ""
    return (f"trial {trial_id}{shown}: {status} after {int(result.get('epoch', 0))} epochs"
            f"{score}{fixed}{why}")


def trial_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The live table: one row per trial (id, swept values, status, epoch, metric).

    >>> print(trial_table([{"trial": "t1", "overrides": {"train.global_batch_size": 32},
    ...                     "status": "RUNNING", "epoch": 2, "val_accuracy": 0.91234},
    ...                    {"trial": "t2", "overrides": {"train.global_batch_size": 512},
    ...                     "status": "PENDING"}], "val_accuracy"))
    trial  global_batch_size  status   epoch  val_accuracy
    t1     32                 RUNNING  2      0.9123
    t2     512                PENDING
    """
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    head = ["trial", *short_names(list(keys)).values(), "status", "epoch", metric]
    body = []
    for r in rows:
        value = r.get(metric)
        body.append([r["trial"], *(str(r["overrides"].get(k, "")) for k in keys), r["status"],
                     str(r.get("epoch", "")), f"{value:.4f}" if isinstance(value, int | float) else ""])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [head, *body])


def trial_console(cfg: Config, live: bool) -> Any:
    """A Tune callback (it runs on the driver): a line per finished trial, and on a terminal
    (`live`) the table of every trial redrawn below those lines at each result."""
    from ray.tune import Callback

    epochs, max_steps, metric = cfg.train.epochs, cfg.train.max_steps, cfg.tune.metric

    class TrialConsole(Callback):
        def __init__(self) -> None:
            self.drawn = 0  # lines of the live table on screen
            self.ended: dict[str, str] = {}  # trial id -> how it ended (Tune sets it later)

        def _overrides(self, trial: Any) -> dict[str, Any]:
            return redact({k: v for k, v in (trial.config or {}).items()
                           if k in cfg.tune.search_space})  # (as shown: secrets masked)

        def _redraw(self, trials: list[Any], line: str | None = None) -> None:
            if not live:
                if line:
                    console.say(line)
                return
            out = sys.stdout
            if self.drawn:
                out.write(f"\x1b[{self.drawn}F\x1b[J")  # back to the table's first line, erase
            if line:
                out.write(f"[pipeline] {line}\n")
            rows = [{"trial": t.trial_id, "overrides": self._overrides(t),
                     "status": self.ended.get(t.trial_id, t.status),
                     "epoch": t.last_result.get("epoch", ""), metric: t.last_result.get(metric)}
                    for t in trials]
            table = trial_table(rows, metric)
            out.write(table + "\n")
            out.flush()
            self.drawn = table.count("\n") + 1

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
            self._redraw(trials)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info):
            last, own = trial.last_result or {}, trial.config or {}
            done = ran_its_budget(last, own.get("train.epochs", epochs),
                                  own.get("train.max_steps", max_steps))
            status = self.ended[trial.trial_id] = "done" if done else "stopped early"
            self._redraw(trials, trial_line(trial.trial_id, self._overrides(trial), status, last,
                                            metric))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info):
            # why, in one line (the traceback's last), and where the whole of it is
            error = "; ".join(part for part in (
                error_summary(trial.get_error()),
                f"see {trial.error_file}" if getattr(trial, "error_file", None) else "") if part)
            self.ended[trial.trial_id] = "ERROR"
            self._redraw(trials, trial_line(trial.trial_id, self._overrides(trial), "ERROR",
                                            trial.last_result or {}, metric, error))

    return TrialConsole()
