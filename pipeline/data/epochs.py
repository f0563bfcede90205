"""The batches of one epoch as a training job sees them (pure numpy; shared by the Ray Train
worker and `inspect-batches`, so what is inspected is exactly what is trained)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import Config
from pipeline.data import strategies as _strategies  # noqa: F401  (registers the planners)
from pipeline.data.batches import SampleTable
from pipeline.data.padding import round_up
from pipeline.data.plan import EpochPlan, SampleMeta, count_epoch, plan_epoch


@dataclass(frozen=True)
class EpochBatches:
    plan: EpochPlan
    batches: list[np.ndarray]  # the plan's global batches, every one trained (a rank's share
    # of a batch smaller than the workers may be empty)
    dropped: int  # samples the plan dropped (drop_last, a strategy's own drops)


def default_pacing_epochs(epochs: int) -> int:
    """A curriculum's `batching.options.pacing_epochs` when the config leaves it out: the pool
    is whole by half the run."""
    return max(1, epochs // 2)


def planner_options(cfg: Config) -> dict[str, Any]:
    opts = {k: v for k, v in cfg.batching.options.items() if k != "difficulty"}
    if cfg.batching.strategy == "curriculum" and opts.get("pacing_epochs") is None:
        opts["pacing_epochs"] = default_pacing_epochs(cfg.train.epochs)
    return opts


def with_pacing(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with a curriculum's pacing_epochs written out (the default, from its own
    train.epochs, where it has none); others as they are."""
    b = config.get("batching") or {}
    options = b.get("options") or {}
    if b.get("strategy") != "curriculum" or options.get("pacing_epochs") is not None:
        return config
    epochs = (config.get("train") or {}).get("epochs", Config().train.epochs)
    return {**config, "batching": {**b, "options": {
        **options, "pacing_epochs": float(default_pacing_epochs(epochs))}}}


def keep_pacing(cfg: Config, started: dict[str, Any]) -> Config:
    """`cfg` for a resume of the run that started with the config `started` (a dict): a
    curriculum keeps the pacing it started with. A resume may change train.epochs, which the
    default pacing_epochs follows; the pool would then widen on another schedule from the
    epoch the run resumes at (and shrink, were it whole already). Compare the result with
    `with_pacing(started)`.

    >>> from pipeline.config import load_config
    >>> first = load_config(None, ["batching.strategy=curriculum", "train.epochs=4"])
    >>> keep_pacing(first.with_overrides({"train.epochs": 8}), first.to_dict()).batching.options
    {'pacing_epochs': 2.0}
    """
    if cfg.batching.strategy != "curriculum" or cfg.batching.options.get("pacing_epochs") is not None:
        return cfg
    pacing = (with_pacing(started).get("batching") or {}).get("options", {}).get("pacing_epochs")
    return cfg if pacing is None else cfg.with_overrides({"batching.options.pacing_epochs": pacing})


def truncated_lengths(cfg: Config, lengths: np.ndarray) -> np.ndarray:
    """The tokens a sample keeps in a batch: its length cut at `batching.max_length`."""
    m = cfg.batching.max_length
    return np.minimum(lengths, m) if m else np.asarray(lengths)


def planned_lengths(cfg: Config, lengths: np.ndarray) -> np.ndarray:
    """The lengths the planners see: what a sample takes in a collated batch -- truncated to
    `batching.max_length`, and (padded batches) rounded up to `batching.pad_multiple_of`, so
    that a token budget (`max_tokens`: samples x the longest) counts the slots the collate
    makes, and length buckets group what pads alike.

    >>> from pipeline.config import load_config
    >>> cfg = load_config(None, ["batching.max_length=128", "batching.pad_multiple_of=16"])
    >>> planned_lengths(cfg, np.array([1, 16, 17, 2000])).tolist()
    [16, 16, 32, 128]
    """
    b = cfg.batching
    out = truncated_lengths(cfg, lengths)
    return out if b.packing else round_up(out, b.pad_multiple_of)


def pool_meta(cfg: Config, st: SampleTable, train_pos: np.ndarray,
              sample_losses: np.ndarray | None) -> SampleMeta:
    """Planner input, lengths as `planned_lengths`. Curriculum difficulty:
    `batching.difficulty_column`, else a scoring pass named by `batching.options.difficulty`
    (`length`: longer sequences -- as trained, truncated -- are harder)."""
    meta = st.meta(train_pos, sample_losses)
    if meta.lengths is None:
        if meta.difficulty is None and cfg.batching.options.get("difficulty") == "length":
            raise ValueError("batching.options.difficulty=length needs a sequence column")
        return meta
    difficulty = meta.difficulty
    if difficulty is None and cfg.batching.options.get("difficulty") == "length":
        difficulty = truncated_lengths(cfg, meta.lengths).astype(np.float64)
    return SampleMeta(ids=meta.ids, labels=meta.labels,
                      lengths=planned_lengths(cfg, meta.lengths), difficulty=difficulty,
                      weights=meta.weights)


def epoch_batches(cfg: Config, st: SampleTable, train_pos: np.ndarray, epoch: int,
                  world_size: int, sample_losses: np.ndarray | None = None) -> EpochBatches:
    """The epoch's global batches. `world_size` is not used (the batches never depend on the
    worker count; a batch smaller than the workers leaves some ranks an empty share); kept
    for its callers."""
    b = cfg.batching
    plan = plan_epoch(b.strategy, pool_meta(cfg, st, train_pos, sample_losses), seed=b.seed,
                      epoch=epoch, global_batch_size=cfg.plan_batch_size(),
                      drop_last=b.drop_last, **planner_options(cfg))
    # Every batch is trained, whatever the worker count: a last batch with fewer samples than
    # workers leaves some ranks an empty share (an empty micro-batch; see step.train_step).
    return EpochBatches(plan=plan, batches=list(plan.batches), dropped=plan.dropped)


def units_at_most(cfg: Config) -> int | None:
    """The unit batches (`cfg.plan_batch_size()`) ``train.max_steps`` steps take at most (a step
    takes up to global_batch_size // unit of them), or None without max_steps."""
    t = cfg.train
    if t.max_steps is None:
        return None
    return t.max_steps * (t.global_batch_size // cfg.plan_batch_size())


def epoch_sizes(cfg: Config, st: SampleTable, train_pos: np.ndarray) -> list[np.ndarray]:
    """The sizes of the global batches each epoch of ``cfg.train.epochs`` trains, in order (the
    batches of `epoch_batches(...)`; under a batch-size schedule its unit batches,
    `cfg.plan_batch_size()`), counted from the strategy's counter (no shuffle, no gather; a
    token-budget plan is planned). Hard mining draws N samples whatever the losses, so its
    count needs none. Only the epochs the run reaches (and those of the LR warmup): where
    ``train.max_steps`` ends it before ``train.epochs`` (a step takes K unit batches at most),
    the epochs after are not counted (a million epochs bounded by max_steps took minutes to
    count here and on every worker).

    Raises ValueError naming the epoch and the numbers when an epoch would train no step (a pool
    smaller than one global batch with drop_last, ``epoch_samples`` < the batch...).
    """
    b, t = cfg.batching, cfg.train
    meta = pool_meta(cfg, st, train_pos, None)
    batch_key = ("train.global_batch_size" if t.batch_size_schedule == "constant"
                 else "train.batch_size_min")
    epochs = []
    most = units_at_most(cfg)
    counted = 0
    for epoch in range(t.epochs):
        # past `most` (not at it: the checks compare max_steps with a run longer than it) and
        # the LR warmup's epochs, counted to be placed
        if most is not None and counted > most and epoch >= t.warmup_epochs:
            break
        count = count_epoch(b.strategy, meta, seed=b.seed, epoch=epoch,
                            global_batch_size=cfg.plan_batch_size(), drop_last=b.drop_last,
                            **planner_options(cfg))
        sizes = count.sizes[count.sizes > 0]  # epoch_batches trains these
        if not len(sizes):
            why = f"batching.drop_last={b.drop_last}"
            if b.strategy == "balanced":  # (which ignores drop_last)
                drawn = b.options.get("epoch_samples")
                why = (f"batching.options.epoch_samples={drawn} draws fewer" if drawn is not None
                       else "balanced draws as many samples as the pool holds")
            raise ValueError(
                f"epoch {epoch + 1} of {t.epochs} would train no step: batching.strategy="
                f"{b.strategy} makes no global batch from a pool of {count.pool_size} of "
                f"{len(train_pos)} training rows with {batch_key}={cfg.plan_batch_size()} "
                f"({why})")
        epochs.append(sizes)
        counted += len(sizes)
    return epochs


def steps_per_epoch(cfg: Config, st: SampleTable, train_pos: np.ndarray,
                    world_size: int) -> list[int]:
    """Optimizer steps of every epoch the run reaches (`epoch_sizes`: ``train.max_steps`` may
    end it before ``cfg.train.epochs``): ``len(epoch_batches(...).batches)`` for each epoch
    (under a batch-size schedule its unit batches). `world_size`:
    not used, as in `epoch_batches` (the LR schedule is laid over the same steps on any).

    Raises ValueError as `epoch_sizes` does.
    """
    return [len(sizes) for sizes in epoch_sizes(cfg, st, train_pos)]


class ScheduleSteps(NamedTuple):
    total: int  # steps of the run (train.max_steps caps it): unit batches under a schedule
    warmup: int  # steps until the end of epoch `warmup_epochs` (fractions of the next epoch)


def schedule_steps(steps: Sequence[int], warmup_epochs: float = 0.0,
                   max_steps: int | None = None) -> ScheduleSteps:
    """The LR schedule's inputs from the real per-epoch step counts (`steps_per_epoch`).

    ``total = min(sum(steps), max_steps)``; warmup ends where epoch ``warmup_epochs`` ends:
    the whole epochs' steps plus the fraction of the next epoch's (rounded half up), e.g.
    1.5 = the first epoch + half of the second. Warmup is not capped by ``max_steps``.

    >>> schedule_steps([10, 20, 30], warmup_epochs=1.5)
    ScheduleSteps(total=60, warmup=20)
    >>> schedule_steps([10, 20, 30], warmup_epochs=1, max_steps=25)
    ScheduleSteps(total=25, warmup=10)
    >>> schedule_steps([10, 10], warmup_epochs=2.5)
    Traceback (most recent call last):
    ...
    ValueError: warmup_epochs=2.5 is longer than the run (2 epochs)
    """
    whole = math.floor(warmup_epochs)
    if warmup_epochs > len(steps):  # (2.5 of 2 epochs too: its half epoch is not there)
        raise ValueError(f"warmup_epochs={warmup_epochs:g} is longer than the run "
                         f"({len(steps)} epochs)")
    warmup = int(sum(steps[:whole]))
    frac = warmup_epochs - whole
    if frac > 0 and whole < len(steps):
        warmup += math.floor(frac * steps[whole] + 0.5)
    total = int(sum(steps)) if max_steps is None else min(int(sum(steps)), int(max_steps))
    return ScheduleSteps(total=total, warmup=warmup)


def lr_schedule(cfg: Config, steps: Sequence[int]) -> ScheduleSteps:
    """The LR schedule of a run of `cfg` whose epochs take `steps` (`steps_per_epoch`: under a
    batch-size schedule, unit batches), in unit batches: `train.max_steps` caps optimizer
    steps, which are unit batches under a constant batch, and under a `warmup` ramp the units
    its first max_steps steps take. Raises ValueError when `train.max_steps` ends the run
    before the warmup does (the LR would only ramp, never reach its peak or decay), and where
    it may end an `adaptive` run (whose units per step are decided during training) under a
    decaying schedule: the driver's checks refuse both before the cluster
    (`pipeline.data.datasets`).

    >>> from pipeline.config import load_config
    >>> cfg = load_config(None, ["train.warmup_epochs=1", "train.max_steps=8",
    ...                          "train.base_batch_size=32"])  # (the LR ramps: 32 -> 64)
    >>> try:
    ...     lr_schedule(cfg, [11, 11])
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    train.warmup_epochs=1 is 11 optimizer steps here, but train.max_steps=8 ends the run first
    >>> lr_schedule(cfg.with_overrides({"train.max_steps": 12}), [11, 11])
    ScheduleSteps(total=12, warmup=11)
    >>> lr_schedule(load_config(None, ["train.epochs=2", "train.warmup_epochs=2",
    ...                                "train.max_steps=1000"]), [11, 11])  # max_steps not met
    ScheduleSteps(total=22, warmup=22)
    >>> ramp = ["train.batch_size_schedule=warmup", "train.batch_size_min=16",
    ...         "train.batch_size_warmup_steps=4", "train.warmup_epochs=1", "train.max_steps=2",
    ...         "train.base_batch_size=16"]
    >>> try:  # the ramp's first 2 steps take 1 unit each: 2 of the warmup's 11
    ...     lr_schedule(load_config(None, ramp), [11, 11])
    ... except ValueError as err:
    ...     print(str(err).split(" here")[0])
    train.warmup_epochs=1 is 11 batches of train.batch_size_min=16
    >>> decay = ["train.batch_size_schedule=warmup", "train.batch_size_min=16",
    ...          "train.batch_size_warmup_steps=4", "train.schedule=cosine", "train.max_steps=6"]
    >>> lr_schedule(load_config(None, decay), [11, 11])  # k = 1, 1, 2, 3, 4, 4: 15 units
    ScheduleSteps(total=15, warmup=0)
    """
    from pipeline.engine.batch_schedule import ramp_steps

    t = cfg.train
    capped = t.max_steps  # in unit batches: optimizer steps under a constant batch
    if t.max_steps is not None and t.batch_size_schedule == "warmup" and t.batch_size_min:
        # the ramp's steps are known: the units its first max_steps steps take
        capped = sum(taken for _, taken in ramp_steps(
            steps, t.global_batch_size // t.batch_size_min, t.batch_size_warmup_steps or 0,
            t.max_steps))
    elif t.batch_size_schedule == "adaptive":
        capped = None  # the units max_steps steps take are decided during training
    out = schedule_steps(steps, t.warmup_epochs, capped)
    if capped is not None and capped < sum(steps) and out.warmup >= out.total > 0 \
            and t.warmup_acts():  # (no ramp and no decay after it: nothing the cap could
        # cut short; `unused_settings` says so)
        what = ("optimizer steps" if t.batch_size_schedule == "constant" else
                f"batches of train.batch_size_min={t.batch_size_min}")
        took = ("" if capped == t.max_steps else
                f" (its first {t.max_steps} steps take {capped} of those batches)")
        raise ValueError(f"train.warmup_epochs={t.warmup_epochs:g} is {out.warmup} {what} "
                         f"here, but train.max_steps={t.max_steps}{took} ends the run first: "
                         "the LR would never reach its peak, or its decay never start (warm up "
                         "for fewer epochs, or drop max_steps)")
    if capped is None and t.max_steps is not None and t.max_steps < sum(steps) and t.batch_size_min:
        # adaptive: a step takes 1 to K unit batches, so where max_steps ends the run, in
        # samples, is known only during training
        if t.schedule != "constant":
            raise ValueError(f"train.max_steps={t.max_steps} under train.batch_size_schedule="
                             f"adaptive ends the run after a number of samples decided during "
                             f"training, so train.schedule={t.schedule} cannot place its decay "
                             "(it would be cut short): bound the run by train.epochs, or use "
                             "train.schedule=constant")
        most = units_at_most(cfg)
        if most < sum(steps) and out.warmup >= most > 0 and t.warmup_acts():
            raise ValueError(f"train.warmup_epochs={t.warmup_epochs:g} is {out.warmup} batches of "
                             f"train.batch_size_min={t.batch_size_min} here, but "
                             f"train.max_steps={t.max_steps} steps take {most} at most: the LR "
                             "would never reach its peak (warm up for fewer epochs, or drop "
                             "max_steps)")
    return out
