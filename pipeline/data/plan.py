"""Batch plans: which samples form each global batch of an epoch (pure numpy, no Ray).

A plan is a function of the sample metadata, the seed, the epoch and the global batch size
only -- never of the number of workers. Each worker then takes its slice of every global
batch (`rank_slice`), so a job on 1 worker and on 4 workers sees the same global batches in
the same order.

Worked example (random, 10 samples, global batch 4, drop_last):

    >>> meta = SampleMeta(ids=np.arange(10))
    >>> plan = plan_epoch("random", meta, seed=0, epoch=0, global_batch_size=4)
    >>> [len(b) for b in plan.batches], plan.dropped
    ([4, 4], 2)
    >>> rank_slice(plan.batches[0], rank=1, world_size=2).shape
    (2,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SampleMeta:
    """Small per-sample columns of the training pool; row i describes sample ids[i].

    `ids` are positions in the worker's table (what the gather uses); the other arrays are
    aligned with them and may be None when the dataset has no such column.
    """

    ids: np.ndarray
    labels: np.ndarray | None = None
    lengths: np.ndarray | None = None
    difficulty: np.ndarray | None = None
    weights: np.ndarray | None = None  # per-sample losses, ranked by hard-example mining

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch, as arrays of sample ids (table positions)."""

    batches: list[np.ndarray]
    dropped: int = 0  # samples of the pool left out this epoch (counted, reported)
    pool_size: int = 0  # samples eligible this epoch (curriculum pools grow over training)
    # Optional per-sample extras aligned with each batch (e.g. contrastive view -> sample map).
    extras: list[dict[str, np.ndarray]] = field(default_factory=list)
    # A line for the log when the planner changed what the options asked for (e.g. a curriculum
    # pool raised to one global batch); empty otherwise.
    note: str = ""

    @property
    def num_samples(self) -> int:
        return int(sum(len(b) for b in self.batches))


@dataclass(frozen=True)
class EpochCount:
    """The sizes of an epoch's global batches, in order, without building them (see `count_epoch`)."""

    sizes: np.ndarray
    pool_size: int = 0


Planner = Callable[..., EpochPlan]
Counter = Callable[..., EpochCount]
PLANNERS: dict[str, Planner] = {}
COUNTERS: dict[str, Counter] = {}


def register_planner(name: str) -> Callable[[Planner], Planner]:
    """Register a planner under `name` so `batching.strategy: name` picks it."""

    def wrap(fn: Planner) -> Planner:
        PLANNERS[name] = fn
        return fn

    return wrap


def register_counter(name: str) -> Callable[[Counter], Counter]:
    """Register a cheap batch counter for the planner `name`: same arguments, returns the sizes
    `plan_epoch` would give (an `EpochCount`), in O(1) or O(pool) without shuffling."""

    def wrap(fn: Counter) -> Counter:
        COUNTERS[name] = fn
        return fn

    return wrap


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """A generator that depends on (seed, epoch) only.

    The epoch enters the seed on purpose: Ray Data's own seeded shuffle repeats the same
    order every epoch inside Ray Train (ray-project/ray#47460).
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def chunk(order: np.ndarray, global_batch_size: int, drop_last: bool) -> tuple[list[np.ndarray], int]:
    """Cut an ordering into global batches; return (batches, number dropped)."""
    n_full = len(order) // global_batch_size
    batches = [order[i * global_batch_size : (i + 1) * global_batch_size] for i in range(n_full)]
    rest = order[n_full * global_batch_size :]
    if len(rest) and not drop_last:
        batches.append(rest)
        return batches, 0
    return batches, int(len(rest))


def chunk_sizes(n: int, global_batch_size: int, drop_last: bool) -> np.ndarray:
    """The batch sizes `chunk` gives for an ordering of n samples.

    >>> chunk_sizes(10, 4, drop_last=True).tolist(), chunk_sizes(10, 4, drop_last=False).tolist()
    ([4, 4], [4, 4, 2])
    """
    b = int(global_batch_size)
    sizes = [b] * (n // b) + ([n % b] if n % b and not drop_last else [])
    return np.asarray(sizes, dtype=np.int64)


@register_planner("sequential")
def plan_sequential(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    **_: object,
) -> EpochPlan:
    """Samples in table order, the same every epoch."""
    batches, dropped = chunk(np.asarray(meta.ids), global_batch_size, drop_last)
    return EpochPlan(batches=batches, dropped=dropped, pool_size=len(meta))


@register_planner("random")
def plan_random(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    **_: object,
) -> EpochPlan:
    """A fresh permutation every epoch from (seed, epoch)."""
    order = np.asarray(meta.ids)[epoch_rng(seed, epoch).permutation(len(meta))]
    batches, dropped = chunk(order, global_batch_size, drop_last)
    return EpochPlan(batches=batches, dropped=dropped, pool_size=len(meta))


@register_counter("sequential")
@register_counter("random")
def count_once_each(
    meta: SampleMeta, *, global_batch_size: int, drop_last: bool = True, **_: object
) -> EpochCount:
    """Every sample of the pool once, cut into global batches (random, sequential, ...)."""
    return EpochCount(chunk_sizes(len(meta), global_batch_size, drop_last), pool_size=len(meta))


def plan_epoch(strategy: str, meta: SampleMeta, **kwargs: object) -> EpochPlan:
    """Dispatch to the registered planner; unknown names raise KeyError listing the known."""
    if strategy not in PLANNERS:
        raise KeyError(f"unknown batching strategy {strategy!r}; known: {sorted(PLANNERS)}")
    return PLANNERS[strategy](meta, **kwargs)


def count_epoch(strategy: str, meta: SampleMeta, **kwargs: object) -> EpochCount:
    """The batch sizes `plan_epoch(strategy, meta, **kwargs)` gives, from the strategy's counter
    (cheap: no shuffle) or, for a strategy without one, from its plan.

    >>> count_epoch("random", SampleMeta(ids=np.arange(10)), seed=0, epoch=0,
    ...             global_batch_size=4).sizes.tolist()
    [4, 4]
    """
    if strategy in COUNTERS:
        return COUNTERS[strategy](meta, **kwargs)
    plan = plan_epoch(strategy, meta, **kwargs)
    return EpochCount(np.asarray([len(b) for b in plan.batches], dtype=np.int64), plan.pool_size)


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (sizes differ by at most one).

    Contiguous shares keep the order inside the global batch, so concatenating the slices of
    ranks 0..world_size-1 gives the global batch back.
    """
    return np.array_split(batch, world_size)[rank]
