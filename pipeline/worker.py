"""The per-worker function of Ray Train: shard -> batches -> engine (Ray lives here).

Every worker receives the dataset's Arrow blocks (`pipeline/blocks.py`: the whole table,
zero-copy from the node's object store, or in the streaming mode the small columns and the rows
of its coming steps), builds the same epoch plan from (data, seed, epoch, global batch size),
takes its slice of each global batch, and steps the pure-PyTorch engine. Rank 0 logs metrics to MLflow and
writes one checkpoint per epoch, reported to Ray Train (which keeps it in run storage).

Where the function runs is a `Session`: a Ray Train worker (`RayTrainSession`, the default),
or, for a one-worker sweep trial, the trial's own Tune actor (`pipeline/tune/trial.py`), which
spares the trial a worker group of its own. The training itself is the same code either way.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import console
from pipeline.blocks import load_rows
from pipeline.config import Config, ConfigError, auto_micro_batchnorm_refusal, ghost_batch_size
from pipeline.data.batches import first_misaligned, micro_slices, split_train_val
from pipeline.data.epochs import lr_schedule, steps_per_epoch
from pipeline.data.feed import FeedStep, RankFeed, image_shape
from pipeline.data.padding import IGNORE_INDEX
from pipeline.data.plan import rank_slice
from pipeline.data.rows import StreamedRows
from pipeline.engine.batch_schedule import BatchSchedule
from pipeline.engine.batchnorm import has_batchnorm
from pipeline.engine.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.engine.loop import (
    LoopState,
    NonFiniteError,
    PlannedStep,
    assert_finite_weights,
    train_epoch,
)
from pipeline.engine.models import build_model, model_spec
from pipeline.engine.noise import NoiseScale, attach_local_norm
from pipeline.engine.optim import build_optimizer
from pipeline.engine.schedule import lr_at, scale_lr
from pipeline.engine.step import (
    PeerError,
    agreed,
    all_reduce_sum,
    buffers_synced,
    contrastive_val_batches,
    evaluate,
    per_sample_loss,
    to_torch,
)
from pipeline.files import write_json
from pipeline.redact import redact_text
from pipeline.tracking import MetricLogger, keep_unsent


def data_outside_model(cfg: Config, spec: dict[str, Any], st: Any) -> str | None:
    """What of the rows a rank received the model, sized from the driver's checks, cannot take
    (the data changed since the checks), or None. Checked where the rank holds the column:
    labels always; feature width, token ids and targets when the table came whole (the object
    store mode; streamed ranks hold only the small columns).

    >>> from types import SimpleNamespace as NS
    >>> cfg = NS(train=NS(loss="cross_entropy"))
    >>> st = NS(labels=np.array([0, 4]), features=None, tokens=None, targets=None)
    >>> data_outside_model(cfg, {"num_outputs": 3}, st)
    'label 4, the model has 3 outputs'
    >>> data_outside_model(cfg, {"num_outputs": 10}, st) is None  # model.kwargs.num_outputs
    True
    """
    import pyarrow.compute as pc

    def top(a: Any) -> int | None:
        if a is None or not len(a):
            return None
        m = pc.max(pc.list_flatten(a)).as_py() if isinstance(a, (pa.Array, pa.ChunkedArray)) \
            else a.max()
        return None if m is None else int(m)

    def bottom(a: Any, ignore: int | None = None) -> int | None:  # a list column's least value
        if a is None or not len(a) or not isinstance(a, (pa.Array, pa.ChunkedArray)):
            return None
        values = pc.list_flatten(a)
        if ignore is not None:
            values = pc.filter(values, pc.not_equal(values, ignore))
        m = pc.min(values).as_py()
        return None if m is None else int(m)

    loss = cfg.train.loss
    if loss == "token_cross_entropy" and isinstance(st.targets, (pa.Array, pa.ChunkedArray)) \
            and isinstance(st.tokens, (pa.Array, pa.ChunkedArray)):
        if (i := first_misaligned(st.tokens, st.targets)) is not None:
            n_tok, n_tgt = (pc.list_value_length(a)[i].as_py() for a in (st.tokens, st.targets))
            def count(n: int | None, what: str) -> str:
                return f"{n} {what}(s)" if n is not None else f"a null list of {what}s"

            return (f"row {i} of the rows received: data.target_column={cfg.data.target_column!r} "
                    f"holds {count(n_tgt, 'target')} for {count(n_tok, 'token')} (one per token)")
    if (m := bottom(st.tokens)) is not None and m < 0:  # (the embedding's IndexError, retried)
        return f"token id {m}, token ids are >= 0"
    if loss == "token_cross_entropy" and (m := bottom(st.targets, IGNORE_INDEX)) is not None \
            and m < 0:
        return f"target token {m}, targets are >= 0 (or {IGNORE_INDEX}, ignored)"
    if loss == "cross_entropy" and (m := top(st.labels)) is not None and m >= spec["num_outputs"]:
        return f"label {m}, the model has {spec['num_outputs']} outputs"
    if loss == "token_cross_entropy" and (m := top(st.targets)) is not None \
            and m >= spec["num_outputs"]:
        return f"target token {m}, the model has {spec['num_outputs']} outputs"
    if spec.get("vocab_size") is not None and (m := top(st.tokens)) is not None \
            and m >= spec["vocab_size"]:
        return f"token id {m}, the model's vocabulary has {spec['vocab_size']}"
    if spec.get("input_dim") is not None and st.features is not None \
            and st.features.shape[1] != spec["input_dim"]:
        return f"{st.features.shape[1]} features, the model takes {spec['input_dim']}"
    return None


FATAL = "fatal_error"  # metric of a deterministic failure, reported instead of raised; rank 0
# writes the message to `loop_config["fatal_file"]` (under --out) for the driver


class Session:
    """Where the worker function runs, and what it needs from there: its rank, the world size,
    its device, the model made ready for them (DDP above one rank), the checkpoint to restart
    from, and the per-epoch report (metrics, and on rank 0 a checkpoint folder)."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, ddp_kwargs: dict[str, Any] | None
                      ) -> torch.nn.Module:
        raise NotImplementedError

    def restart_checkpoint(self) -> str | None:
        """The checkpoint this attempt restarts from after a failure (None: the first attempt)."""
        raise NotImplementedError

    def restart_checkpoint_read(self) -> None:
        """The restart checkpoint is loaded: a copy made of it for this attempt can go."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        raise NotImplementedError


class RayTrainSession(Session):
    """A Ray Train worker: Ray Train's rank, device, DDP wrapping and checkpoint storage."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module, ddp_kwargs: dict[str, Any] | None
                      ) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)

    def restart_checkpoint(self) -> str | None:
        ckpt = ray.train.get_checkpoint()  # what this rank's group last reported, after a restart
        if ckpt is None:
            return None
        self._copy = tempfile.mkdtemp(prefix="pipeline-restart-")  # (a copy every restart:
        try:  # removed once read, not left in /tmp -- nor when the copy fails: a full disk)
            return ckpt.to_directory(self._copy)
        except BaseException:
            self.restart_checkpoint_read()
            raise

    def restart_checkpoint_read(self) -> None:
        if getattr(self, "_copy", None):
            shutil.rmtree(self._copy, ignore_errors=True)
            self._copy = None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = (ray.train.Checkpoint.from_directory(checkpoint_dir)
                      if checkpoint_dir is not None else None)
        ray.train.report(metrics, checkpoint=checkpoint)  # a barrier over the ranks


def find_func(loop_config: dict[str, Any]) -> None:
    """`find-batch-size --on-workers` on each Ray Train worker: the search on this rank's
    device over the dataset's table from the object store (`pipeline.find_batch_size.search`;
    every rank tries the same sizes, agreeing on each by a MIN all-reduce), then rank 0's
    result -- or the input error the ranks met together (a model that cannot be built) --
    handed to the driver's box (an actor: nothing goes through Ray Train's storage, which
    a multi-node cluster needs shared for checkpoints)."""
    from pipeline.find_batch_size import search

    session = RayTrainSession()
    cfg = Config.model_validate(loop_config["config"])
    table, _, _ = load_rows(cfg, loop_config["table_refs"], session.rank, session.world)
    try:
        found: dict[str, Any] = {"result": search(
            cfg, loop_config["info"], loop_config["max_memory"], device=session.device,
            progress=session.rank == 0 and loop_config["progress"], table=table)}
    except ConfigError as err:
        found = {"error": str(err)}
    if session.rank == 0:
        ray.get(loop_config["box"].put.remote(found))


def train_func(loop_config: dict[str, Any], session: Session | None = None) -> None:
    """Train, or end at once on a deterministic failure (bad input, non-finite training):
    every rank meets it at the same point, reports `fatal_error` and returns, so Ray Train does
    not restart the worker group to meet it again; the driver turns it into the job's error.
    Anything else raises, and Ray Train restarts the group from the last checkpoint (up to
    `scaling.max_failures`): a lost node, and with it (streaming mode,
    `pipeline.blocks.DataLostError`) part of the dataset, which the restarted ranks find read
    again. `session`: where it runs (default: a Ray Train worker)."""
    session = session or RayTrainSession()
    try:
        _train(loop_config, session)
    except (ConfigError, NonFiniteError, PeerError) as err:  # bad input the driver could not
        # see (here, or on another rank: `PeerError`), or NaN
        if isinstance(err, PeerError) and not err.input_error:
            raise  # another rank failed otherwise: Ray Train restarts the group
        kind = "nonfinite" if isinstance(err, NonFiniteError) else "input"
        peer = isinstance(err, (PeerError, PeerInputError))
        message = f"data error: {err}" if isinstance(err, PeerError) else str(err)
        fatal_file, box = loop_config.get("fatal_file"), loop_config.get("fatal_box")
        record = {"kind": kind, "message": redact_text(message), "peer": peer}  # (in --out: masked)
        mine = session.rank == 0 or (kind == "input" and not peer)
        # rank 0 knows only that another rank met bad input: that rank's own line beside, for
        # the driver to name the culprit (where --out is on its node: else as told, below)
        if fatal_file and mine:  # (not written, a full disk say: told all the same)
            with contextlib.suppress(OSError):
                write_json(fatal_path(Path(fatal_file), session.rank), record)
        if box is not None and mine:  # the driver's node may not see this one's --out
            with contextlib.suppress(Exception):
                ray.get(box.put_item.remote(session.rank, record), timeout=10)
        session.report({FATAL: 1.0}, None)


def fatal_path(fatal_file: Path, rank: int) -> Path:
    """Where rank `rank` writes its deterministic failure: rank 0 `fatal.json`, another
    `fatal.rank<N>.json` beside it (`pipeline.launch.raise_fatal` reads them).

    >>> fatal_path(Path("out/fatal.json"), 0).name, fatal_path(Path("out/fatal.json"), 3).name
    ('fatal.json', 'fatal.rank3.json')
    """
    return fatal_file if rank == 0 else fatal_file.with_name(f"{fatal_file.stem}.rank{rank}.json")


def rank_fatal_files(fatal_file: Path) -> list[Path]:
    """The files `fatal_path` names for ranks other than 0 beside `fatal_file`, by rank."""
    found = [(int(m.group(1)), p) for p in fatal_file.parent.glob(f"{fatal_file.stem}.rank*.json")
             if (m := re.fullmatch(rf"{re.escape(fatal_file.stem)}\.rank(\d+)\.json", p.name))]
    return [p for _, p in sorted(found)]


class Validation:
    """A run's validation passes (`run(epoch)`, a collective: every rank takes each pass): within
    an epoch every `every` steps (train.eval_every), and at each epoch's end -- where the epoch
    ended at a step just validated, that pass's result (the same weights; every rank alike, as
    the steps are), not a second pass. None where there are no validation rows."""

    def __init__(self, run: Callable[[int], dict[str, float]], every: int | None, rows: int):
        self.run, self.every, self.rows = run, every, rows
        self.last: tuple[int, dict[str, float]] | None = None  # (step, result)

    def at_step(self, epoch: int, step: int) -> dict[str, float]:
        if self.every and step % self.every == 0 and self.rows:
            self.last = (step, self.run(epoch))
            return self.last[1]
        return {}

    def at_epoch_end(self, epoch: int, step: int) -> dict[str, float]:
        if not self.rows:
            return {}
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        return self.run(epoch)


def agreed_input_error(problem: ConfigError | None, device: torch.device,
                       failed_to: str | None = None) -> None:
    """Raise `problem` -- on every rank when any rank has one (a collective: every rank calls
    it): a rank without its own raises one naming the ranks that met bad input, or that
    `failed_to` do something (a config error, "could not build the model")."""
    try:
        agreed([], problem, True, device)
    except PeerError as err:
        if failed_to is None:
            raise PeerInputError(f"data error: {err}") from None
        raise PeerInputError(f"config error: {err.failed} other rank(s) of {err.world} "
                             f"{failed_to}; their error is in that worker's log") from None


class PeerInputError(ConfigError):
    """Bad input another rank met (`agreed_input_error`): this rank knows only that."""


def _train(loop_config: dict[str, Any], session: Session) -> None:
    cfg = Config.model_validate(loop_config["config"])
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    blocks = loop_config["table_refs"]  # pipeline.blocks.Blocks (or a list of block refs)
    problem: ConfigError | None = None
    try:
        st, streamed, pulled = load_rows(cfg, blocks, rank, world)
    except ConfigError as err:  # the table's own checks (pipeline.data.batches) name the culprit
        problem = err
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError, TypeError) as err:
        # The driver checked the data; it changed since, or a check missed it.
        problem = ConfigError(f"data error: {cfg.data.path or cfg.data.name}: {err}")
    spec = model_spec(cfg, loop_config["model_facts"])  # sized from what the checks found
    if problem is None and (outside := data_outside_model(cfg, spec, st)) is not None:
        problem = ConfigError(f"data error: {cfg.data.path or cfg.data.name}: changed since "
                              f"the checks: {outside}")
    # Each rank checked its own rows: all of them stop, or none (a rank that stopped alone
    # would leave the others waiting in DDP's first broadcast)
    agreed_input_error(problem, device)
    if streamed is not None:  # the large columns come a chunk at a time: each one checked

        def check(rows: Any) -> None:
            if (outside := data_outside_model(cfg, spec, rows)) is not None:
                raise ConfigError(f"data error: {cfg.data.path or cfg.data.name}: changed "
                                  f"since the checks: {outside}")

        streamed.check = check
    train_pos, val_pos = split_train_val(len(st), st.labels, cfg.data.val_fraction,
                                         cfg.data.split_seed)
    model, batchnorm, noise_probe = _prepare_model(cfg, spec, session)
    t = cfg.train
    optimizer = build_optimizer(t.optimizer, model, lr=t.base_lr, weight_decay=t.weight_decay,
                                momentum=t.momentum)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    G = t.global_batch_size
    # Epochs are planned in unit batches (the global batch, or train.batch_size_min under a
    # batch-size schedule, pipeline/engine/batch_schedule.py); a step takes k of them.
    unit = cfg.plan_batch_size()
    sched = BatchSchedule(kind=t.batch_size_schedule, unit=unit, max_units=G // unit,
                          ramp_steps=t.batch_size_warmup_steps or 0,
                          interval=t.batch_size_interval, step_cost=t.batch_size_step_cost)
    # The LR schedule's length from the plans themselves, in unit batches (= optimizer steps for
    # a constant batch): curriculum, balanced, hard-mining and token-budget epochs have their own
    # counts (pure and cheap: no gather, no shuffle). max_steps caps optimizer steps, which are
    # units only for a constant batch.
    try:
        total_units, warmup = lr_schedule(cfg, steps_per_epoch(cfg, st, train_pos, world))
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None

    def lr_for(units_done: int, batch: int) -> float:
        """The LR after `units_done` unit batches, for a step of `batch` samples: the LR
        scaling rule at that batch (re-scaled whenever the batch changes), the schedule's shape
        over samples."""
        return lr_at(units_done, base_lr=t.base_lr,
                     peak_lr=scale_lr(t.base_lr, t.base_batch_size, batch, t.lr_scaling),
                     warmup_steps=warmup, total_steps=total_units, schedule=t.schedule)

    per_worker = G // world
    state = LoopState(micro_batch_size=t.micro_batch_size
                      if isinstance(t.micro_batch_size, int) else per_worker,
                      noise=NoiseScale(beta=t.noise_scale_ema) if t.noise_scale else None)
    sample_losses: np.ndarray | None = None
    restarted = session.restart_checkpoint()  # Ray Train restarted the group after a failure
    resume_dir = restarted or loop_config.get("resume_from")
    s = None
    try:
        if resume_dir is not None:
            try:
                s = load_checkpoint(resume_dir, map_location=device)
            except CheckpointError as err:  # damaged since written: an older one, or none
                s = _older_checkpoint(err, loop_config, device, rank)
    finally:
        if restarted:
            session.restart_checkpoint_read()
    if s is not None:
        sample_losses = _restore(s, model, optimizer, scaler, sched, state,
                                 auto_micro=t.micro_batch_size == "auto", per_worker=per_worker,
                                 world=world)
        if restarted and rank == 0:
            console.say(f"restarted after a failure: from the checkpoint of epoch {state.epoch} "
                        f"(step {state.step})")
    agree_on_restored(state.step, state.epoch, device)
    b = cfg.batching
    # this rank's batches: the same feed inspect-batches records (pipeline/data/feed.py)
    feed = RankFeed(cfg, st, train_pos, rank, world,
                    image_shape=image_shape(spec["name"]),
                    streamed=streamed)

    def step_batches(step: FeedStep, key: tuple[int, ...], pad_stats: dict[str, int]) -> Any:
        """This rank's share of one global batch, cut into micro-batches on demand (the size
        can shrink on out-of-memory)."""

        counted = {"real": 0, "padded": 0}  # this step's tokens, as last built

        def micro(size: int) -> list[dict[str, torch.Tensor]]:
            out, real, padded = [], 0, 0
            for part in step.micro(size):
                nb = feed.collate(part, key, step.rows)
                if "attention_mask" in nb:
                    real += int(nb["attention_mask"].sum())
                    padded += int(nb["attention_mask"].size)
                out.append(to_torch(nb, device))
            # built again after an out-of-memory: the tokens count once, as the attempt that
            # trained built them
            for k, v in (("real", real), ("padded", padded)):
                pad_stats[k] += v - counted[k]
                counted[k] = v
            return out

        return micro

    agree = partial(mean_over_ranks, world=world, device=device)

    def next_units() -> int:
        """k for the next step; every change is said (rank 0) and logged as a curve."""
        before, cost = sched.units, sched.step_cost
        phi = state.noise.value if state.noise is not None else math.nan
        k = sched.next_units(state.step, phi / state.elements_per_sample, agree)
        now = sched.step_cost
        if rank == 0 and sched.measured and now is not None and (
                cost is None or not cost / 1.5 <= now <= cost * 1.5):  # first, or moved by 1.5x
            console.say(f"batch size: a step costs as much as {now:.0f} samples (measured: "
                        f"T(M) = a + b M over the last {len(sched.timings)} steps)" if math.isfinite(now)
                        else f"batch size: a step takes no longer at a larger batch over the last "
                        f"{len(sched.timings)} steps (a fixed cost dominates): the largest has "
                        "the best goodput")
        if rank == 0 and k != before and sched.kind == "adaptive":
            console.say(f"batch size {before * unit} -> {k * unit} at step {state.step + 1} "
                        f"(noise scale {sched.phi:.0f} samples)")  # (the ranks' mean)
        return k

    # The job's fixed cost: from its start (the driver's run_training, or the sweep trial's
    # function) to this attempt's first optimizer step; after a restart it includes the failure.
    started_at = float(loop_config.get("started_at") or time.time())
    first_step: list[float] = []

    def planned(steps: Iterator[FeedStep], epoch: int, pad_stats: dict[str, int]) -> Any:
        """The epoch's steps: k unit batches each, this rank's rows, the LR for that batch --
        the batch as planned, k x the unit batch: a short last batch (`drop_last: false`) and
        a token budget's steps (whose sample counts vary) train at the configured batch's LR."""
        for step in steps:
            if not first_step:
                first_step.append(time.time())
            yield PlannedStep(step_batches(step, (b.seed, epoch, 0), pad_stats),
                              lr=lr_for(state.units, step.units * unit),
                              batch_size=len(step.batch), units=step.units)

    my_val = rank_slice(val_pos, rank, world)

    def eval_batches(epoch: int) -> Any:
        """This rank's validation micro-batches (contrastive views keyed by (seed, epoch, 1)):
        of the training micro-batch's size, which is known to fit (a sum over samples does not
        depend on the split). NT-Xent's loss depends on its batch: fixed validation batches,
        the same for any worker count and global batch (`contrastive_val_batches`), each a
        list of its micro-batches."""
        key = (b.seed, epoch, 1)
        if t.loss != "nt_xent":
            return (to_torch(feed.collate(p, key, rows), device)
                    for p, rows in feed.over(micro_slices(my_val, state.micro_batch_size)))
        batches = contrastive_val_batches(val_pos, rank, world, state.micro_batch_size)
        parts = feed.over([p for batch in batches for p in batch])
        return ([to_torch(feed.collate(p, key, rows), device)
                 for p, rows in itertools.islice(parts, len(batch))] for batch in batches)

    validation = Validation(lambda epoch: evaluate(
        model, eval_batches(epoch), loss=t.loss, precision=t.precision,
        input_errors=(ConfigError,)), t.eval_every, len(val_pos))

    data_meter = _DataMeter(streamed, pulled)
    steps_log: list[tuple[int, dict[str, float], float]] = []  # (step, record, when)
    logger = _metric_logger(loop_config) if rank == 0 else None
    try:  # (from the logger's start: a failure closes its sending thread)
        if logger is not None:
            logger.mark_relogged_epochs_soon(state.epoch)
        _log_placement(logger, world)
        for epoch in range(state.epoch, t.epochs):
            state.epoch = epoch
            if t.max_steps is not None and state.step >= t.max_steps:
                break
            eb, steps = feed.epoch(epoch, next_units, sample_losses,
                                   guess=lambda n, first=state.step: sched.planned(first + n))
            agree_on_plan(eb.batches, epoch, device)
            if rank == 0 and eb.plan.note:
                console.say(eb.plan.note)
            plan, batches, dropped = eb.plan, eb.batches, eb.dropped
            pad_stats = {"real": 0, "padded": 0}

            steps_log = []  # this epoch's, logged with it
            samples_before, units_before = state.samples, state.units
            bar = None  # a progress bar within the epoch, drawn on the driver's terminal
            if rank == 0 and loop_config.get("progress_bar"):
                from ray.experimental.tqdm_ray import tqdm

                bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{t.epochs}",
                           unit="step" if unit == G else "unit batch")
            try:
                metrics = train_epoch(
                    model, optimizer,
                    planned(steps, epoch, pad_stats), state, loss=t.loss, precision=t.precision,
                    scaler=scaler, grad_clip=t.grad_clip, auto_micro=t.micro_batch_size == "auto",
                    max_steps=t.max_steps,
                    on_step=partial(_record_step, steps_log, bar, sched, units_before,
                                    partial(validation.at_step, epoch)), seed=t.seed, rank=rank,
                    nonfinite=t.nonfinite, nonfinite_limit=t.nonfinite_limit,
                    noise_probe=noise_probe, on_event=console.say if rank == 0 else None,
                    input_errors=(ConfigError,))
            finally:  # a train.max_steps cut (or an error) leaves the steps mid-epoch: the rows
                steps.close()  # they fetched ahead are let go now, not held through validation
                if bar is not None:  # (an error's too: no stale bar on the driver's console)
                    bar.close()
            wall = metrics["epoch_time_s"]  # training time: without validation (on_step)
            metrics.update(validation.at_epoch_end(epoch, state.step))
            if b.strategy == "hard_mining":
                # in micro-batches of the size known to fit, as validation takes them
                sample_losses = _score_pool(model, feed, len(st), state.micro_batch_size, cfg,
                                            device)
                pool_losses = sample_losses[train_pos]
                metrics.update({"hard_mining/loss_mean": float(pool_losses.mean()),
                                "hard_mining/loss_p90": float(np.quantile(pool_losses, 0.9))})
            trained = state.samples - samples_before
            metrics.update({
                "epoch": epoch + 1, "step": state.step, "samples_per_s": trained / wall,
                "epoch_time_s": wall, "dropped": float(dropped), "pool_size": float(plan.pool_size),
                "skipped_steps": float(state.skipped_steps),
                "nonfinite_steps": float(state.nonfinite_steps),
                # the batch as planned (a schedule's last k; a short last batch or a token
                # budget's sample counts are in `samples` and the step curves)
                "global_batch_size": float(sched.units * unit if sched.kind != "constant" else G),
                "samples": float(state.samples),
                "micro_batch_size": float(state.micro_batch_size),
            })
            if first_step:
                # (the driver's clock against this worker's: clocks apart never below 0)
                metrics["startup_s"] = max(0.0, first_step[0] - started_at)
            if sched.kind == "adaptive" and sched.step_cost is not None and math.isfinite(
                    sched.step_cost):  # c as used (set or fitted; inf: said on the console)
                metrics["batch_size_step_cost"] = float(sched.step_cost)
            metrics.update(data_meter.epoch_metrics())
            if batchnorm:  # micro-batching is Ghost BatchNorm: the rows each BN normalises over
                metrics["ghost_batch_size"] = float(ghost_batch_size(
                    state.micro_batch_size, world, cfg.train.sync_batchnorm))
            if cfg.data.sequence_column is not None:  # every rank: the sums are all-reduced
                real, padded = all_reduce_sum([float(pad_stats["real"]),
                                               float(pad_stats["padded"])], device)
                if padded:  # over every rank's batches (their token counts differ)
                    metrics["padding_efficiency"] = real / padded
                    metrics["tokens_per_s"] = real / wall
            if scaler is not None:
                metrics["loss_scale"] = float(scaler.get_scale())
            if logger is not None:
                _log_steps(logger, steps_log)
                steps_log = []  # logged (not again should the epoch's end stop the run)
                logger.add({k: v for k, v in metrics.items()
                            if k != "epoch" and math.isfinite(v)}, epoch + 1)
                logger.flush(wait_s=10.0)  # an outage of the store waits at most this long
            _report(metrics, model, optimizer, scaler, state, spec, sample_losses, session, sched)
    except BaseException as err:
        # stopped (Tune stops a trial inside its report, Ctrl-C) or failed: the epochs done
        # were flushed; the sending thread is not left behind (in a Tune actor it would be
        # one per stopped trial)
        if logger is not None:
            if isinstance(err, NonFiniteError):  # never run again: its epoch's steps up to
                _log_steps(logger, steps_log)  # the divergence are what explains it
            logger.close(timeout_s=2.0, give_up=True)
            # (the store away): the epochs done are not trained again after a restart or a
            # --resume; their points are sent from the file (pipeline.launch), not lost with
            # this attempt
            _keep_unsent(logger, loop_config)  # (its own failure said: this error is raised)
        raise
    if logger is not None:
        wait_s = float(loop_config.get("tracking_close_s", 120.0))
        if logger.pending() and logger.unreachable:  # a wait worth saying: it can be minutes
            console.say(f"MLflow: the store does not answer; waiting up to {wait_s:.0f} s to send "
                        f"the last {logger.pending()} metric point(s) (else they are kept)")
        logger.close(timeout_s=wait_s, give_up=True)
        if unsent := _keep_unsent(logger, loop_config):
            console.say(f"MLflow: {unsent} metric point(s) could not be sent "
                        f"(the store was unreachable at the end of training)")


def _keep_unsent(logger: MetricLogger, loop_config: dict[str, Any]) -> int:
    """The points a closed logger could not send, kept in the job's tracking.json
    (`keep_unsent`); their count (with those dropped), 0 where there is no file to keep them
    or keeping them failed (a full disk: said here, never raised -- after a failure its error
    is the one raised, after the last report Ray Train would restart a finished run)."""
    points = logger.unsent_points()  # (one snapshot: the count is of these, and dropped)
    unsent = len(points) + logger.dropped
    if not unsent or not loop_config.get("tracking_file"):
        return 0
    try:
        keep_unsent(loop_config["tracking_file"], unsent, points, logger.run_id,
                    loop_config.get("tracking_uri"))
    except Exception as err:
        console.say(f"MLflow: {logger.pending() + logger.dropped} metric point(s) not sent "
                    f"and not kept ({console.error_line(err)})")
        return 0
    return unsent


def _prepare_model(cfg: Config, spec: dict[str, Any], session: Session
                   ) -> tuple[torch.nn.Module, bool, Any]:
    """The model as this rank trains it (SyncBatchNorm, DDP), whether it has BatchNorm, and the
    noise scale's probe of this rank's own gradient (None where there is none)."""
    world = session.world
    problem: ConfigError | None = None
    try:
        model = build_model(**spec)
    except Exception as err:  # a model that cannot take this data, an import that fails, a
        # user builder's bug: built from the config alone, it would fail the same way again
        problem = ConfigError(f"config error: model.name={cfg.model.name}: "
                              f"{type(err).__name__}: {err}")
    # All ranks stop, or none: a build that fails on one rank only (a module missing from one
    # node's image) left the others waiting in DDP's first broadcast until its timeout.
    agreed_input_error(problem, session.device,
                       failed_to=f"could not build model.name={cfg.model.name}")
    batchnorm = has_batchnorm(model)
    if batchnorm and cfg.train.micro_batch_size == "auto" and not cfg.train.auto_micro_batchnorm:
        raise ConfigError(f"config error: {auto_micro_batchnorm_refusal(cfg.model.name)}")
    if cfg.train.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # micro_batch_size=auto with several workers: no collective inside forward or backward, so
    # an out-of-memory on one rank never strands the others (pipeline/engine/step.py, agree_oom);
    # the step broadcasts rank 0's buffers itself.
    agree_oom = cfg.train.micro_batch_size == "auto" and world > 1
    model = session.prepare_model(model, _no_buffer_broadcast() if agree_oom else None)
    # The noise scale's small batch with several workers: each rank's own gradient, read by a
    # DDP communication hook just before the all-reduce (pipeline/engine/noise.py).
    # (not under nt_xent: its step measures no noise scale, and the hook would cost every step)
    noise_probe = (attach_local_norm(model) if cfg.train.noise_scale and world > 1 and not agree_oom
                   and cfg.train.loss != "nt_xent"
                   and isinstance(model, torch.nn.parallel.DistributedDataParallel) else None)
    return model, batchnorm, noise_probe


def _no_buffer_broadcast() -> dict[str, bool]:
    """DDP's keyword for "no buffer broadcast in forward": `forward_sync_buffers` from PyTorch
    2.13 (which deprecates `broadcast_buffers`), `broadcast_buffers` before it (the project
    takes torch >= 2.4: the newer keyword there was a TypeError on every rank).

    >>> _no_buffer_broadcast() in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})
    True
    """
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


class _DataMeter:
    """What this rank received of the data and waited for it, epoch by epoch: its streamed rows
    (streaming mode), or the blocks its node pulled (object-store mode, first epoch); and its
    peak resident memory."""

    def __init__(self, streamed: StreamedRows | None, pulled: int) -> None:
        self.streamed, self.pulled = streamed, pulled
        self.fetched = self.waited = 0.0

    def epoch_metrics(self) -> dict[str, float]:
        s = self.streamed
        fetched = s.fetched_bytes if s is not None else self.pulled
        waited = s.wait_s if s is not None else 0.0  # the steps and validation waiting (streaming)
        out = {"data_fetched_mib": (fetched - self.fetched) / 2**20,
               "data_wait_s": waited - self.waited,
               # (ru_maxrss: KiB on Linux, bytes on macOS)
               "worker_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               / (2**20 if sys.platform == "darwin" else 1024)}
        self.fetched, self.waited = fetched, waited
        return out


def _metric_logger(loop_config: dict[str, Any]) -> MetricLogger:
    """Rank 0's logger; when the job started without its tracking server, it asks the driver's
    DeferredRun actor for the run, which exists once the server is back."""
    pending = loop_config.get("pending_run")
    source = None if pending is None else (lambda: ray.get(pending.run_id.remote(), timeout=30))
    return MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], run_id_source=source)


def _log_steps(logger: MetricLogger, steps_log: list[tuple[int, dict[str, float], float]]
               ) -> None:
    """An epoch's per-step records as `step/*` curves, at the time each step ran."""
    for step, rec, at in steps_log:
        logger.add({f"step/{k}": v for k, v in rec.items() if math.isfinite(v)}, step, at)


def _record_step(log: list[tuple[int, dict[str, float], float]], bar: Any, sched: BatchSchedule,
                 units_before: int, validate: Any, state: LoopState,
                 record: dict[str, float]) -> None:
    record.update(validate(state.step))
    log.append((state.step, record, time.time()))
    sched.observe(int(record["global_batch_size"]), record["step_time_s"])
    if bar is not None:
        bar.update(state.units - units_before - bar.n)  # the bar counts unit batches


def _spread(values: list[int], device: torch.device) -> list[tuple[int, int]]:
    """(lowest, highest) over the ranks of each int64 value, in one all-reduce (a collective):
    MAX of each value and of its negation."""
    t = torch.tensor([v for x in values for v in (x, -x)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [(-int(t[2 * i + 1]), int(t[2 * i])) for i in range(len(values))]


def agree_on_restored(step: int, epoch: int, device: torch.device) -> None:
    """Every rank starts from the same point (`step`, and `epoch`: the epochs done, as the
    console's "checkpoint of epoch N"); a collective: every rank calls it. Each rank
    loads its own copy of the checkpoint and falls back alone to an older one when its copy
    fails to load (a read error on its node, an out-of-memory mapping it to the GPU): ranks at
    different steps would run different numbers of steps and collectives, and hang. Then every
    rank raises (not bad input: Ray Train's restart reads them again)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    (low_step, top_step), (low_epoch, top_epoch) = _spread([step, epoch], device)
    if (top_step, top_epoch) != (low_step, low_epoch):
        raise RuntimeError(f"the ranks restored different checkpoints: steps {low_step} to "
                           f"{top_step}, after epoch {low_epoch} to {top_epoch} (this rank: "
                           f"step {step}); none trains from a point the others do not share")


def agree_on_plan(batches: list[np.ndarray], epoch: int, device: torch.device) -> None:
    """Every rank planned the same global batches for the epoch (a collective: every rank calls
    it). Each rank plans the epoch itself from the same data, seed and epoch, so the plans
    agree -- unless the ranks' libraries differ (NumPy's generators; SciPy's HiGHS, which lays
    out stratified batches, on nodes of different images): each rank would then take its slice
    of another plan, training some samples twice and others never, without a word. A 62-bit
    digest of the plan, compared in one all-reduce an epoch; a mismatch is no transient
    failure (a restart plans the same again), so it ends the job as bad input does."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    import hashlib

    sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
    flat = np.concatenate(batches).astype(np.int64, copy=False) if batches else sizes
    digest = hashlib.blake2b(sizes.tobytes() + flat.tobytes(), digest_size=8).digest()
    d = int.from_bytes(digest, "little") >> 2  # (its negation fits an int64 too)
    [(low, top)] = _spread([d], device)
    if low != top:
        import scipy

        raise ConfigError(f"environment error: the ranks planned different batches for epoch "
                          f"{epoch + 1} from the same data and seed: the nodes' NumPy and SciPy "
                          f"versions must agree (this rank: NumPy {np.__version__}, SciPy "
                          f"{scipy.__version__})")


def _older_checkpoint(err: CheckpointError, loop_config: dict[str, Any], device: torch.device,
                      rank: int) -> dict[str, Any] | None:
    """The checkpoint Ray Train restarts the group from is damaged: the newest intact one under
    the job's storage instead, or none (a start from scratch). Every rank reads the same files,
    so all of them choose alike; the pipeline is deterministic, so the run ends the same."""
    found = find_latest_checkpoint(loop_config["storage"]) if loop_config.get("storage") else None
    if rank == 0:
        console.say(f"{err}: restarting from {found or 'the start'}")
    return load_checkpoint(found, map_location=device) if found is not None else None


def _log_placement(logger: MetricLogger | None, world: int) -> None:
    """Which Ray node each rank runs on, as run tags (`ray.worker_nodes`: node ids in rank
    order; `ray.num_nodes`): every rank sends its node id, rank 0 logs them."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * world
    if world > 1 and dist.is_initialized():
        dist.all_gather_object(nodes, node)
    if logger is not None:
        logger.set_tags({"ray.worker_nodes": ",".join(nodes),
                         "ray.num_nodes": str(len(set(nodes)))})


def _restore(s: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Any, sched: BatchSchedule, state: LoopState, auto_micro: bool = False,
             per_worker: int = 0, world: int = 1) -> np.ndarray | None:
    """Put a checkpoint's training state back (`_report` writes it): the weights, optimizer and
    scaler, the counters, the batch schedule's k's, the noise scale's averages and, under
    `micro_batch_size: auto`, the micro-batch size an out-of-memory left (at most this run's
    `per_worker` share: a resume may have more workers; none left: this run's share); a fixed
    or `null` micro-batch is the config's, on this run's workers. Return hard mining's
    per-sample losses, if it kept them."""
    _unwrap(model).load_state_dict(s["model"])
    optimizer.load_state_dict(s["optimizer"])
    if scaler is not None and s.get("scaler"):
        scaler.load_state_dict(s["scaler"])
    state.step, state.epoch = int(s["step"]), int(s["epoch"]) + 1
    state.units = int(s.get("units", state.step))
    state.samples = int(s.get("samples", 0))
    state.batch_size = int(s.get("batch_size", 0))
    state.elements_per_sample = float(s.get("elements_per_sample", 1.0))
    if s.get("batch_schedule"):
        configured = sched.step_cost  # (this run's config: the throughput file's for its workers)
        sched.load_state_dict(s["batch_schedule"])
        if not sched.measured:
            sched.step_cost = configured
        was = int(s["batch_schedule"].get("world", world))
        if was != world and sched.measured and sched.step_cost is not None:
            # a resume on another worker count: its steps take other times, and a worker steps
            # M / W samples (T = a + b M / W: c = W x a worker's own), as the finder's file says
            sched.step_cost = sched.step_cost * world / was
            sched.timings = []
    state.skipped_steps = int(s.get("skipped_steps", 0))
    state.nonfinite_steps = int(s.get("nonfinite_steps", 0))
    if state.noise is not None and s.get("noise"):
        state.noise.load_state_dict(s["noise"], per_sample=state.elements_per_sample,
                                    batch_size=state.batch_size)
    if auto_micro and s.get("micro_batch_size") and per_worker:
        saved = int(s["micro_batch_size"])
        # `auto` starts at a worker's share and halves on an out-of-memory: a size below the
        # share of the workers it was saved on (G / W_old) is a shrink, kept (at most this
        # run's share); the whole share is this run's share (fewer workers: a larger one --
        # the old share kept accumulation and its cost for no memory reason)
        was = int((s.get("batch_schedule") or {}).get("world", world))
        shrunk = saved < per_worker * world // was
        state.micro_batch_size = min(saved, per_worker) if shrunk else per_worker
    return s.get("sample_losses")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _score_pool(model: torch.nn.Module, feed: RankFeed, n: int, batch: int, cfg: Config,
                device: torch.device) -> np.ndarray:
    """Per-sample training losses (hard-example mining): the pool cut into chunks of `batch`
    in pool order, dealt to the ranks in turn; an all-reduce gives every rank the full vector,
    indexed by table position. A chunk is the same whatever the worker count, so with a
    configured `train.micro_batch_size` each sample's loss comes from the same forward on 1 or
    N workers (as a rank's contiguous share it came from other batches, whose padding and
    rounding differ: the rank-based sampling turns 1e-6 of relative difference into other
    draws)."""
    import torch.distributed as dist

    losses = torch.zeros(n, dtype=torch.float64, device=device)
    model.eval()
    buffers_synced(model)  # no collective in the forwards: a rank failing among them ...
    mine = micro_slices(feed.train_pos, batch)[feed.rank::feed.world]
    error: Exception | None = None
    try:
        for part, rows in feed.over(mine):
            nb = to_torch(rows.gather(part, max_length=cfg.batching.max_length), device)
            per = per_sample_loss(model(nb), nb, cfg.train.loss)
            losses[torch.as_tensor(part, device=device)] = per.double()
    except Exception as err:
        error = err
    agreed([], error, isinstance(error, ConfigError), device)  # ... fails every rank here
    if dist.is_initialized() and feed.world > 1:
        dist.all_reduce(losses)
    return losses.cpu().numpy()


def mean_over_ranks(values: list[float], world: int, device: torch.device) -> list[float]:
    """Each value's mean over the ranks (a collective: every rank calls it)."""
    return [v / world for v in all_reduce_sum(values, device)] if world > 1 else list(values)


def agreed_schedule_state(sched: BatchSchedule, world: int, device: torch.device
                          ) -> dict[str, Any]:
    """The batch-size schedule's state as a checkpoint keeps it (a collective: every rank calls
    it), its step times the mean over the ranks: each rank times its own steps and a decision
    fits the mean (`agree`), so a restart that gave every rank rank 0's own times fitted
    another step cost, and chose other k's, than the run it continues. The worker count is
    kept beside them: a resume on another (`_restore`) does not fit its steps with these."""
    state = {**sched.state_dict(), "world": world}
    if world > 1 and state["timings"]:
        sizes = [m for m, _ in state["timings"]]
        seconds = mean_over_ranks([s for _, s in state["timings"]], world, device)
        state["timings"] = list(zip(sizes, seconds, strict=True))
    return state


def _report(metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, state: LoopState, spec: dict[str, Any], sample_losses: np.ndarray | None,
            session: Session, sched: BatchSchedule) -> None:
    """One checkpoint per epoch: rank 0 writes it, every rank reports (report is a barrier).
    Weights that are not finite are never written. Every rank checks its own and they agree
    (one all-reduce): DDP keeps the parameters equal, but a rank's BatchNorm running
    statistics are its own batch's since the last broadcast, so one rank alone may hold a
    non-finite buffer -- it would stop alone and leave the others waiting."""
    where = f"at the end of epoch {state.epoch + 1}"
    own: NonFiniteError | None = None
    try:
        assert_finite_weights(_unwrap(model), where)
    except NonFiniteError as err:
        own = err
    (bad,) = all_reduce_sum([float(own is not None)], next(model.parameters()).device)
    if own is not None:
        raise own
    if bad:
        raise NonFiniteError(f"non-finite weights or buffers on {int(bad)} other rank(s) {where};"
                             " no checkpoint written")
    schedule = agreed_schedule_state(sched, session.world, next(model.parameters()).device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if session.rank == 0:
            save_checkpoint(tmp, {
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": state.step, "epoch": state.epoch, "skipped_steps": state.skipped_steps,
                "nonfinite_steps": state.nonfinite_steps,
                "noise": state.noise.state_dict() if state.noise is not None else None,
                "micro_batch_size": state.micro_batch_size, "model_spec": spec,
                "units": state.units, "samples": state.samples, "batch_size": state.batch_size,
                # the adaptive schedule's first decision after a resume reads the noise scale
                # (in loss elements) in samples with it, before a step has measured it again
                "elements_per_sample": state.elements_per_sample,
                "batch_schedule": schedule,
                "sample_losses": sample_losses, "metrics": metrics,
            })
            checkpoint = tmp
        session.report(metrics, checkpoint)
