"""`find-batch-size`: the largest micro-batch one worker trains, measured on this machine.

The model, optimizer, precision and loss come from the resolved config; the batches from the
dataset's training split, largest samples first (for sequences the longest, so every batch pads
to the longest sequence the job will meet: padding makes memory depend on it). The small columns
and the model's facts are those `resolve` read for its checks (one pass over the data); a size's
rows are read when it is tried (`LargestRows`) and collated by the function training collates
a micro-batch with (`pipeline.data.feed.collate`: padding, packing, contrastive views). The
search and the measurement are `pipeline.engine.batch_finder` (doubling, then bisection to the
exact boundary; on a CPU against a memory budget). By default one worker runs here, in-process
and without Ray (a GPU box without a cluster); `--on-workers` runs the search on the cluster's
`scaling.num_workers` Ray Train workers, each on its own device (`pipeline.launch.find_on_workers`):
every rank tries the same size and the ranks agree on it (a MIN all-reduce: the minimum wins, no
rank is left waiting in a collective after another ran out of memory), and rank 0's measurements
are written.

Writes `DIR/find_batch_size.json` (`max_micro_batch_size`, `device`, `ranks`, `suggestion`,
`trials`, `step_cost_per_worker`) and `DIR/find_batch_size.png`, and prints a table. The step times of
the sizes that fit give the throughput model of the adaptive batch-size schedule
(`step_cost_per_worker`: its c for one worker, read back by `step_cost_from`, which
`train.batch_size_throughput` names). Heavy imports (torch) happen inside the
functions: `parse_size` is used while the arguments are parsed.
"""

from __future__ import annotations

import math
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.files import save_figure, write_json
from pipeline.redact import redact_text

MARGIN = 0.9  # the suggestion's micro-batch is at most this share of the largest that fits
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str, what: str = "--max-memory") -> int:
    """A memory size in bytes: a number of bytes, or with a unit (KiB, MiB, GiB, TiB: powers of
    1024; KB, MB, GB, TB: powers of 1000; any case). ConfigError naming `what` otherwise.

    >>> parse_size("512MiB"), parse_size("4GiB"), parse_size("1.5KB"), parse_size("1000")
    (536870912, 4294967296, 1500, 1000)
    >>> parse_size("9" * 400)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: argument error: --max-memory: '999...
    >>> parse_size("lots")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: argument error: --max-memory: 'lots' is not a memory size (e.g. ...
    """
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    size = float(m.group(1)) * _UNITS[unit] if m and unit in _UNITS else math.nan
    if not 1 <= size < math.inf:  # no unit known, under a byte, or past a float
        raise ConfigError(f"argument error: {what}: {text!r} is not a memory size "
                          "(e.g. 512MiB, 4GiB, 1000000)")
    return int(size)


def _device(cfg: Config) -> Any:
    import torch

    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("config error: scaling.use_gpu=true but this machine has no CUDA device "
                          "(find-batch-size measures on this machine's device; --on-workers "
                          "measures on the cluster's workers)")
    return torch.device("cuda", torch.cuda.current_device())


def _device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' * (n != 1)})"


def _default_budget(workers: int = 1) -> int:
    """Half the memory available now, shared by `workers` (a CPU run without --max-memory:
    the workers on this machine, `workers_on_this_machine`)."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with Ray
        import os

        available = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return available // 2 // max(1, workers)


def workers_on_this_machine(num_workers: int) -> int:
    """The workers that share this machine's memory. In one process (no process group):
    `num_workers`, the config's, as a local cluster runs them all here. On the ranks of
    `--on-workers`: those whose host name is this rank's, gathered from every rank (a
    collective: every rank calls it) -- a rank alone on its node has the node to itself,
    whatever the cluster's size."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return max(1, num_workers)
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(hosts[dist.get_rank()])


def largest_first(lengths: Any, positions: Any) -> Any:
    """Training positions, longest sequence first (stable); fixed-size samples keep their order.

    >>> import numpy as np
    >>> largest_first(np.array([5, 9, 2, 9]), np.array([0, 1, 2, 3])).tolist()
    [1, 3, 0, 2]
    """
    import numpy as np

    if lengths is None:
        return positions
    return positions[np.argsort(-lengths[positions], kind="stable")]


class LargestRows:
    """The rows of the first `size` positions of `order`, all columns, read from the Parquet
    dataset when asked (`read_rows`, a row group at a time): the driver holds the largest
    batch tried, never the dataset. The search only grows and then bisects below its largest
    size, so the largest read is kept and smaller batches are its prefixes."""

    def __init__(self, ds: Any, cfg: Config, order: Any) -> None:
        d = cfg.data
        self.ds, self.order, self.cfg = ds, order, cfg
        self.columns = [c for c in (d.feature_column, d.label_column, d.sequence_column,
                                    d.target_column, d.id_column) if c]
        self.table: Any = None
        self.reads = 0  # how often the dataset was read (tests)

    def window(self, size: int) -> Any:
        """The rows of order[:size] as a `Window`: it gathers them by their positions in the
        dataset, as training gathers a micro-batch's rows (`pipeline/data/feed.py`)."""
        import dataclasses

        import numpy as np
        import pyarrow as pa

        from pipeline.data.batches import SampleTable
        from pipeline.data.datasets import read_rows
        from pipeline.data.rows import Window

        if self.table is None or self.table.num_rows < size:
            self.table = read_rows(self.ds, self.order[:size], self.columns)
            self.reads += 1
        part = np.asarray(self.order[:size], dtype=np.int64)
        by_position = np.argsort(part, kind="stable")  # a Window's positions are sorted
        d = self.cfg.data
        st = SampleTable.from_table(
            self.table.slice(0, size).take(pa.array(by_position)),
            feature_column=d.feature_column, label_column=d.label_column,
            sequence_column=d.sequence_column, target_column=d.target_column,
            id_column=d.id_column)
        if d.id_column is None:  # a sample's id is its position in the dataset, as in training
            st = dataclasses.replace(st, ids=part[by_position])
        return Window(part[by_position], st)


def _batch_maker(cfg: Config, order: Any, rows_of: Any, device: Any, model_name: str) -> Any:
    """`batch_of(size)`: the first `size` positions of `order`, gathered from `rows_of(size)`
    (a `Window` of them, or the whole `SampleTable`)."""
    from pipeline.data.feed import collate, image_shape
    from pipeline.engine.step import to_torch

    def batch_of(size: int) -> Any:
        # collated as the worker collates a micro-batch (one function: pipeline/data/feed.py)
        return to_torch(collate(cfg, order[:size], (cfg.batching.seed, 0, 0), rows_of(size),
                                image_shape(model_name)), device)

    return batch_of


def find_batch_size(cfg: Config, info: Any, out: Path, max_memory: int | None, *,
                    progress: bool = False, on_workers: bool = False,
                    address: str | None = None) -> dict[str, Any]:
    """Search, write the JSON and the plot, return the JSON's content. `progress`: print the
    setup and the table row by row as the sizes are tried (the CLI). `on_workers`: on the
    cluster's `scaling.num_workers` workers, each rank on its own device, agreeing on every
    size (`pipeline.launch.find_on_workers`; `address` as `train`'s); else in this process,
    on this machine's device, without Ray."""
    if on_workers:
        from pipeline.launch import find_on_workers

        result = find_on_workers(cfg, info, max_memory, address=address, progress=progress)
    else:
        result = search(cfg, info, max_memory, device=_device(cfg), progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "find_batch_size.json", result)
    plot(result, out / "find_batch_size.png")
    return result


def search(cfg: Config, info: Any, max_memory: int | None, *, device: Any,
           progress: bool = False, table: Any = None) -> dict[str, Any]:
    """The search on `device` (this rank's, with several: every rank calls it, and each size
    is agreed by a MIN over the ranks); the content of find_batch_size.json. `table`: the
    dataset's `SampleTable` (a Ray Train worker's, from the object store: the Parquet files
    may be on the driver's node only); else each size's rows are read from the files."""
    import pyarrow.dataset as pads
    import torch

    from pipeline.console import say
    from pipeline.data.batches import split_train_val
    from pipeline.data.datasets import small_columns
    from pipeline.engine.batch_finder import (
        find_max_micro_batch,
        human_bytes,
        make_trial_step,
        min_over_ranks,
        suggest_batching,
        trial_step_cost,
    )
    from pipeline.engine.models import build_model, model_spec
    from pipeline.engine.optim import build_optimizer

    budget, source = max_memory, "--max-memory"
    if budget is None and device.type == "cpu":  # (the same on every rank: all gather, or none)
        workers = workers_on_this_machine(cfg.scaling.num_workers)
        budget, source = _default_budget(workers), (
            "half the memory available (no --max-memory)" if workers == 1 else
            f"half the memory available over the {workers} workers on this machine "
            "(no --max-memory)")
    d, t = cfg.data, cfg.train
    ds = pads.dataset(info.uri, format="parquet") if table is None else None
    # as resolve read them, rows read as needed; or the workers' table, and the model's facts
    # the info carries (its small columns are not sent with it; the rank reads no file)
    st, facts = (table, info.facts) if table is not None else small_columns(cfg, info)
    train_pos, _ = split_train_val(len(st), st.labels, d.val_fraction, d.split_seed)
    order = largest_first(st.lengths, train_pos)
    torch.manual_seed(t.seed)
    spec = model_spec(cfg, facts)
    failed = None
    try:
        model = build_model(**spec)
    except Exception as err:  # a user builder's bug: the same on every try (as on the workers)
        failed = ConfigError(f"config error: model.name={cfg.model.name}: "
                             f"{type(err).__name__}: {err}")
    # every rank fails together, or none (one that failed alone -- an import missing on its
    # node -- would leave the others waiting in the search's first agreement)
    if min_over_ranks(0 if failed else 1) == 0:
        raise failed or ConfigError(f"config error: model.name={cfg.model.name}: another "
                                    "rank could not build it (see its log)")
    model = model.to(device)
    optimizer = build_optimizer(t.optimizer, model, lr=t.base_lr, weight_decay=t.weight_decay,
                                momentum=t.momentum)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    rows_of = (lambda size: table) if table is not None else LargestRows(ds, cfg, order).window
    batch_of = _batch_maker(cfg, order, rows_of, device, spec["name"])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # with several workers, DDP's gradient buckets: about one more copy, held throughout a step
    extra = grads if cfg.scaling.num_workers > 1 else 0
    try_step = make_trial_step(model, optimizer, batch_of, loss=t.loss, device=device,
                               precision=t.precision, scaler=scaler, max_memory_bytes=budget,
                               extra_bytes=extra)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # time a step as a worker runs it: Ray sets its OMP_NUM_THREADS
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    try:  # the device named (its threads) and the steps timed as a worker runs them
        longest = int(st.lengths[order[0]]) if st.lengths is not None else None
        if longest is not None and cfg.batching.max_length:
            longest = min(longest, cfg.batching.max_length)
        setup = {"model": spec["name"], "device": _device_name(device),
                 "samples": (f"the training split's longest sequences first ({longest} tokens)"
                             if longest is not None else "training samples (all the same size)"),
                 "max_memory_bytes": budget, "budget": source if budget is not None else None}
        if progress:  # the table as it fills: a size of long sequences can take a minute
            say(setup_line(setup))
            _line(TABLE_HEADER)
        shown = (lambda x: _line(table_row(vars(x)))) if progress else None
        search = find_max_micro_batch(try_step, limit=len(order), on_trial=shown)
        # A step of several micro-batches runs all but its first beside the gradients it has
        # accumulated (and with several workers DDP's gradient buckets, about one more copy):
        # where the suggestion takes several, the largest that fits so is searched too.
        suggest = partial(suggest_batching, search.max_micro_batch_size, t.global_batch_size,
                          cfg.scaling.num_workers, MARGIN, below=cfg.micro_batch_below())
        suggestion, held = suggest(), None
        if suggestion is not None and suggestion["accumulation_steps"] > 1:
            if progress:
                say(f"a step of several micro-batches (its gradients held: "
                    f"{human_bytes(grads)}):")
                _line(TABLE_HEADER)
            # (a scaler of its own: the first search's may have been replaced after an
            # out-of-memory inside its step, see make_trial_step)
            fresh = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
            held = find_max_micro_batch(
                make_trial_step(model, optimizer, batch_of, loss=t.loss, device=device,
                                precision=t.precision, scaler=fresh, max_memory_bytes=budget,
                                timed_steps=0, hold_gradients=True, extra_bytes=extra),
                limit=search.max_micro_batch_size, on_trial=shown)
            suggestion = suggest(accumulating=held.max_micro_batch_size)
    finally:
        torch.set_num_threads(threads)
    import torch.distributed as dist

    result = {
        "max_micro_batch_size": search.max_micro_batch_size,
        "device": setup["device"],
        # the ranks that agreed on every size (--on-workers; the device and times: rank 0's)
        "ranks": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "suggestion": suggestion,
        # the largest that fits as the later micro-batches of a step of several run (searched
        # where the suggestion takes several), and its trials
        "max_accumulating_micro_batch_size": held.max_micro_batch_size if held else None,
        "held_bytes": {"gradients": grads, "ddp_buckets": extra},
        "accumulating_trials": [vars(x) for x in held.trials] if held else [],
        "trials": [vars(x) for x in search.trials],
        "step_cost_per_worker": trial_step_cost(search.trials),
        "max_memory_bytes": budget,
        "budget": setup["budget"],
        "limit": search.limit,
        "hit_limit": search.hit_limit,
        "samples": setup["samples"],
        "peak_memory": "CUDA: max_memory_allocated during the step" if device.type == "cuda" else
        "tensors alive at the step's start (weights, gradients, optimizer state, batch) + the "
        "CPU allocator's high-water mark during the step (torch.profiler memory events)",
        "model": spec["name"], "optimizer": t.optimizer, "precision": t.precision, "loss": t.loss,
        "dataset": redact_text(info.uri),  # (a URI's credentials masked: a file users share)
    }
    if result["suggestion"] is not None:
        s = result["suggestion"]
        result["suggestion"]["set"] = (f"--set train.micro_batch_size={s['micro_batch_size']} "
                                       f"--set train.global_batch_size={s['global_batch_size']}")
    return result


def _line(text: str) -> None:
    """A row of the table as it fills. Written, not printed: on a Ray Train worker
    (`--on-workers`) `print` also goes to Train's logger, and the row showed twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def measured_setup(path: str) -> dict[str, object]:
    """What a find_batch_size.json (`step_cost_from` read it already) was measured with, as
    config keys: model.name, train.precision, train.loss, scaling.use_gpu (those it records).

    >>> import json, tempfile; f = Path(tempfile.mkdtemp()) / "fbs.json"
    >>> _ = f.write_text(json.dumps({"model": "mlp", "precision": "fp32", "device": "cuda:0 (H100)"}))
    >>> measured_setup(str(f))
    {'model.name': 'mlp', 'train.precision': 'fp32', 'scaling.use_gpu': True}
    """
    import json

    try:
        result = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(result, dict):
        return {}
    keys = {"model": "model.name", "precision": "train.precision", "loss": "train.loss"}
    out: dict[str, object] = {keys[k]: result[k] for k in keys if isinstance(result.get(k), str)}
    if isinstance(result.get("device"), str):
        out["scaling.use_gpu"] = result["device"].startswith("cuda")
    return out


def step_cost_from(path: str, num_workers: int) -> float:
    """The adaptive schedule's step cost c for `num_workers` workers from a
    `find_batch_size.json` (`train.batch_size_throughput`).
    A step of global batch M has M / num_workers samples per worker, T = a + b M / W, so c is
    the file's per-worker c times W. ConfigError (one line naming the key) when the file is
    missing, is not such a file, or holds no step cost (fewer than two sizes fit)."""
    import json

    key = "train.batch_size_throughput"
    try:
        result = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ConfigError(f"config error: {key}: no such file: {path}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"config error: {key}: {path} is not a find_batch_size.json "
                          f"({type(err).__name__})") from None
    cost = result.get("step_cost_per_worker") if isinstance(result, dict) else None
    if not isinstance(cost, int | float) or isinstance(cost, bool) or not 0 <= cost < math.inf:
        # (Python's JSON reads NaN, Infinity and 1e400 as floats: the config then blamed
        # train.batch_size_step_cost, a key the user never set)
        shown = "" if cost is None else f" ({cost!r})"
        raise ConfigError(f"config error: {key}: {path} holds no step_cost_per_worker{shown} "
                          "(a finite number >= 0, written by find-batch-size when at least two "
                          "micro-batch sizes fit)")
    return float(cost) * num_workers


def table_lines(result: dict[str, Any]) -> list[str]:
    """The trials as a fixed-width table, in the order tried.

    >>> r = {"trials": [{"micro_batch_size": 64, "fits": True, "peak_memory_bytes": 3 * 2**20,
    ...                  "samples_per_s": 1234.5, "note": None},
    ...                 {"micro_batch_size": 128, "fits": False, "peak_memory_bytes": None,
    ...                  "samples_per_s": None, "note": "out of memory"}]}
    >>> print("\\n".join(table_lines(r)))
      size  fits    peak MiB   samples/s  note
        64  yes          3.0      1234.5
       128  no             -           -  out of memory
    """
    return [TABLE_HEADER, *(table_row(x) for x in result["trials"])]


TABLE_HEADER = f"{'size':>6}  {'fits':<4}  {'peak MiB':>10}  {'samples/s':>10}  note"


def table_row(x: dict[str, Any]) -> str:
    """One trial (`Trial`'s fields) as a row of the table."""
    peak = "-" if x["peak_memory_bytes"] is None else f"{x['peak_memory_bytes'] / 2**20:.1f}"
    sps = "-" if x["samples_per_s"] is None or not x["fits"] else f"{x['samples_per_s']:.1f}"
    return (f"{x['micro_batch_size']:>6}  {'yes' if x['fits'] else 'no':<4}  {peak:>10}  "
            f"{sps:>10}  {x['note'] or ''}").rstrip()


def setup_line(result: dict[str, Any]) -> str:
    """The model, the device, the samples and the memory budget (from the result's keys)."""
    from pipeline.engine.batch_finder import human_bytes

    budget = result["max_memory_bytes"]
    return (f"{result['model']} on {result['device']}, {result['samples']}"
            + (f"; budget {human_bytes(budget)} ({result['budget']})" if budget else ""))


def print_result(result: dict[str, Any], *, table: bool = True) -> None:
    """What `python -m pipeline find-batch-size` prints: the setup and the table (unless
    printed as the search went, `find_batch_size(progress=True)`), then the answer."""
    from pipeline.console import say

    if table:
        say(setup_line(result))
        print("\n".join(table_lines(result)), flush=True)
        if result.get("accumulating_trials"):
            say("a step of several micro-batches (the gradients held):")
            print("\n".join(table_lines({"trials": result["accumulating_trials"]})), flush=True)
    more = " (the limit: the training split's size)" if result["hit_limit"] else ""
    say(f"largest micro-batch that fits: {result['max_micro_batch_size']}{more}")
    if result.get("max_accumulating_micro_batch_size") is not None:
        say(f"largest that fits as the later micro-batches of a step of several: "
            f"{result['max_accumulating_micro_batch_size']}")
    if result.get("step_cost_per_worker") is not None:
        say(f"a step's fixed cost: {result['step_cost_per_worker']:g} samples' worth per worker "
            "(train.batch_size_throughput: this file, for batch_size_schedule=adaptive)")
    s = result["suggestion"]
    if s is not None:
        say(f"suggestion (margin {s['margin']:g}): micro {s['micro_batch_size']} x accumulation "
            f"{s['accumulation_steps']} x workers {s['num_workers']} = global "
            f"{s['global_batch_size']}: {s['set']}")


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend is left alone

    trials = sorted(result["trials"], key=lambda x: x["micro_batch_size"])
    fig = Figure(figsize=(10, 3.8))
    ax = fig.subplots(1, 2)
    for fits, style in ((True, dict(marker="o", color="tab:blue", label="fits")),
                        (False, dict(marker="x", color="tab:red", label="does not fit"))):
        pts = [(x["micro_batch_size"], x["peak_memory_bytes"] / 2**20) for x in trials
               if x["fits"] == fits and x["peak_memory_bytes"] is not None]
        if pts:
            ax[0].scatter(*zip(*pts, strict=True), **style)
    if result["max_memory_bytes"]:
        ax[0].axhline(result["max_memory_bytes"] / 2**20, color="gray", linestyle="--", label="budget")
    if result["max_micro_batch_size"]:  # (nothing fits: no line, at 0 on a log axis)
        ax[0].axvline(result["max_micro_batch_size"], color="tab:green", linestyle=":",
                      label=f"largest that fits: {result['max_micro_batch_size']}")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("micro-batch size")
    ax[0].set_ylabel("peak memory of one step (MiB)")
    ax[0].legend(fontsize=8)
    pts = [(x["micro_batch_size"], x["samples_per_s"]) for x in trials
           if x["fits"] and x["samples_per_s"]]
    if pts:
        ax[1].plot(*zip(*pts, strict=True), marker="o")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("micro-batch size")
    ax[1].set_ylabel("samples/s (one worker)")
    fig.suptitle(f"{result['model']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
