"""Embedded datasets (written once as Parquet into a cache) and dataset checks (no Ray).

- `digits`: scikit-learn's bundled handwritten digits (real data: 1,797 8x8 images, 10 classes).
- `digits_imbalanced`: a long-tailed subsample of it (class k keeps a share 0.1 ** (k / 9)).
- `sequences`: synthetic variable-length token sequences; lengths long-tailed over 8..512, a
  sequence label (which of three token groups dominates) and per-token targets (a function of
  the token and its predecessor, so the model needs context).

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import (
    EMBEDDED_DATASETS,
    Config,
    ConfigError,
    DataConfig,
    DataUnreachable,
    auto_micro_batchnorm_refusal,
    flatten,
)
from pipeline.data.batches import (
    SampleTable,
    check_sequences,
    micro_slices,
    split_train_val,
    vector_width,
)
from pipeline.data.padding import IGNORE_INDEX
from pipeline.redact import redact_text

DATASET_VERSION = "v1"
SEQ_VOCAB = 64
SEQ_NUM_CLASSES = 3
SEQ_NUM_TARGETS = 4


def cache_dir(configured: str | None = None) -> Path:
    """Where the embedded datasets are written (`~` expanded: no shell does it in a config).

    >>> cache_dir("~/d") == Path.home() / "d"
    True
    """
    root = configured or os.environ.get("PIPELINE_DATA_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "batch-pipeline" / "datasets"


def make_digits() -> pa.Table:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    return pa.table({
        "sample_id": pa.array(np.arange(len(x), dtype=np.int64)),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        "label": pa.array(d.target.astype(np.int64)),
    })


def make_digits_imbalanced(ratio: float = 0.1, seed: int = 0) -> pa.Table:
    """Class k keeps ceil(count_k * ratio ** (k / 9)) samples: class 0 whole, class 9 ~10%."""
    t = make_digits()
    labels = t.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        n = int(np.ceil(len(idx) * ratio ** (k / 9)))
        keep.append(np.sort(rng.choice(idx, size=n, replace=False)))
    rows = np.sort(np.concatenate(keep))
    out = t.take(pa.array(rows))
    return out.set_column(0, "sample_id", pa.array(np.arange(len(rows), dtype=np.int64)))


def make_sequences(n: int = 4000, seed: int = 0) -> pa.Table:
    """Lognormal lengths clipped to 8..512 (median ~40, long tail)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mean=3.7, sigma=0.8, size=n)), 8, 512).astype(np.int64)
    total = int(lengths.sum())
    # Each sequence favours one of three token groups; its label is the favoured group.
    labels = rng.integers(0, SEQ_NUM_CLASSES, size=n)
    group_of_token = np.repeat(labels, lengths)
    favoured = rng.random(total) < 0.5
    group = np.where(favoured, group_of_token, rng.integers(0, SEQ_NUM_CLASSES, size=total))
    tokens = group * (SEQ_VOCAB // SEQ_NUM_CLASSES) + rng.integers(0, SEQ_VOCAB // SEQ_NUM_CLASSES, total)
    # Per-token target: (token + previous token in the same sequence) mod 4.
    prev = np.concatenate([[0], tokens[:-1]])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    prev[starts] = 0
    targets = (tokens + prev) % SEQ_NUM_TARGETS
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens.astype(np.int64))),
        "targets": pa.ListArray.from_arrays(offsets, pa.array(targets.astype(np.int64))),
        "length": pa.array(lengths),
        "label": pa.array(labels.astype(np.int64)),
    })


BUILDERS = {"digits": make_digits, "digits_imbalanced": make_digits_imbalanced,
            "sequences": make_sequences}


def embedded_path(name: str, root: str | None = None) -> Path:
    """Write the embedded dataset once (atomically) and return its Parquet path."""
    if name not in BUILDERS:
        raise ConfigError(f"config error: data.name: unknown embedded dataset {name!r}; "
                          f"known: {', '.join(EMBEDDED_DATASETS)} (or set data.path)")
    path = cache_dir(root) / _cache_file_name(name)
    source = ("data.cache_dir" if root or not os.environ.get("PIPELINE_DATA_DIR")
              else "PIPELINE_DATA_DIR")  # (the default is under ~/.cache)
    try:
        if _readable_parquet(path):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own (two containers sharing the cache may share a pid too), written
        # whole and synced before the rename; anything that stops it (SIGTERM too) leaves none
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(BUILDERS[name](), f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # (mkstemp's 0600 would keep a shared cache's file from others)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, RuntimeError) as err:  # a cache_dir that is a file, read-only, on a full
        # disk, a name too long...
        raise ConfigError(f"config error: {source}: cannot write the embedded dataset "
                          f"{name!r} to {path.parent} ({getattr(err, 'strerror', None) or err})"
                          ) from None
    return path


def _readable_parquet(path: Path) -> bool:
    """Whether `path` is a Parquet file whose footer reads (a damaged cache file -- cut short by
    a crash, say -- is written again, not blamed on a data.path never given)."""
    if not path.exists():
        return False
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


def embedded_name(uri: str) -> str | None:
    """The embedded dataset whose cache file (`embedded_path`) `uri` is; None for other data.
    That file is on the machine that resolved the config alone: the cluster reads it there,
    and a node that reads it again writes its own (`ensure_embedded`).

    >>> embedded_name("/home/me/.cache/batch-pipeline/datasets/digits-v1.parquet")
    'digits'
    >>> embedded_name("s3://b/digits-v1.parquet"), embedded_name("/data/train.parquet")
    (None, None)
    """
    if "://" in uri:
        return None
    name = Path(uri).name
    return next((n for n in BUILDERS if name == _cache_file_name(n)), None)


def _cache_file_name(name: str) -> str:
    """The embedded dataset `name`'s file in the cache (`embedded_path`)."""
    return f"{name}-{DATASET_VERSION}.parquet"


def ensure_embedded(uri: str) -> None:
    """An embedded dataset's cache file at `uri`, written here when this machine lacks it (its
    builder is deterministic: the same rows as the driver's)."""
    name = embedded_name(uri)
    if name is not None and not Path(uri).exists():
        embedded_path(name, str(Path(uri).parent))


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver knows about the dataset before any cluster work."""

    uri: str  # absolute path or URI the workers read
    num_rows: int
    columns: tuple[str, ...]
    # What the model needs to know of the data, as the checks found it: every process builds
    # the model from these (`pipeline.engine.models.model_spec`), none counts them again.
    facts: dict[str, int | None] = dataclasses.field(default_factory=dict, hash=False)
    # Every row's small columns as the checks read them (labels, difficulties, sequence
    # lengths): kept in the process that resolved the config, never pickled (a trial or a
    # worker has its own; `small_columns`).
    small: SampleTable | None = dataclasses.field(default=None, repr=False, compare=False)
    # The keys `resolve` filled in (FILLED_KEYS), each with the value the config gave it: a
    # sweep's trial starts from the config as given (`as_given`) and is filled again for its
    # own overrides (another worker count, model or dataset fills other values).
    filled: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    # train.batch_size_throughput's file (as the config names it) -> its per-worker step cost,
    # read once by the driver: a trial refills from it (in its actor the working directory is
    # Tune's trial folder, and the file may be on the driver's machine alone).
    step_costs: dict[str, float] = dataclasses.field(default_factory=dict, hash=False)
    # What the checks found worth a line at the job's start (not refused): e.g. a batch-size
    # warmup the run cuts short
    notes: list[str] = dataclasses.field(default_factory=list, hash=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "small": None}


# What `resolve` may fill in: the embedded datasets' columns, `model.name: auto`, the step
# cost from `train.batch_size_throughput`'s file (for the config's worker count), and no label
# column for data without the default one where nothing reads labels.
FILLED_KEYS = ("data.feature_column", "data.sequence_column", "data.target_column",
               "data.label_column", "model.name",
               "train.batch_size_step_cost")


def data_fingerprint(info: DatasetInfo) -> dict[str, Any]:
    """What a `--resume` compares to know the data is the one its checkpoints were trained on
    (kept in run.json): the row count, each file's path and size (a listing and the footers),
    the facts the model is built from and a digest of the small columns the checks read. A
    row appended changes the split and the batches (or the model's shape: a traceback in every
    restarted worker); a value changed in place, the file's size, most likely, or the digest."""
    ds = pads.dataset(info.uri, format="parquet")
    files = ds.filesystem.get_file_info(list(ds.files))
    # named from the dataset's folder: the same data elsewhere is the same (`ray job submit`
    # uploads the working directory to a new place on every submit)
    root = posixpath.commonpath([posixpath.dirname(f.path) for f in files]) if files else ""
    return {"rows": int(info.num_rows), "facts": dict(info.facts),
            "files": [[posixpath.relpath(f.path, root) if root else f.path, int(f.size)]
                      for f in files],
            **({"small": small_digest(info.small)} if info.small is not None else {})}


def small_digest(st: SampleTable) -> str:
    """A digest of the small columns the checks read (ids, labels, lengths, difficulties): a
    file written again at the same size with labels swapped, or other lengths, shows (its
    features alone changed do not: the driver never reads them).

    >>> a = SampleTable(np.arange(3), np.array([0, 1, 1]), None, None, None, None, None)
    >>> b = SampleTable(np.arange(3), np.array([1, 0, 1]), None, None, None, None, None)
    >>> small_digest(a) == small_digest(a), small_digest(a) == small_digest(b)
    (True, False)
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in ("ids", "labels", "lengths", "difficulty"):
        values = getattr(st, name)
        h.update(name.encode() + (b"-" if values is None else
                                  np.ascontiguousarray(values).tobytes()))
    return h.hexdigest()


def files_changed(before: list[Any], now: list[Any], at: str = "at the start") -> str | None:
    """What differs between two listings of a dataset's files, (path, bytes[, rows[,
    modified]]) each, in words (None: nothing); `at`: when `before` was taken.

    >>> files_changed([("a", 10, 5)], [("a", 10, 5)]) is None
    True
    >>> files_changed([("a", 10, 5), ("b", 8, 4)], [("a", 12, 6), ("b", 8, 4)])
    'a is 12 bytes and 6 rows (10 bytes and 5 rows at the start)'
    >>> files_changed([("b", 8, 4)], [("a", 4, 2), ("b", 8, 4)])
    'its files are a, b (b at the start)'
    >>> files_changed([("a", 10, 5, 1)], [("a", 10, 5, 2)])
    'a was written again (the same bytes and rows as at the start)'
    """
    if [f[0] for f in before] != [f[0] for f in now]:
        def names(files: list[Any]) -> str:
            shown = ", ".join(f[0] for f in files[:5])
            return shown + (f" and {len(files) - 5} more" if len(files) > 5 else "")

        return f"its files are {names(now)} ({names(before)} {at})"

    def said(file: Any) -> str:
        return f"{file[1]} bytes" + (f" and {file[2]} rows" if len(file) > 2 else "")

    for old, new in zip(before, now, strict=True):
        if tuple(old[:3]) != tuple(new[:3]):
            return f"{new[0]} is {said(new)} ({said(old)} {at})"
        if tuple(old) != tuple(new):  # (its modification time: rewritten in place)
            return f"{new[0]} was written again (the same bytes and rows as {at})"
    return None


def data_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two `data_fingerprint`s, in words (None: nothing).

    >>> a = {"rows": 10, "files": [["d/a.parquet", 100]], "facts": {"max_label": 9}}
    >>> data_change(a, a) is None
    True
    >>> data_change(a, {**a, "rows": 12})
    '12 rows (10 when the run started)'
    >>> data_change(a, {**a, "files": [["d/a.parquet", 104]]})
    'd/a.parquet is 104 bytes (100 bytes when the run started)'
    >>> data_change(a, {**a, "facts": {"max_label": 10}})
    'max_label is 10 (9 when the run started)'
    """
    if before["rows"] != now["rows"]:
        return f"{now['rows']} rows ({before['rows']} when the run started)"
    if change := files_changed(before["files"], now["files"], "when the run started"):
        return change
    for key in sorted(set(before["facts"]) | set(now["facts"])):
        if before["facts"].get(key) != now["facts"].get(key):
            return (f"{key} is {now['facts'].get(key)} ({before['facts'].get(key)} when the run "
                    "started)")
    if before.get("small") and now.get("small") and before["small"] != now["small"]:
        # (a run.json of an earlier version has no digest: not compared)
        return ("its ids, labels, lengths or difficulties differ (the same files and sizes: "
                "written again)")
    return None


# How long the checks keep retrying a gs:// store that does not answer: Arrow's GCS client
# retries transient errors for 15 minutes by default, so with no network the checks hung, saying
# nothing (its S3 client gives up after a few seconds by itself).
GCS_RETRY_S = 30.0


def checked_dataset(uri: str) -> pads.Dataset:
    """The dataset at `uri` as the driver's checks first open it: a gs:// store that does not
    answer fails within GCS_RETRY_S (unless the URI sets its own `retry_limit_seconds`), not
    after Arrow's client's 15 minutes. Once it answered, the checks' long reads (and Ray
    Data's on the cluster) keep Arrow's default retries (`resolve`)."""
    if not _bounded_retries(uri):
        return pads.dataset(uri, format="parquet")
    from datetime import timedelta

    fs, path = pafs.FileSystem.from_uri(uri)
    rebuild, (options,) = fs.__reduce__()  # (the URI's own options, as pickling carries them)
    fs = rebuild({**options, "retry_time_limit": timedelta(seconds=GCS_RETRY_S)})
    return pads.dataset(path, filesystem=fs, format="parquet")


def _bounded_retries(uri: str) -> bool:
    """Whether `checked_dataset` bounds the retries of `uri`'s store (a gs:// URI without its
    own `retry_limit_seconds`)."""
    return uri.startswith("gs://") and "retry_limit_seconds=" not in uri


def unreachable(err: BaseException) -> bool:
    """Whether Arrow's error says the store could not be reached (no network, a store down),
    as its S3 client (`AWS Error NETWORK_CONNECTION`, a curl error) and GCS client
    (`UNAVAILABLE: Retry policy exhausted`) word it: not the data's fault.

    >>> unreachable(OSError("When getting information for key 'x' in bucket 'b': AWS Error "
    ...                     "NETWORK_CONNECTION during HeadObject operation: curlCode: 7"))
    True
    >>> unreachable(OSError("Could not open Parquet input source 'd.parquet': Parquet magic "
    ...                     "bytes not found in footer"))
    False
    """
    text = str(err)
    return any(mark in text for mark in ("NETWORK_CONNECTION", "curlCode: 6,", "curlCode: 7,",
                                         "curlCode: 28,", "UNAVAILABLE: Retry policy exhausted"))


def _raise_if_unreachable(err: BaseException, uri: str) -> None:
    """DataUnreachable (exit 1) where Arrow's error says the store could not be reached."""
    if unreachable(err):
        raise DataUnreachable(f"data error: data.path {redact_text(uri)} could not be reached "
                              f"({_first_line(err)})") from None


def absolute_path(path: str) -> str:
    """A local path as `resolve` reads it: absolute from this working directory, `~` expanded;
    a URI (`scheme://...`) as it is.

    >>> absolute_path("s3://bucket/d"), absolute_path("/d/x.parquet")
    ('s3://bucket/d', '/d/x.parquet')
    """
    return path if "://" in path else str(Path(path).expanduser().resolve())


def as_given(cfg: Config, info: DatasetInfo) -> Config:
    """The resolved `cfg` with resolve's fills undone (`info.filled`): the config as given."""
    filled = getattr(info, "filled", None)  # (none in a sweep's state saved before it was kept)
    return cfg.with_overrides(filled) if filled else cfg


def refill(cfg: Config, info: DatasetInfo) -> Config:
    """What `resolve` fills in, for a config (as given, with a sweep trial's overrides) of the
    dataset `info` describes -- without reading it again: the trial keeps the sweep's data."""
    cfg = _fill_step_cost(_fill_embedded_columns(cfg), getattr(info, "step_costs", None))
    cfg = _fill_label_column(cfg, info.columns)
    return _pick_model(cfg, embedded_digits=_embedded_digits(cfg), width=info.facts.get("input_dim"))


def _fill_label_column(cfg: Config, columns: tuple[str, ...]) -> Config:
    """No `data.label_column` where it is the default, the data has no such column and nothing
    the config does reads labels (a token-level dataset: tokens and targets), as the config
    could have said."""
    d = cfg.data
    if (d.label_column == DataConfig.model_fields["label_column"].default
            and d.label_column not in columns and cfg.train.loss != "cross_entropy"
            and cfg.batching.strategy not in ("stratified", "balanced")):
        return cfg.with_overrides({"data.label_column": None})
    return cfg


def _step_costs(cfg: Config) -> dict[str, float]:
    """{train.batch_size_throughput: the per-worker step cost its file gives}, the file read
    once for `resolve` and the sweep's trials (`DatasetInfo.step_costs`); {} without one."""
    path = cfg.train.batch_size_throughput
    if path is None:
        return {}
    from pipeline.find_batch_size import step_cost_from

    cost = step_cost_from(path, 1)  # (under the path as given, and as a sweep gives it to its
    return {path: cost, absolute_path(path): cost}  # trials: absolute)


def _fill_step_cost(cfg: Config, known: dict[str, float] | None = None) -> Config:
    """train.batch_size_step_cost from train.batch_size_throughput's file, for this config's
    worker count; filled again on every resolve (a sweep's trial may have other workers than
    the config it comes from). `known`: per-worker costs already read (`DatasetInfo.step_costs`).
    `load_config` refuses a config that sets both."""
    t = cfg.train
    if t.batch_size_throughput is None or t.batch_size_schedule != "adaptive":
        return cfg  # (another schedule has no step cost: the setting is noted as unused)
    from pipeline.find_batch_size import step_cost_from

    per_worker = (known or {}).get(t.batch_size_throughput)
    if per_worker is None:
        per_worker = step_cost_from(t.batch_size_throughput, 1)
    return cfg.with_overrides({"train.batch_size_step_cost": per_worker * cfg.scaling.num_workers})


def _check_throughput_setup(cfg: Config) -> None:
    """train.batch_size_throughput's file was measured for this run's model, precision, loss
    and device: a step cost is that setup's own (another model's c silently set this one's
    schedule). ConfigError naming the keys that differ."""
    t = cfg.train
    if t.batch_size_throughput is None or t.batch_size_schedule != "adaptive":
        return
    from pipeline.find_batch_size import measured_setup

    was = measured_setup(t.batch_size_throughput)
    now = {"model.name": cfg.model.name, "train.precision": t.precision, "train.loss": t.loss,
           "scaling.use_gpu": cfg.scaling.use_gpu}
    differs = [k for k in now if k in was and was[k] != now[k]]
    if differs:
        def shown(v: object) -> str:
            return str(v).lower() if isinstance(v, bool) else str(v)

        raise ConfigError(
            f"config error: train.batch_size_throughput={t.batch_size_throughput} was measured "
            f"with {', '.join(f'{k}={shown(was[k])}' for k in differs)}, this run has "
            f"{', '.join(f'{k}={shown(now[k])}' for k in differs)}: its step cost is that "
            "setup's (measure this one: find-batch-size with this config and --set "
            "train.batch_size_throughput=null; or set train.batch_size_step_cost instead)")


def resolve(cfg: Config) -> tuple[Config, DatasetInfo]:
    """Find the dataset, fill what the config leaves to the data, and check that the data can
    be trained as configured; raise ConfigError (exit 2, one line naming the culprit) otherwise.

    Filled, only where the config leaves it unset, and returned in the resolved config (the
    one MLflow logs): the embedded datasets' columns (`digits*`: `features`; `sequences`:
    `tokens` and `targets`) and `model.name: auto` -> `seq_transformer` for sequence data,
    `digits_cnn` for the embedded digits (8x8 images as 64 features), `mlp` for other feature
    vectors. Checked: every named column exists and holds what its key says (fixed-size
    vectors, integer class ids >= 0, token id lists with aligned targets), the model can take
    the data and the loss has its columns, the training split is not empty, every class is in
    both splits, epoch 1 has a batch (a sweep's own settings, `Config.check_tune`, are checked
    by `check_trials` only: `train` runs a sweep's config as a job). Also filled:
    `train.batch_size_step_cost` from the `find_batch_size.json` that
    `train.batch_size_throughput` names (`_fill_step_cost`).
    """
    given = cfg
    step_costs = _step_costs(cfg)
    cfg = _fill_step_cost(_fill_embedded_columns(cfg), step_costs)
    d = cfg.data
    if d.path is None:
        uri = str(embedded_path(d.name, d.cache_dir).resolve())
    else:
        try:
            uri = absolute_path(d.path)
            missing = "://" not in uri and not Path(uri).exists()
        except (OSError, RuntimeError, ValueError) as err:  # a name too long, a symlink loop
            raise ConfigError(f"data error: data.path {redact_text(d.path)}: "
                              f"{getattr(err, 'strerror', None) or err}") from None
        if missing:
            raise ConfigError(f"data error: data.path does not exist: {redact_text(d.path)}")
    try:
        ds = checked_dataset(uri)
        schema = rows_schema(ds)
        num_rows = ds.count_rows()
    except (OSError, pa.ArrowException) as err:
        _raise_if_unreachable(err, uri)
        raise ConfigError(f"data error: data.path {redact_text(uri)} is not readable Parquet "
                          f"({_first_line(err)})") from None
    if not ds.files:
        raise ConfigError(f"data error: data.path {redact_text(uri)} holds no Parquet file")
    columns = tuple(schema.names)
    cfg = _fill_label_column(cfg, columns)
    d = cfg.data
    named = {
        "data.feature_column": d.feature_column,
        "data.label_column": d.label_column,
        "data.sequence_column": d.sequence_column,
        "data.target_column": d.target_column,
        "data.id_column": d.id_column,
        "batching.difficulty_column": cfg.batching.difficulty_column,
    }
    if _bounded_retries(uri):  # reached: the long reads below with Arrow's own retries
        ds = pads.dataset(uri, format="parquet")
    try:  # (first: a column some files lack is named with them)
        _check_files_agree(ds, named)
    except (OSError, pa.ArrowException) as err:  # a later file's footer damaged
        _raise_if_unreachable(err, uri)
        raise ConfigError(f"data error: data.path {redact_text(uri)} is not readable Parquet "
                          f"({_first_line(err)})") from None
    for key, col in named.items():
        if col is not None and col not in columns:
            raise ConfigError(f"data error: {key}={col!r} is not a column of {redact_text(uri)} "
                              f"(columns: {', '.join(columns)})")
    keys_of: dict[str, list[str]] = {}
    for key, col in named.items():
        if col is not None:
            keys_of.setdefault(col, []).append(key)
    for col, keys in keys_of.items():  # (each is read as what its key says: a traceback before)
        if len(keys) > 1:
            raise ConfigError(f"config error: {' and '.join(keys)} name the same column {col!r}: "
                              "each names a column of its own")
    if d.feature_column is None and d.sequence_column is None:
        raise ConfigError("config error: data.feature_column or data.sequence_column must be set "
                          f"(columns of {redact_text(uri)}: {', '.join(columns)})")
    if num_rows == 0:
        raise ConfigError(f"data error: {redact_text(uri)} has no rows")
    try:
        facts = _scan_columns(ds, cfg)  # the only read of the data on the driver
    except MemoryError:  # (pyarrow's is an ArrowException too: not the data's fault)
        raise
    except (OSError, pa.ArrowException) as err:  # (a damaged page: Arrow's own error)
        _raise_if_unreachable(err, uri)
        raise ConfigError(f"data error: data.path {redact_text(uri)} could not be read "
                          f"({_first_line(err)})") from None
    cfg = _pick_model(cfg, embedded_digits=facts.embedded_digits, width=facts.width)
    _check_model_and_loss(cfg, facts)
    _check_throughput_setup(cfg)
    labels = facts.small.labels
    train, _ = split_train_val(num_rows, labels, d.val_fraction, d.split_seed)
    if len(train) == 0:
        raise ConfigError(f"data error: the training split is empty: data.val_fraction="
                          f"{d.val_fraction:g} holds out all {num_rows} rows of {redact_text(uri)}")
    if labels is not None and cfg.train.loss == "cross_entropy" and d.val_fraction > 0:
        _check_split_classes(labels, cfg)
    note, reached = _check_first_epoch(facts.small, cfg)
    notes = [n for n in (note, curriculum_note(cfg, reached)) if n]
    b = cfg.batching
    exempt = ((b.strategy == "balanced" and b.options.get("epoch_samples") is not None)
              or (b.strategy == "length_bucket" and b.options.get("max_tokens") is not None))
    if len(train) < cfg.train.global_batch_size and b.drop_last and not exempt:
        # (`balanced`'s epoch_samples oversample the split, a token budget counts tokens: their
        # batches are checked by planning epoch 1 above)
        raise ConfigError(
            f"data error: train.global_batch_size={cfg.train.global_batch_size} is larger than "
            f"the {len(train)} training rows of {redact_text(uri)}")
    before, after = flatten(given.to_dict()), flatten(cfg.to_dict())
    return cfg, DatasetInfo(uri=uri, num_rows=num_rows, columns=columns,
                            facts=facts.model_facts(), small=facts.small,
                            filled={k: before[k] for k in FILLED_KEYS if before[k] != after[k]},
                            notes=notes,
                            step_costs=step_costs)


def curriculum_note(cfg: Config, reached: int | None = None) -> str | None:
    """A note where a curriculum's pool is not whole by the run's last epoch
    (`batching.options.pacing_epochs` above `train.epochs` - 1: 0-based epoch e takes c(e /
    pacing_epochs), or `train.max_steps` ending the run in epoch `reached`): the run never
    trains on the hardest samples. Said, not refused (a deliberately slow curriculum); None
    otherwise.

    >>> from pipeline.config import load_config
    >>> slow = load_config(None, ["batching.strategy=curriculum", "batching.options.difficulty=length",
    ...                           "batching.options.pacing_epochs=1000", "train.epochs=10"])
    >>> curriculum_note(slow)[:97]
    'batching.options.pacing_epochs=1000 with train.epochs=10: the pool would be whole from epoch 1001'
    >>> curriculum_note(slow.with_overrides({"batching.options.pacing_epochs": 9.5}))[:96]
    'batching.options.pacing_epochs=9.5 with train.epochs=10: the pool would be whole from epoch 11, '
    >>> curriculum_note(slow.with_overrides({"batching.options.pacing_epochs": 9})) is None
    True
    >>> fast = {"batching.options.pacing": "exponential", "batching.options.c0": 0.01,
    ...         "batching.options.growth": 10, "batching.options.steps": 4,
    ...         "batching.options.pacing_epochs": 100}  # whole at progress 0.5: epoch 51
    >>> curriculum_note(slow.with_overrides(fast))[:95]
    'batching.options.pacing_epochs=100 with train.epochs=10: the pool would be whole from epoch 51,'
    >>> curriculum_note(slow.with_overrides({"batching.options.pacing_epochs": 9,
    ...                                      "train.max_steps": 5}), reached=1)[:64]
    'train.max_steps=5 ends the run in epoch 1 of 10: its last epoch '
    """
    from pipeline.data.epochs import planner_options
    from pipeline.data.pacing import competence

    if cfg.batching.strategy != "curriculum":
        return None
    o = planner_options(cfg)
    epochs = min(cfg.train.epochs, reached or cfg.train.epochs)
    last = (epochs - 1) / float(o["pacing_epochs"])
    c = competence(last, o.get("pacing", "root"), c0=o.get("c0", 0.1), steps=o.get("steps", 4),
                   growth=o.get("growth", 2.0))
    if c >= 1.0:
        return None
    if epochs < cfg.train.epochs:
        return (f"train.max_steps={cfg.train.max_steps} ends the run in epoch {epochs} of "
                f"{cfg.train.epochs}: its last epoch trains on the easiest {c:.0%} of the "
                f"training split only (batching.options.pacing_epochs={o['pacing_epochs']:g})")
    def full(e: int) -> bool:  # the pool of 0-based epoch e is whole
        return competence(e / float(o["pacing_epochs"]), o.get("pacing", "root"),
                          c0=o.get("c0", 0.1), steps=o.get("steps", 4),
                          growth=o.get("growth", 2.0)) >= 1.0

    low, high = epochs - 1, math.ceil(o["pacing_epochs"])  # not whole, whole (c(1) = 1)
    while high - low > 1:  # (an exponential pacing is whole before pacing_epochs)
        mid = (low + high) // 2
        low, high = (low, mid) if full(mid) else (mid, high)
    whole = high + 1  # 1-based
    return (f"batching.options.pacing_epochs={o['pacing_epochs']:g} with train.epochs="
            f"{cfg.train.epochs}: the pool would be whole from epoch {whole}, after the run; "
            f"its last epoch trains on the easiest {c:.0%} of the training split only")


def _first_line(err: BaseException) -> str:
    """An error's first line (pyarrow's HDFS error holds the JVM's 89).

    >>> _first_line(OSError("no JVM\\nline 2")), _first_line(OSError())
    ('no JVM', 'OSError')
    """
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def rows_schema(ds: pads.Dataset) -> pa.Schema:
    """The schema of the dataset's first file with rows -- what the checks compare the named
    columns with (`_check_files_agree` compares the other files with it). The dataset's own
    is its first file's, and an empty first file (Ray Data reads it as no block) may lack a
    column, or hold it as another type. The dataset's own when every file is empty."""
    for frag in ds.get_fragments():
        if frag.metadata.num_rows:
            return frag.physical_schema
    return ds.schema


def _check_files_agree(ds: pads.Dataset, named: dict[str, str | None]) -> None:
    """Every file of a multi-file dataset (but empty ones, which Ray Data reads as no block)
    holds each named column, as the same type and nullability: the dataset's schema is its
    first file's, so a file without the label column read as null labels, and one whose labels
    were int32 (or features float64, or `not null`) passed the checks here and failed on the
    cluster, where the blocks are joined as they are."""
    if len(ds.files) < 2:
        return
    first = name = None  # the first file with rows: what the others are compared with

    def shown(field: pa.Field) -> str:
        return f"{field.type}{'' if field.nullable else ' not null'}"

    for frag in ds.get_fragments():
        if frag.metadata.num_rows == 0:
            continue
        schema = frag.physical_schema
        if first is None:
            first, name = schema, frag.path
        for key, col in named.items():
            if col is None:
                continue
            if (col in schema.names) != (col in first.names):
                lacks, has = (frag.path, name) if col in first.names else (name, frag.path)
                raise ConfigError(f"data error: {lacks} has no column {col!r} ({key}; "
                                  f"{has} has it): the files of data.path must agree")
            if col not in schema.names:
                continue
            have, want = schema.field(col), first.field(col)
            if have.type != want.type or have.nullable != want.nullable:
                raise ConfigError(f"data error: {key}={col!r} is {shown(have)} in {frag.path} "
                                  f"but {shown(want)} in {name}: the files of data.path "
                                  "must agree")


def _fill_embedded_columns(cfg: Config) -> Config:
    """The embedded datasets' column mapping, for the keys the config leaves unset."""
    d = cfg.data
    if d.path is not None or d.name not in EMBEDDED_DATASETS:
        return cfg
    fill: dict[str, str] = {}
    if d.name == "sequences":
        if d.sequence_column is None and d.feature_column is None:
            fill["data.sequence_column"] = "tokens"
        if d.target_column is None:
            fill["data.target_column"] = "targets"
    elif d.feature_column is None and d.sequence_column is None:
        fill["data.feature_column"] = "features"
    return cfg.with_overrides(fill) if fill else cfg


@dataclass(frozen=True)
class DataFacts:
    """What the checks learnt from the columns the config names."""

    width: int | None  # feature vector length (data.feature_column)
    max_token: int | None  # largest token id (data.sequence_column)
    max_target: int | None  # largest per-token target (data.target_column)
    embedded_digits: bool  # the embedded digits datasets (8x8 images as 64 features)
    small: SampleTable  # every row's labels, difficulties and sequence lengths; no features

    def model_facts(self) -> dict[str, int | None]:
        """What the model needs to know of the data (`pipeline.engine.models.model_spec`'s `facts`)."""
        labels = self.small.labels
        return {"input_dim": self.width, "max_token": self.max_token,
                "max_target": self.max_target,
                "max_label": None if labels is None or not len(labels) else int(labels.max())}


def _parquet_files(ds: pads.Dataset) -> Iterator[pq.ParquetFile]:
    """The dataset's files in its row order, opened one at a time; a local file read through a
    buffer (pyarrow's default pre-buffers a row group's whole column chunks: a file written as
    one row group held its whole column). A store's file keeps the default: its pre-buffering
    coalesces the reads into few requests, where a buffer makes one request per MiB."""
    local = isinstance(ds.filesystem, pafs.LocalFileSystem)
    for path in ds.files:
        with ds.filesystem.open_input_file(path) as f:
            yield (pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False) if local
                   else pq.ParquetFile(f))


STREAM_BATCH_BYTES = 32 << 20  # what a streamed batch of the checks holds, about


def _batch_rows(pf: pq.ParquetFile, columns: list[str]) -> int:
    """Rows of a streamed batch of `columns`: about STREAM_BATCH_BYTES of them uncompressed,
    from the footer (16,384 rows of 4,096 float32 features held 256 MiB), 64 to 16,384."""
    meta, names = pf.metadata, set(columns)
    size = sum(meta.row_group(g).column(c).total_uncompressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns)
               if meta.row_group(g).column(c).path_in_schema.split(".")[0] in names)
    per_row = size / max(1, meta.num_rows)
    return int(min(16_384, max(64, STREAM_BATCH_BYTES // max(1.0, per_row))))


def _stream(ds: pads.Dataset, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The columns batch by batch (`_batch_rows`: about 32 MiB each), file by file, in the
    dataset's row order, with about one batch in memory. (The dataset scanner's `to_batches`
    held more than the whole 1M-sequence dataset of bench/driver_memory.py at its peak with
    its default read-ahead, and still 60% of it with read-ahead 1.)"""
    for pf in _parquet_files(ds):
        yield from pf.iter_batches(batch_size=_batch_rows(pf, columns), columns=columns)


def _scan_columns(ds: pads.Dataset, cfg: Config) -> DataFacts:
    """Read the named columns once (the large ones streamed, batch by batch), check what each
    holds, and keep every row's small columns: the labels, the difficulties and the sequence
    lengths, counted in the same pass that checks the tokens."""
    d, b = cfg.data, cfg.batching
    width = max_token = max_target = lengths = None
    if d.feature_column is not None:
        width = vector_width((batch.column(0) for batch in _stream(ds, [d.feature_column])),
                             f"data.feature_column={d.feature_column!r}")
    if b.difficulty_column is not None:
        kind = rows_schema(ds).field(b.difficulty_column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise ConfigError(f"data error: batching.difficulty_column={b.difficulty_column!r} "
                              f"is a {kind} column; difficulties are numbers")
    if d.sequence_column is not None:
        cols = [d.sequence_column] + ([d.target_column] if d.target_column else [])
        lengths = np.empty(ds.count_rows(), np.int64)
        kept = [0]  # targets not ignored within the tokens a batch keeps (batching.max_length)

        def counted(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            done = 0
            for batch in batches:
                yield batch  # counted once check_sequences has found it a list column
                lengths[done:done + batch.num_rows] = pc.list_value_length(batch.column(0))
                done += batch.num_rows
                if d.target_column and b.max_length is not None:
                    head = pc.list_flatten(pc.list_slice(batch.column(1), 0, b.max_length))
                    ignored = pc.sum(pc.equal(head, IGNORE_INDEX)).as_py() or 0
                    kept[0] += len(head) - ignored

        target_key = f"data.target_column={d.target_column!r}" if d.target_column else None
        max_token, max_target = check_sequences(
            counted(_stream(ds, cols)), f"data.sequence_column={d.sequence_column!r}", target_key)
        if cfg.train.loss == "token_cross_entropy" and target_key is not None:
            # (a loss over no element: every step skipped, a run that trains nothing)
            if max_target is None:
                raise ConfigError(f"data error: {target_key} holds no target to learn from: "
                                  f"every one is {IGNORE_INDEX} (ignored)")
            if b.max_length is not None and not kept[0]:
                raise ConfigError(f"config error: batching.max_length={b.max_length} keeps no "
                                  f"target: within each sequence's first {b.max_length} tokens "
                                  f"every target of {target_key} is {IGNORE_INDEX} (ignored)")
    cols = [c for c in (d.label_column, b.difficulty_column, d.id_column) if c]
    # (file by file, as `_stream` reads: the dataset's own scan takes its first file's schema,
    # which an empty first file may lack a column of)
    table = (pa.Table.from_batches(list(_stream(ds, cols))) if cols
             else pa.table({"_": pa.nulls(ds.count_rows())}))
    small = SampleTable.from_table(table, feature_column=None, label_column=d.label_column,
                                   difficulty_column=b.difficulty_column,
                                   id_column=d.id_column)  # checks the labels and the ids
    if small.difficulty is not None and not np.isfinite(small.difficulty).all():
        bad = int(np.flatnonzero(~np.isfinite(small.difficulty))[0])
        raise ConfigError(f"data error: batching.difficulty_column={b.difficulty_column!r}: row "
                          f"{bad} has no finite difficulty ({small.difficulty[bad]}; "
                          f"{int((~np.isfinite(small.difficulty)).sum())} such row(s)): a "
                          "curriculum could not place it")
    embedded_digits = _embedded_digits(cfg)
    return DataFacts(width, max_token, max_target, embedded_digits,
                     dataclasses.replace(small, lengths=lengths))


def read_rows(ds: pads.Dataset, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """The rows at `positions` (dataset row positions, any order, in that order), reading one
    Parquet row group at a time and keeping only its rows asked for. (`Dataset.take` held
    1 GiB of a 894 MiB dataset to take 64 rows: bench/README.md.)

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.parquet"
    >>> pq.write_table(pa.table({"x": list(range(10))}), path, row_group_size=3)
    >>> read_rows(pads.dataset(path), np.array([7, 0, 8, 3]), ["x"]).column("x").to_pylist()
    [7, 0, 8, 3]
    >>> read_rows(pads.dataset(path), np.array([2, 3, 4, 5, 5, 6]), ["x"]).column("x").to_pylist()
    [2, 3, 4, 5, 5, 6]
    >>> read_rows(pads.dataset(path), np.array([3, 3, 5, 6, 8, 6]), ["x"]).column("x").to_pylist()
    [3, 3, 5, 6, 8, 6]
    >>> read_rows(pads.dataset(path), np.arange(1, 9), ["x"]).column("x").to_pylist()
    [1, 2, 3, 4, 5, 6, 7, 8]
    """
    positions = np.asarray(positions, dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    parts, start = [], 0
    for pf in _parquet_files(ds):
        for g in range(pf.metadata.num_row_groups):
            end = start + pf.metadata.row_group(g).num_rows
            lo, hi = np.searchsorted(wanted, [start, end])
            if hi > lo:
                group = pf.read_row_group(g, columns=columns)
                run = wanted[lo:hi]
                if (np.diff(run) == 1).all():  # a run of rows (no repeat): sliced, not copied
                    parts.append(group.slice(int(run[0]) - start, hi - lo))
                else:
                    parts.append(group.take(pa.array(wanted[lo:hi] - start)))
            start = end
    if not parts:  # (the first file with rows': an empty first file may lack a column)
        return rows_schema(ds).empty_table().select(columns)
    table = pa.concat_tables(parts)
    if np.all(order[1:] > order[:-1]):  # asked in row order: the rows are in it already
        return table
    return table.take(pa.array(np.argsort(order, kind="stable")))


def small_columns(cfg: Config, info: DatasetInfo) -> tuple[SampleTable, dict[str, int | None]]:
    """Every row's small columns (labels, difficulties, sequence lengths; no features or
    tokens: what the planners and the split need) and the model's facts (`DatasetInfo.facts`),
    as `resolve` read them in this process, or read (and checked) again for an info from
    elsewhere."""
    if info.small is not None:
        return info.small, info.facts
    facts = _scan_columns(pads.dataset(info.uri, format="parquet"), cfg)
    return facts.small, facts.model_facts()


def _embedded_digits(cfg: Config) -> bool:
    """The embedded digits datasets (8x8 images as 64 features)."""
    return cfg.data.path is None and cfg.data.name in ("digits", "digits_imbalanced")


def _pick_model(cfg: Config, *, embedded_digits: bool, width: int | None) -> Config:
    """`model.name: auto` -> the model that takes this data (recorded in the resolved config)."""
    if cfg.model.name != "auto":
        return cfg
    d = cfg.data
    if d.feature_column is not None and d.sequence_column is not None:
        raise ConfigError(f"config error: model.name=auto cannot choose between the feature "
                          f"vectors (data.feature_column={d.feature_column!r}) and the sequences "
                          f"(data.sequence_column={d.sequence_column!r}); name the model")
    if d.sequence_column is not None:
        name = "seq_transformer"
    else:
        name = "digits_cnn" if embedded_digits and width == 64 else "mlp"
    return cfg.with_overrides({"model.name": name})


def _check_model_and_loss(cfg: Config, facts: DataFacts) -> None:
    """The model can take the data, and the loss finds its columns and fits the outputs."""
    d, name, loss = cfg.data, cfg.model.name, cfg.train.loss
    kwargs = cfg.model.kwargs
    if name.startswith("import:"):  # the driver logs the final model, so it builds it too
        from pipeline.console import error_line
        from pipeline.engine.models import import_builder

        try:
            builder = import_builder(name)
        except Exception as err:  # the import itself may fail in any way (the user's code)
            raise ConfigError(f"config error: model.name={name}: {error_line(err)}") from None
        _check_builder_arguments(name, builder, kwargs)
        t = cfg.train
        if t.micro_batch_size == "auto" and not t.auto_micro_batchnorm and _builds_batchnorm(
                cfg, facts):  # (the config refuses the built-in models with BatchNorm alike)
            raise ConfigError(f"config error: {auto_micro_batchnorm_refusal(name)}")
    if name in ("digits_cnn", "mlp") and d.feature_column is None:
        raise ConfigError(f"config error: model.name={name} takes feature vectors "
                          f"(data.feature_column), but the data has token sequences "
                          f"(data.sequence_column={d.sequence_column!r})")
    if name == "digits_cnn" and facts.width != 64:
        raise ConfigError(f"config error: model.name=digits_cnn takes 64 features (8x8 images); "
                          f"data.feature_column={d.feature_column!r} holds {facts.width}")
    if name == "seq_transformer" and d.sequence_column is None:
        raise ConfigError(f"config error: model.name=seq_transformer takes token sequences "
                          f"(data.sequence_column), but the data has feature vectors "
                          f"(data.feature_column={d.feature_column!r})")
    if loss == "cross_entropy" and d.label_column is None:
        raise ConfigError("config error: train.loss=cross_entropy needs data.label_column")
    if loss == "token_cross_entropy" and (d.target_column is None or d.sequence_column is None):
        raise ConfigError("config error: train.loss=token_cross_entropy needs per-token targets: "
                          "data.target_column (and data.sequence_column) must be set")
    if loss == "nt_xent" and d.feature_column is None:
        raise ConfigError("config error: train.loss=nt_xent augments feature vectors: "
                          "data.feature_column must be set (sequences have no views)")
    if cfg.batching.strategy == "contrastive" and loss != "nt_xent":
        raise ConfigError(f"config error: batching.strategy=contrastive makes its views for "
                          f"train.loss=nt_xent; with train.loss={loss} it would train plain "
                          "random batches (set train.loss=nt_xent, or batching.strategy=random)")
    if cfg.batching.packing and name != "seq_transformer":
        raise ConfigError(f"config error: batching.packing=true needs a model that blocks "
                          f"attention between packed samples (seq_transformer), not "
                          f"model.name={name}")
    outputs = kwargs.get("num_outputs")
    top = {"cross_entropy": facts.model_facts()["max_label"],
           "token_cross_entropy": facts.max_target}.get(loss)
    if outputs is not None and top is not None and top >= outputs:
        what = "label" if loss == "cross_entropy" else "target"
        raise ConfigError(f"config error: model.kwargs.num_outputs={outputs} is too few for the "
                          f"{what} {top} in the data ({top + 1} classes at least)")
    vocab = kwargs.get("vocab_size")
    if vocab is not None and facts.max_token is not None and facts.max_token >= vocab:
        raise ConfigError(f"config error: model.kwargs.vocab_size={vocab} is too small for the "
                          f"token id {facts.max_token} in data.sequence_column")


def _builds_batchnorm(cfg: Config, facts: DataFacts) -> bool:
    """Whether a user's model (`import:`) has BatchNorm layers: built as the workers build it,
    on PyTorch's meta device (no memory for its weights). A builder that cannot build there (or
    at all) is left to the workers, which check the model they build."""
    import torch

    from pipeline.engine.batchnorm import has_batchnorm
    from pipeline.engine.models import build_model, model_spec

    try:
        with torch.device("meta"):
            return has_batchnorm(build_model(**model_spec(cfg, facts.model_facts())))
    except Exception:  # (the user's code: any failure)
        return False


def _check_builder_arguments(name: str, builder: Any, kwargs: dict[str, Any]) -> None:
    """A user's builder can be called as the workers call it (`build_model`: the builders'
    keyword arguments and `model.kwargs`): a signature that cannot take them (a misspelt
    `model.kwargs` key, a missing parameter) failed on every worker, after the cluster work.
    The call itself is not made here (it may be large); a builder without a signature to read
    (a builtin) is left to the workers."""
    import inspect

    given = sorted({"input_dim", "num_outputs", "vocab_size", "per_token",
                    "activation_checkpointing", *kwargs} - {"embedding_dim"})  # (nt_xent's
    # `embedding_dim` is passed as num_outputs)
    signatures = []  # (a decorator's own too: functools.wraps shows the wrapped function's)
    for follow in (True, False):
        with contextlib.suppress(TypeError, ValueError):  # (none to read: a builtin, say)
            signatures.append(inspect.signature(builder, follow_wrapped=follow))
    if not signatures:
        return
    errors = []
    for signature in signatures:
        try:
            signature.bind(**dict.fromkeys(given))
        except TypeError as err:
            errors.append(err)
    if len(errors) == len(signatures):
        err = errors[0]
        raise ConfigError(f"config error: model.name={name} cannot take the keyword arguments "
                          f"it is called with ({', '.join(given)}; model.kwargs "
                          f"included): {err}") from None


def _check_sync_batchnorm(cfg: Config, sizes: list[np.ndarray]) -> None:
    """SyncBatchNorm runs a collective in every forward pass, so every rank must run as many
    micro-batches in each step, or they wait on each other for good (a hang, until NCCL's
    watchdog aborts it). A step's shares differ by one sample at most (`rank_slice`), and an
    empty share is one empty micro-batch (which SyncBatchNorm takes), so the counts differ only
    where a batch's size splits unevenly over micro-batches: checked exactly, for every batch
    size of every epoch the job trains (`sizes`: `epoch_sizes`), up to `train.max_steps`.
    Under a batch-size schedule, whose steps group unit batches as the run decides, a short
    last unit is assumed to split unevenly. A user's model (`import:`) counts as having
    BatchNorm; the built-in ones without it have nothing to synchronise."""
    from pipeline.config import BATCHNORM_MODELS
    from pipeline.data.plan import rank_slice

    t, b, world = cfg.train, cfg.batching, cfg.scaling.num_workers
    name = cfg.model.name
    if not t.sync_batchnorm or world < 2 or not (name in BATCHNORM_MODELS
                                                 or name.startswith("import:")):
        return
    share = t.global_batch_size // world
    micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else share
    budget = b.strategy == "length_bucket" and b.options.get("max_tokens") is not None
    way_out = ("fixed-size batches (no batching.options.max_tokens)" if budget else
               f"train.micro_batch_size={share} (one per worker and step), or "
               "batching.drop_last=true" if micro < share else "batching.drop_last=true")

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"config error: train.sync_batchnorm=true: {why}; SyncBatchNorm's collective in "
            "every forward pass needs as many micro-batches on every worker, or they wait on "
            f"each other for good: use {way_out}")

    if t.batch_size_schedule != "constant":
        if budget or (not b.drop_last and micro < share):
            raise refuse(f"train.batch_size_schedule={t.batch_size_schedule} with "
                         f"{'a token budget' if budget else 'batching.drop_last=false'} (a "
                         "step's batch can split unevenly over the workers' micro-batches)")
        return
    left = t.max_steps
    for epoch, trained in enumerate(sizes):
        trained = trained[:left]
        for size in np.unique(trained):
            batch = np.arange(int(size))
            counts = sorted({len(micro_slices(rank_slice(batch, rank, world), micro))
                             for rank in range(world)})
            if len(counts) > 1:
                raise refuse(f"epoch {epoch + 1} has a batch of {size} samples, which is "
                             f"{' or '.join(map(str, counts))} micro-batches of {micro} per "
                             f"worker on {world}")
        if left is not None:
            left -= len(trained)
            if left <= 0:
                return


def _check_split_classes(labels: np.ndarray, cfg: Config) -> None:
    """Every class must appear in both the training and the validation split."""
    train, val = split_train_val(len(labels), labels, cfg.data.val_fraction, cfg.data.split_seed)
    for name, part in (("training", train), ("validation", val)):
        missing = np.setdiff1d(np.unique(labels), np.unique(labels[part]))
        if len(missing):
            raise ConfigError(
                f"data error: class {missing[0].item()!r} of data.label_column={cfg.data.label_column!r} "
                f"is missing from the {name} split ({int((labels == missing[0]).sum())} sample(s), "
                f"data.val_fraction={cfg.data.val_fraction})")


def _check_first_epoch(st: SampleTable, cfg: Config) -> tuple[str | None, int]:
    """Plan epoch 0 on the driver from the small columns (`st`), so a strategy that cannot
    work on this data (no labels, classes not dividing the batch, an empty pool...) fails here
    with exit 2 rather than on the workers. Returns a note for the job's start (or None) and
    the epochs the run reaches (`train.max_steps` under a constant batch may end it sooner)."""
    from pipeline.data.epochs import epoch_batches, epoch_sizes, lr_schedule

    b = cfg.batching
    train, val = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    out_of_memory = False
    try:
        eb = epoch_batches(cfg, st, train, 0, cfg.scaling.num_workers)
        # Every epoch's batches (curriculum pools, epoch_samples...): none may be empty.
        sizes = epoch_sizes(cfg, st, train)
    except MemoryError:  # (numpy's: plans the options make too large to hold, one epoch's)
        out_of_memory = True  # said below, once the traceback's frames (and the arrays they
        # held) are gone: here, building the line itself ran out of memory now and then
    except (ValueError, KeyError) as err:
        unit = ("" if cfg.train.batch_size_schedule == "constant" else
                f" (the batch planned is train.batch_size_min={cfg.plan_batch_size()} under "
                f"train.batch_size_schedule={cfg.train.batch_size_schedule})")
        raise ConfigError(f"config error: batching.strategy={b.strategy}: {err}{unit}") from None
    if out_of_memory:
        raise ConfigError(f"config error: batching.strategy={b.strategy}: planning its epochs "
                          f"ran out of memory on the driver (batching.options="
                          f"{dict(b.options)}, {len(train):,} training rows)")
    try:  # the workers' LR schedule, from the same counts
        lr_schedule(cfg, [len(s) for s in sizes])
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    if not eb.batches:
        raise ConfigError(
            f"config error: batching.strategy={b.strategy}: epoch 1 has no batch of "
            f"train.global_batch_size={cfg.train.global_batch_size} from {len(train)} training rows")
    _check_token_budgets(st, cfg, train, val)
    _check_sync_batchnorm(cfg, sizes)
    _check_contrastive_batches(cfg, sizes, len(val))
    reached, steps = cfg.train.epochs, 0
    if cfg.train.max_steps is not None and cfg.train.batch_size_schedule == "constant":
        for epoch, batch_sizes in enumerate(sizes):  # (a step is a batch)
            steps += len(batch_sizes)
            if steps >= cfg.train.max_steps:
                reached = min(reached, epoch + 1)
                break
    return _check_schedule_reach(cfg, [len(s) for s in sizes]), reached


def _check_contrastive_batches(cfg: Config, sizes: list[np.ndarray], n_val: int) -> None:
    """NT-Xent contrasts each sample with the others of its batch: a batch of one sample has
    none -- its loss and gradient are exactly 0, and the optimizer's momentum and weight decay
    would still step on it -- and a validation split of one sample scores val_accuracy 1.0 (a
    sweep would rank it first). `sizes`: every epoch's batches (`epoch_sizes`), under a batch
    schedule its unit batches, checked as the steps take them: a `warmup` ramp's (known
    before training: an epoch's last unit of 1 sample is a step alone while the ramp is at one
    unit); an `adaptive` schedule's k's are decided in training (not checked)."""
    if cfg.train.loss != "nt_xent":
        return
    t = cfg.train
    smallest: list[tuple[int, int]] = []  # (epoch, samples of a step: its smallest, or each)
    if t.batch_size_schedule == "constant":  # (a step is a batch)
        smallest = [(epoch, int(s.min())) for epoch, s in enumerate(sizes, 1) if len(s)]
    elif t.batch_size_schedule == "warmup" and t.batch_size_min:
        from pipeline.engine.batch_schedule import ramp_steps

        taken = ramp_steps([len(s) for s in sizes], t.global_batch_size // t.batch_size_min,
                           t.batch_size_warmup_steps or 0,
                           t.max_steps if t.max_steps is not None else math.inf)
        left = [0] * len(sizes)
        epoch = 0
        for _, k in taken:  # (ramp_steps walks the epochs in order, as it is given them)
            while left[epoch] >= len(sizes[epoch]):
                epoch += 1
            smallest.append((epoch + 1, int(sizes[epoch][left[epoch]:left[epoch] + k].sum())))
            left[epoch] += k
    for epoch, samples in smallest:
        if samples == 1:
            raise ConfigError(
                f"config error: train.loss=nt_xent: epoch {epoch} has a "
                f"{'batch' if t.batch_size_schedule == 'constant' else 'step'} of 1 sample "
                f"(the last, which batching.drop_last=false keeps), with no other sample to "
                f"contrast it with: set batching.drop_last=true, or a batch size that leaves "
                f"more over")
    if n_val == 1:
        raise ConfigError(f"config error: train.loss=nt_xent: data.val_fraction="
                          f"{cfg.data.val_fraction:g} holds out 1 sample, with no other to "
                          "contrast it with (its val_accuracy would be 1.0): hold out none (0) "
                          "or at least 2")


def _check_schedule_reach(cfg: Config, units: list[int]) -> str | None:
    """A batch-size schedule the run ends before it acts, refused (as an LR warmup past
    train.max_steps is): a warmup ramp still at one unit batch at the run's last step (each
    step takes k unit batches of the ramp, an epoch's last what is left of it: `group_units`),
    and an adaptive schedule whose first decision comes after as many steps as the run has unit
    batches (at most that many steps) -- each trained the smallest batch throughout, without a
    word. A ramp the run cuts short after it grew is a note (returned): the batch it ends at.
    `units`: each epoch's unit batches."""
    from pipeline.engine.batch_schedule import EXPLORE_UNITS, ramp_steps

    t = cfg.train
    most = t.global_batch_size // t.batch_size_min if t.batch_size_min else 1
    if t.batch_size_schedule == "constant":
        return None
    if most == 1:  # (one unit: nothing to grow)
        return (f"train.batch_size_schedule={t.batch_size_schedule} has one batch size to take: "
                f"train.batch_size_min={t.batch_size_min} is train.global_batch_size: it trains "
                "as constant" if t.batch_size_min is not None else None)
    cap = t.max_steps if t.max_steps is not None else math.inf
    where = (f"train.max_steps={t.max_steps}" if t.max_steps is not None and t.max_steps < sum(units)
             else f"train.epochs={t.epochs}")
    if t.batch_size_schedule == "warmup":
        step = k = 0
        for k, _ in ramp_steps(units, most, t.batch_size_warmup_steps, cap):
            if k == most:
                return None
            step += 1
        ends = (f"train.batch_size_warmup_steps={t.batch_size_warmup_steps}: the run ends "
                f"after {step} optimizer steps ({where}), ")
        if k <= 1:
            raise ConfigError(f"config error: {ends}before the ramp grows the batch from "
                              f"train.batch_size_min={t.batch_size_min}; shorten the ramp or "
                              "train longer")
        return (f"{ends}with the ramp at a batch of {k * t.batch_size_min}, short of "
                f"train.global_batch_size={t.global_batch_size}")
    if t.batch_size_interval >= min(sum(units), cap):
        raise ConfigError(f"config error: train.batch_size_interval={t.batch_size_interval} is "
                          f"the run's length or more ({where}: at most {min(sum(units), cap)} "
                          "steps): the adaptive schedule would never decide; decide more often "
                          "or train longer")
    if t.batch_size_step_cost is None:  # measured: its first interval timed at 1 unit batch,
        # its second at EXPLORE_UNITS, its first choice by goodput at step 2 x interval
        explored, interval, steps = min(EXPLORE_UNITS, most), t.batch_size_interval, 0
        for left in units:  # the steps as training groups them (an epoch's last: what is left)
            while left > 0 and steps < cap:
                left -= 1 if steps < interval else explored
                steps += 1
        if steps <= 2 * interval:  # (step 2 x interval, 0-based, is never taken)
            return (f"train.batch_size_interval={t.batch_size_interval}: the adaptive schedule "
                    f"times its first two intervals (the second at {explored} unit batches) to "
                    f"measure its step cost and first chooses by the noise scale at step "
                    f"{2 * t.batch_size_interval}, which the run ({where}) does not reach: it "
                    f"trains at {explored * t.batch_size_min} from step "
                    f"{t.batch_size_interval} on; decide more often, train longer, or set "
                    "train.batch_size_step_cost")
    return None


def _check_token_budgets(st: SampleTable, cfg: Config, train: np.ndarray,
                         val: np.ndarray | None = None) -> None:
    """Budgets the longest sequence (as collated: `planned_lengths`) must fit: a packed row's
    `batching.pack_tokens`, training or validation sequence (validation is packed too; a
    longer sequence would get a wider row of its own), and a token-budget batch
    (`length_bucket`'s `max_tokens`, training: a longer sequence would get a batch of its own,
    over the budget)."""
    from pipeline.data.epochs import planned_lengths

    b = cfg.batching
    if st.lengths is None or not len(train):
        return
    longest = int(planned_lengths(cfg, st.lengths[train]).max())
    cut = " (or set batching.max_length to truncate them)"
    if b.packing and b.pack_tokens is not None:
        longest_val = (int(planned_lengths(cfg, st.lengths[val]).max())
                       if val is not None and len(val) else 0)
        for most, which in ((longest, "training"), (longest_val, "validation")):
            if most > b.pack_tokens:
                raise ConfigError(f"config error: batching.pack_tokens={b.pack_tokens} is shorter "
                                  f"than the longest {which} sequence ({most} tokens): raise "
                                  f"it{cut}")
    max_tokens = b.options.get("max_tokens") if b.strategy == "length_bucket" else None
    if max_tokens is not None and max_tokens < longest:
        raise ConfigError(
            f"config error: batching.options.max_tokens={max_tokens} is less than the longest "
            f"training sequence ({longest} tokens{' as padded' if b.pad_multiple_of else ''}): "
            f"its batch would exceed the budget; set it to at least {longest}{cut}")
