"""What the console shows: the pipeline's own lines by default, Ray's logs with `--verbose`.

Pure (imports nothing of Ray): `pipeline.cli` calls `set_verbose` before Ray is imported, and
`pipeline.launch` applies the settings where Ray makes them. Each Ray line a default run
printed, and where it is silenced at its source (`python -m pipeline train` on digits):

    line                                                    silenced by
    ray.init's token-auth warning, "Started a local Ray"    ray.init(logging_level=ERROR)
    "Parquet dataset sampling" bar, Ray Data progress logs  DataContext.enable_progress_bars
    Ray Data "Execution plan of Dataset ..."                DataContext.print_on_execution_start
    Ray Data INFO and warnings ("Progress bars disabled")   the `ray.data` console handler
    Ray Train INFO on the controller and every worker:      RunConfig(logging_config=
      resources, worker group, process group, DDP wrap,       LoggingConfig("WARNING"))
      "Checkpoint successfully created"
    every rank's "Reporting training result ...:            the worker's file-named logger
      TrainingReport(...)" (each epoch, every rank)           (quiet_worker_logs)
    PreemptionWatcher "core_worker.cc ... max_restarts"     no preemption watcher on a Ray this
      (C++, Train controller)                                 process starts (local_ray_env)
    "(TrainController pid=...)" before the pipeline's lines RAY_DISABLE_WORKER_LOG_PREFIX=1
    MLflow INFO (database tables), the pickle warning       the `mlflow` logger at ERROR
    Tune's status tables, "Configuration for experiment"    tune.RunConfig(verbose=0) and
      box, "View detailed results here"                       RAY_AIR_NEW_OUTPUT=0 (ray_env)

Ray's ERROR lines, a worker's own prints and warnings, and every traceback still show.
Ray Data and Ray Train keep writing their full logs under the session's `logs/` folder.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pipeline.redact import redact_text

VERBOSE_ENV = "PIPELINE_VERBOSE"  # read by every process the driver starts (Tune trial actors)
QUIET_LOGGERS = {"mlflow": logging.ERROR, "alembic": logging.ERROR}
EPOCH_KEYS = (  # shown when logged, in this order
    ("train_loss", "train_loss={:.4f}"), ("val_loss", "val_loss={:.4f}"),
    ("val_accuracy", "val_accuracy={:.4f}"), ("lr", "lr={:.4g}"),
    ("padding_efficiency", "padding={:.1%}"), ("samples_per_s", "{:.0f} samples/s"),
    ("tokens_per_s", "{:.0f} tokens/s"), ("epoch_time_s", "{:.1f} s"),
)


def set_verbose(verbose: bool) -> None:
    """Choose the console for this process and the Ray processes it starts. Call it before
    `import ray`: the worker-log prefix setting is read when Ray is imported."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    for key, value in ray_env(verbose).items():
        os.environ.setdefault(key, value)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_env(verbose: bool) -> dict[str, str]:
    """Environment for Ray on the driver: the pipeline's lines from the Train controller and
    rank 0 print without Ray's "(TrainController pid=...)" prefix.

    Tune's output engine prints its "Configuration for experiment" box and result paths even
    at `verbose=0`; its legacy engine (RAY_AIR_NEW_OUTPUT=0) is silent there.

    >>> ray_env(False), ray_env(True)
    ({'RAY_DISABLE_WORKER_LOG_PREFIX': '1', 'RAY_AIR_NEW_OUTPUT': '0'}, {})
    """
    return {} if verbose else {"RAY_DISABLE_WORKER_LOG_PREFIX": "1", "RAY_AIR_NEW_OUTPUT": "0"}


def local_ray_env(verbose: bool) -> dict[str, str]:
    """Environment for a Ray this process starts itself (a laptop, `RAY_ADDRESS=local`): Ray
    Train's preemption watcher has no preemption to watch on one local node, and starting it
    prints a C++ error line (ray-project/ray#53727). A cluster keeps its watcher.

    >>> local_ray_env(False), local_ray_env(True)
    ({'RAY_TRAIN_ENABLE_PREEMPTION_WATCHER': '0'}, {})
    """
    return {} if verbose else {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ray_init_kwargs(verbose: bool) -> dict[str, Any]:
    """`ray.init` keyword arguments. Workers' output still reaches the driver (the per-epoch
    line and a rank's prints come that way); only the `ray` logger is raised to ERROR.

    >>> ray_init_kwargs(False)["logging_level"] == logging.ERROR
    True
    """
    return {"log_to_driver": True, "logging_level": logging.INFO if verbose else logging.ERROR}


def train_log_level(verbose: bool) -> str:
    """Ray Train's `LoggingConfig.log_level` (console of the controller and the workers)."""
    return "INFO" if verbose else "WARNING"


def ray_data_flags(verbose: bool) -> dict[str, bool]:
    """`ray.data.DataContext` attributes; empty when verbose (Ray's defaults stay)."""
    return {} if verbose else {"enable_progress_bars": False, "print_on_execution_start": False}


def tune_verbosity(verbose: bool) -> int:
    """`tune.RunConfig(verbose=...)`: Tune's own status tables only with --verbose."""
    return 1 if verbose else 0


def quiet_loggers(verbose: bool) -> None:
    """Levels for the libraries' Python loggers on the driver (after they are imported, since
    importing them configures them). Ray Data's console handler is raised, not its logger:
    its log file (the session's `logs/ray-data`) keeps everything."""
    if verbose:
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)  # the console, not the session's log file


class _SayHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(record.getMessage())
        except Exception:  # noqa: BLE001 (logging's own convention)
            self.handleError(record)


def say_pipeline_warnings() -> None:
    """The `pipeline.*` loggers' warnings (e.g. rank 0's "MLflow unreachable ..." and "...
    reachable again") as console lines, in whatever process they are raised: on a Ray Train
    worker Ray's logging setup sends them to its log files only. Once per process."""
    logger = logging.getLogger("pipeline")
    if not any(isinstance(h, _SayHandler) for h in logger.handlers):
        logger.addHandler(_SayHandler(logging.WARNING))
        logger.propagate = False  # said once, not also by a root handler


def quiet_worker_logs(verbose: bool) -> None:
    """On a training worker: Ray Train 2.60 logs every rank's "Reporting training result ...:
    TrainingReport(...)" at INFO through a logger named by its file path
    (`logging.getLogger(__file__)` in train/v2/_internal/execution/context.py), which
    `LoggingConfig(log_level=...)` does not reach; raise every such logger to WARNING."""
    if verbose:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if "/ray/train/" in name.replace("\\", "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def progress_bar_wanted(stream: Any = None) -> bool:
    """A progress bar within an epoch only on a terminal (never in a `ray job submit` log)."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def error_line(err: BaseException) -> str:
    """An error in one line: `Type: the first line of its message` (the type alone when it has
    no message).

    >>> error_line(ValueError("bad value\\nmore detail")), error_line(KeyError())
    ('ValueError: bad value', 'KeyError')

    Secrets are masked (`redact_text`): MLflow's connection errors carry the whole URL, a
    tracking URI's password included.

    >>> error_line(OSError("API request to http://me:hunter22@127.0.0.1:9/api failed"))
    'OSError: API request to http://me:***@127.0.0.1:9/api failed'
    """
    lines = str(err).splitlines()
    return redact_text(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)


def say(msg: str) -> None:
    """One pipeline line on stdout. Written, not printed: on a Ray Train worker `print` is
    patched to go to Train's logger and, when stdout is wrapped, to stdout as well -- the line
    showed twice."""
    sys.stdout.write(f"[pipeline] {msg}\n")
    sys.stdout.flush()


# -- the lines ------------------------------------------------------------------------------
def epoch_line(metrics: dict[str, Any], epochs: int | None = None) -> str:
    """The per-epoch console line from the metrics a rank reported.

    >>> epoch_line({"epoch": 2, "train_loss": 0.36286, "val_loss": 0.18118, "lr": 0.05,
    ...             "val_accuracy": 0.97493, "samples_per_s": 3068.5, "epoch_time_s": 0.4589,
    ...             "skipped_steps": 0.0}, epochs=8)
    'epoch 2: train_loss=0.3629 val_loss=0.1812 val_accuracy=0.9749 lr=0.05 3068 samples/s 0.5 s (of 8)'
    >>> epoch_line({"epoch": 1, "train_loss": 2.3, "skipped_steps": 3.0, "nonfinite_steps": 1.0})
    'epoch 1: train_loss=2.3000 skipped_steps=3 nonfinite_steps=1'
    """
    shown = [fmt.format(metrics[k]) for k, fmt in EPOCH_KEYS if isinstance(metrics.get(k), int | float)]
    for key in ("skipped_steps", "nonfinite_steps"):
        if metrics.get(key):
            shown.append(f"{key}={int(metrics[key])}")
    total = f" (of {epochs})" if epochs else ""
    return f"epoch {int(metrics.get('epoch', 0))}: {' '.join(shown)}{total}"


def counted(n: int, noun: str) -> str:
    """
    >>> counted(1, "worker"), counted(2, "worker"), counted(1, "epoch")
    ('1 worker', '2 workers', '1 epoch')
    """
    return f"{n} {noun}{'' if n == 1 else 's'}"


def setup_lines(cfg: Any, info: Any, tracking_uri: str) -> list[str]:
    """The run's setup, a few lines, from the resolved config and the dataset info.

    >>> from pipeline.config import Config
    >>> from pipeline.data.datasets import DatasetInfo
    >>> cfg = Config().with_overrides({"train.micro_batch_size": 16, "model.name": "mlp",
    ...                                 "train.global_batch_size": 128})
    >>> info = DatasetInfo(uri="/data/digits.parquet", num_rows=1797, columns=("features",))
    >>> print("\\n".join(setup_lines(cfg, info, "sqlite:///mlflow.db")))
    data: digits, 1797 rows (/data/digits.parquet), 20% held out for validation
    batches: random (seed 0); global batch 128 = 2 workers x 4 micro-batches of 16
    model: mlp, 10 epochs, fp32, sgd at lr 0.1 (0.05 at batch 64, linear rule), constant schedule
    workers: 2 x 1 CPU; MLflow experiment 'batch-pipeline' in sqlite:///mlflow.db
    """
    from pipeline.engine.schedule import scale_lr

    d, b, m, t, s = cfg.data, cfg.batching, cfg.model, cfg.train, cfg.scaling
    held = f", {d.val_fraction:.0%} held out for validation" if d.val_fraction else ""
    strategy = b.strategy + (f" {b.options}" if b.options else "")
    per_worker, micro = cfg.per_worker_batch(), t.micro_batch_size
    workers = counted(s.num_workers, "worker")
    if micro == "auto":
        split = f"{workers} x {per_worker} (micro-batch auto: halves on out-of-memory)"
    elif isinstance(micro, int) and micro < per_worker:
        split = f"{workers} x {cfg.accumulation_steps()} micro-batches of {micro}"
    else:
        split = f"{workers} x {per_worker}"
    lr = scale_lr(t.base_lr, t.base_batch_size, t.global_batch_size, t.lr_scaling)
    rule = (f" ({t.base_lr:g} at batch {t.base_batch_size}, {t.lr_scaling} rule)"
            if t.lr_scaling != "none" else "")
    warmup = (f", {t.warmup_epochs:g} warmup epoch{'' if t.warmup_epochs == 1 else 's'}"
              if t.warmup_epochs else "")
    steps = f", at most {t.max_steps} steps" if t.max_steps else ""
    device = "GPU" if s.use_gpu else f"{s.cpus_per_worker:g} CPU"
    schedule = ""
    if t.batch_size_schedule == "warmup":
        schedule = (f"; batch-size warmup from {t.batch_size_min} over "
                    f"{t.batch_size_warmup_steps} steps")
    elif t.batch_size_schedule == "adaptive":
        cost = ("measured" if t.batch_size_step_cost is None
                else f"{t.batch_size_step_cost:g} samples")
        if t.batch_size_throughput is not None:
            cost += f" from {t.batch_size_throughput}"
        schedule = (f"; adaptive batch from {t.batch_size_min}, by goodput every "
                    f"{t.batch_size_interval} steps (step cost {cost})")
    return [
        f"data: {d.name}, {info.num_rows} rows ({redact_text(info.uri)}){held}",
        f"batches: {strategy} (seed {b.seed}); global batch {t.global_batch_size} = {split}"
        f"{schedule}",
        f"model: {m.name}, {counted(t.epochs, 'epoch')}{steps}, {t.precision}, {t.optimizer} at lr {lr:.4g}"
        f"{rule}, {t.schedule} schedule{warmup}",
        f"workers: {s.num_workers} x {device}; MLflow experiment "
        f"'{cfg.tracking.experiment}' in {redact_text(tracking_uri)}",
    ]
