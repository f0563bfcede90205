"""More batch planners: stratified, balanced, curriculum, hard_mining, length_bucket, contrastive.

Importing this module registers them next to ``random`` and ``sequential`` (see
`pipeline.data.plan`). Like those, every planner is a pure function of
``(meta, seed, epoch, global_batch_size, drop_last, options)`` -- never of the worker count --
and returns global batches as int64 arrays of ``meta.ids`` (table positions).

Options reach a planner as keyword arguments (``plan_epoch(name, meta, ..., **options)``);
options a planner does not know are ignored, as in `plan.py`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from pipeline.data.pacing import competence
from pipeline.data.plan import (
    EpochCount,
    EpochPlan,
    SampleMeta,
    chunk,
    chunk_sizes,
    count_once_each,
    epoch_rng,
    plan_random,
    register_counter,
    register_planner,
)

__all__ = [
    "batch_tokens",
    "plan_balanced",
    "plan_contrastive",
    "plan_curriculum",
    "plan_hard_mining",
    "plan_length_bucket",
    "plan_stratified",
    "rank_based_probabilities",
]


# --------------------------------------------------------------------------- helpers


def _ids(meta: SampleMeta) -> np.ndarray:
    return np.asarray(meta.ids).astype(np.int64, copy=False)


# Where a planner's metadata comes from, as a user sets it.
_SOURCE = {"difficulty": "a difficulty (batching.difficulty_column, or "
                         "batching.options.difficulty=length on sequences)",
           "lengths": "sequence lengths (data.sequence_column)",
           "labels": "labels (data.label_column)"}


def _column(meta: SampleMeta, name: str, strategy: str) -> np.ndarray:
    """The metadata column `name`, checked to be present and aligned with ``meta.ids``."""
    col = getattr(meta, name)
    if col is None:
        source = _SOURCE.get(name, f"meta.{name}")
        raise ValueError(f"batching strategy {strategy!r} needs {source}, which this data or "
                         "config has not")
    col = np.asarray(col)
    if len(col) != len(meta):
        raise ValueError(
            f"meta.{name} has {len(col)} rows but meta.ids has {len(meta)} ({strategy!r})"
        )
    return col


def _check_batch_size(global_batch_size: int) -> int:
    b = int(global_batch_size)
    if b < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return b


def _shuffle_within(rows: np.ndarray, batch_of: np.ndarray, rng: np.random.Generator):
    """Reorder `rows` grouped by batch (ascending), randomly inside each batch."""
    order = np.lexsort((rng.random(len(rows)), batch_of))
    return rows[order]


# --------------------------------------------------------------------------- stratified


# The integer program below is solved only up to this many atoms. HiGHS solved every one of 800
# random count vectors (4 and 10 classes) of batches with up to 220 atoms (B <= 300) in 0.4 s or
# less, but took 3 to 24 s for some at 264-352 atoms (B = 360, 480) and 193 s for one at 704 (B =
# 960, digits_imbalanced's shares), on every rank: measured on this repo's CPU machine, 2026-12-06.
MILP_ATOMS = 220
# ... and up to this many variables (atoms x classes of 2 samples or more in the batch): 220 atoms
# with 30 such classes took 0.2-0.4 s, 176 atoms with 100 about 0.8-1.1 s (same machine,
# 2026-12-06), once per multiset of counts (`_solved_pattern`'s cache).
MILP_VARIABLES = 220 * 128


def interleave_pattern(counts: tuple[int, ...]) -> np.ndarray:
    """Class of each position of a batch holding ``counts[k]`` samples of class k, such that for
    every ``w`` dividing ``B = sum(counts)`` each of the ``w`` contiguous slices of ``B / w``
    positions holds ``floor(counts[k] / w)`` or ``ceil(counts[k] / w)`` of class k -- for every
    such ``w`` when B is a prime power or small (see below), else for the ``w`` of the chain of
    B's prime factors taken smallest first (960: 2, 4, 8, 16, 32, 64, 192, 960).

    Why that is enough: a quota ``c = counts[k]`` is within 1 of ``B * p`` (``p`` the class
    share), so a slice's share ``L * p`` (``L = B / w``) is within ``1 / w`` of ``c / w``; as
    ``c / w`` is a multiple of ``1 / w``, ``L * p`` lies inside ``[floor(c/w), ceil(c/w)]`` when
    those differ, and within ``1 / w`` of ``c / w`` when they do not: either count is within 1
    of ``L * p``.

    How: along a chain of divisors the digit reversal does it (`_digit_reversal`); when B is a
    prime power its divisors are one chain. Otherwise the slices of different ``w`` cross, and
    simple interleavings (sorting by ``(i + 1/2) / c``, largest deficit first) miss the bound
    for some counts and some ``w``, and a bound below 1 on every prefix gives only +-2 on a
    slice, so the pattern is an integer program over the atoms between slice boundaries (solved
    by HiGHS: `_solved_pattern`), for batches of up to `MILP_ATOMS` atoms and `MILP_VARIABLES`
    variables; above that, or should it have no solution (never met: searched exhaustively for
    B <= 16 with 3 and 4 classes), the digit reversal. The program holds only the classes of 2
    samples or more, sorted by count: a class of 0 or 1 sample is within the bound wherever it
    goes (0 or 1 of it in a slice), so those fill the positions left free, and classes of equal
    counts are alike, so one solution (cached) serves every batch whose counts are the same
    multiset -- a batch of many classes has many count vectors but few such multisets (100
    classes: 58 vectors and 2 multisets in 100 batches of 240). The choice depends on the
    counts alone, never on time, so every rank lays out its batches alike.

        >>> interleave_pattern((28, 10, 2)).reshape(2, 20).__eq__(2).sum(1).tolist()
        [1, 1]
    """
    c = np.asarray(counts, dtype=np.int64)
    b = int(c.sum())
    if len(set(_prime_factors(b))) <= 1:
        return _digit_reversal(c)
    order = np.argsort(-c, kind="stable")  # by count, largest first: 2 or more, then 1, then 0
    many = int((c >= 2).sum())
    solved = _solved_pattern(tuple(c[order[:many]].tolist()), b)
    if solved is None:
        return _digit_reversal(c)
    out = np.empty(b, dtype=np.int64)
    free = solved < 0
    out[~free] = order[solved[~free]]
    out[free] = order[many:many + int(free.sum())]  # the classes of one sample
    return out


@functools.lru_cache(maxsize=512)
def _solved_pattern(counts: tuple[int, ...], b: int) -> np.ndarray | None:
    """`interleave_pattern`'s integer program for classes of ``counts`` (each 2 or more) in a
    batch of ``b`` positions, the rest free (-1 in the result): each class within
    floor..ceil(count / w) in every slice of every ``w`` dividing ``b``. None when the program
    is too large to solve (`MILP_ATOMS`, `MILP_VARIABLES`) or has no solution."""
    k = len(counts)
    if k == 0:
        free = np.full(b, -1, dtype=np.int64)
        free.flags.writeable = False  # cached: shared by every caller
        return free
    c = np.asarray(counts, dtype=np.int64)
    ws = [w for w in range(1, b // 2 + 1) if b % w == 0]  # w = b: slices of one, always fine
    nodes = np.unique(np.concatenate([np.arange(0, b + 1, b // w) for w in ws] + [[0, b]]))
    start, size = nodes[:-1], np.diff(nodes)
    n = len(start)  # atoms: positions between two slice boundaries, order free inside
    if n > MILP_ATOMS or n * k > MILP_VARIABLES:
        return None
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    rows = [np.repeat(np.arange(n), k)]
    cols = [(np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()]
    lo, hi, r = [np.zeros(n)], [size], n  # no atom overfilled (the free positions: the rest)
    for w in ws:
        block = start // (b // w)
        for cls in range(k):
            rows.append(r + block)
            cols.append(cls * n + np.arange(n))
            lo.append(np.full(w, c[cls] // w))
            hi.append(np.full(w, -(-c[cls] // w)))
            r += w
    rows_, cols_ = np.concatenate(rows), np.concatenate(cols)
    a = coo_matrix((np.ones(len(rows_)), (rows_, cols_)), shape=(r, n * k)).tocsr()
    res = milp(np.zeros(n * k), constraints=LinearConstraint(a, np.concatenate(lo), np.concatenate(hi)),
               integrality=np.ones(n * k), bounds=Bounds(0, np.tile(size, k)))
    if res.x is None:
        return None
    per_atom = np.rint(res.x).astype(np.int64).reshape(k, n).T  # (atom, class)
    filled = np.column_stack([per_atom, size - per_atom.sum(1)])  # the free positions last
    pattern = np.repeat(np.tile(np.append(np.arange(k), -1), n), filled.ravel())
    pattern.flags.writeable = False  # cached: shared by every caller
    return pattern


def _prime_factors(b: int) -> list[int]:
    """B's prime factors, smallest first.

    >>> _prime_factors(960), _prime_factors(7), _prime_factors(1)
    ([2, 2, 2, 2, 2, 2, 3, 5], [7], [])
    """
    out, p = [], 2
    while b > 1 and p * p <= b:
        while b % p == 0:
            out.append(p)
            b //= p
        p += 1
    return out + ([b] if b > 1 else [])


def _digit_reversal(counts: np.ndarray) -> np.ndarray:
    """The samples in class order, sample j at the position whose mixed-radix digits (radices:
    B's prime factors, smallest first, most significant first) are j's read backwards. The
    slice of ``B / w`` positions a position falls in, for ``w`` a product of the first radices,
    is its leading digits, which are the trailing digits of j: j modulo ``w``. So each slice
    holds the samples of one residue of j modulo ``w``, and a class, a run of consecutive j,
    has ``floor(c / w)`` or ``ceil(c / w)`` of them in each (van der Corput's sequence, for
    B a power of 2).

    >>> _digit_reversal(np.array([2, 6])).tolist()  # B = 8: the 2 of class 0 in different halves
    [0, 1, 1, 1, 0, 1, 1, 1]
    """
    b = int(counts.sum())
    pos, item, place, weight = np.arange(b), np.zeros(b, dtype=np.int64), b, 1
    for radix in _prime_factors(b):
        place //= radix
        item += (pos // place % radix) * weight
        weight *= radix
    return np.repeat(np.arange(len(counts)), counts)[item]


def _interleave(rows: np.ndarray, cls: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Reorder one batch's rows (random order inside each class) along `interleave_pattern`;
    the pattern or its mirror image (which keeps the property), drawn at random."""
    counts = np.bincount(cls[rows], minlength=k)
    pattern = interleave_pattern(tuple(int(x) for x in counts))
    if rng.random() < 0.5:
        pattern = pattern[::-1]
    out = np.empty_like(rows)
    by_class = rows[np.argsort(cls[rows], kind="stable")]
    out[np.argsort(pattern, kind="stable")] = by_class
    return out


register_counter("stratified")(count_once_each)  # N // B full batches, the rest last or dropped
register_counter("contrastive")(count_once_each)
register_counter("hard_mining")(count_once_each)  # N draws: the count never depends on the losses


@register_planner("stratified")
def plan_stratified(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    **_: object,
) -> EpochPlan:
    """Every full batch mirrors the class shares of the dataset (each class within +-1).

    With ``N`` samples, ``n_k`` in class ``k`` and batch size ``B``, class ``k`` has quota
    ``q_k = B * n_k / N`` per batch. Each full batch gets ``floor(q_k)`` of class ``k`` plus
    the ``r = B - sum(floor(q_k))`` remainder seats, handed out by largest-remainder style
    systematic sampling: the fractional parts ``f_k`` are laid end to end on ``[0, r)`` and
    batch ``j`` takes the classes under the ``r`` points ``t_j, t_j + 1, ..., t_j + r - 1``.
    The offsets ``t_j`` are a random permutation of a grid of step ``1 / n_batches`` (exact
    integer arithmetic), so

    - a class gets at most one extra seat per batch: ``floor(q_k) <= count <= floor(q_k)+1``;
    - over the epoch class ``k`` fills at most ``ceil(n_batches * q_k) <= n_k`` seats, so no
      sample is drawn twice (``n_batches = N // B``);
    - which batches get the extra seats is random per (seed, epoch).

    Samples of each class are taken from a fresh permutation. Inside a batch, each class's
    samples come in random order, laid out along ``interleave_pattern`` (or its mirror, drawn at
    random) so that every rank's contiguous slice of the batch is stratified too (for which
    worker counts: ``interleave_pattern``). Unplaced samples are counted in ``dropped``
    (placed + dropped == N); with ``drop_last=False`` they form one last, partial batch, so
    every sample is placed once.
    Needs ``meta.labels`` (any hashable/sortable values).

    Worked example (10 samples, classes 7:3, batch 5 -> quotas 3.5 and 1.5):

        >>> meta = SampleMeta(ids=np.arange(10), labels=np.array([0] * 7 + [1] * 3))
        >>> plan = plan_stratified(meta, seed=0, epoch=0, global_batch_size=5)
        >>> [sorted(np.bincount(meta.labels[b], minlength=2).tolist()) for b in plan.batches]
        [[1, 4], [2, 3]]
        >>> plan.dropped  # 10 = 2 * 5, nothing left over
        0
    """
    b = _check_batch_size(global_batch_size)
    labels = _column(meta, "labels", "stratified")
    ids = _ids(meta)
    n = len(ids)
    rng = epoch_rng(seed, epoch)
    if n == 0:
        return EpochPlan(batches=[], dropped=0, pool_size=0)
    classes, cls = np.unique(labels, return_inverse=True)
    cls = cls.reshape(-1)
    k = len(classes)
    counts = np.bincount(cls, minlength=k).astype(np.int64)
    n_batches = n // b

    # Per-class rows in a random order, grouped by class: class c occupies
    # grouped[starts[c] : starts[c] + counts[c]].
    perm = rng.permutation(n)
    grouped = perm[np.argsort(cls[perm], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))

    if n_batches:
        scaled = b * counts  # q_k * N, exact
        base = scaled // n  # floor(q_k)
        frac = scaled % n  # f_k * N, exact
        r = int(b - base.sum())  # remainder seats per batch; sum(frac) == r * N
        per_batch = np.broadcast_to(base, (n_batches, k)).copy()
        if r:
            # Units of 1 / (N * n_batches): segment k = [bounds[k-1], bounds[k]), total
            # r * N * n_batches; grid points s + m * N, m = 0 .. r * n_batches - 1.
            bounds = np.cumsum(frac) * n_batches
            s = int(rng.integers(n))
            offset = rng.permutation(n_batches)  # which grid point starts batch j
            m = offset[:, None] + n_batches * np.arange(r)[None, :]  # (n_batches, r)
            points = s + m * n
            extra_cls = np.searchsorted(bounds, points, side="right")
            np.add.at(per_batch, (np.repeat(np.arange(n_batches), r), extra_cls.ravel()), 1)
        # Seats: (batch, class) pairs in batch-major order; the t-th seat of class c (in batch
        # order) takes grouped[starts[c] + t].
        batch_of = np.repeat(np.repeat(np.arange(n_batches), k), per_batch.ravel())
        class_of = np.repeat(np.tile(np.arange(k), n_batches), per_batch.ravel())
        by_class = np.argsort(class_of, kind="stable")
        used = np.bincount(class_of, minlength=k)
        rank_in_class = np.arange(len(class_of)) - np.repeat(np.cumsum(used) - used, used)
        rows = np.empty(len(class_of), dtype=np.int64)
        rows[by_class] = grouped[starts[class_of[by_class]] + rank_in_class]
        placed = _shuffle_within(rows, batch_of, rng).reshape(n_batches, b)
        batches = [ids[_interleave(row, cls, k, rng)] for row in placed]
    else:
        used = np.zeros(k, dtype=np.int64)
        batches = []

    # Leftover rows: the unused tail of every class.
    grouped_cls = cls[grouped]
    leftover = grouped[np.arange(n) - starts[grouped_cls] >= used[grouped_cls]]
    if len(leftover) and not drop_last:
        batches.append(ids[rng.permutation(leftover)])
        return EpochPlan(batches=batches, dropped=0, pool_size=n)
    return EpochPlan(batches=batches, dropped=int(len(leftover)), pool_size=n)


# --------------------------------------------------------------------------- balanced


@register_planner("balanced")
def plan_balanced(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    epoch_samples: int | None = None, **_: object,
) -> EpochPlan:
    """Equal counts of every class in every batch (over-/under-sampling).

    ``global_batch_size`` must be divisible by the number of classes ``K``; each batch holds
    ``B / K`` samples of each class. The epoch has ``epoch_samples // B`` batches
    (``epoch_samples`` defaults to ``len(meta)``). Each class is read through fresh random
    permutations of its samples, one after another: a minority class repeats a sample only
    once all of it has been drawn (then a new permutation starts); a majority class is
    under-sampled. Only full batches are made (``drop_last`` has no effect: a partial batch
    could not be balanced). ``dropped`` counts samples of the pool that appear in no batch.
    Needs ``meta.labels``. A batch repeats a sample only when its class has fewer than ``B / K``
    samples. Inside a batch the classes take turns (in an order drawn per batch), so every
    contiguous slice of it -- a rank's share, a micro-batch -- holds each class within one of
    its equal share.

    Worked example (classes 8:2, batch 4 -> 2 + 2 per batch, 2 batches):

        >>> meta = SampleMeta(ids=np.arange(10), labels=np.array([0] * 8 + [1] * 2))
        >>> plan = plan_balanced(meta, seed=0, epoch=0, global_batch_size=4, epoch_samples=8)
        >>> [np.bincount(meta.labels[b]).tolist() for b in plan.batches]
        [[2, 2], [2, 2]]
        >>> plan.dropped  # 4 of the 8 majority samples were not drawn
        4
    """
    b, total = _balanced_shape(meta, global_batch_size, epoch_samples)
    ids = _ids(meta)
    n = len(ids)
    rng = epoch_rng(seed, epoch)
    if n == 0:
        return EpochPlan(batches=[], dropped=0, pool_size=0)
    classes, cls = np.unique(meta.labels, return_inverse=True)
    cls = cls.reshape(-1)
    k = len(classes)
    per = b // k
    n_batches = total // b
    need = n_batches * per
    if n_batches == 0:
        return EpochPlan(batches=[], dropped=n, pool_size=n)
    cols = [_balanced_draws(np.flatnonzero(cls == c), need, per, rng).reshape(n_batches, per)
            for c in range(k)]
    rows = np.stack(cols, axis=1)  # (batch, class, sample of that class)
    order = np.argsort(rng.random((n_batches, k)), axis=1)  # the classes' turn, per batch
    rows = np.take_along_axis(rows, order[:, :, None], axis=1)
    rows = rows.transpose(0, 2, 1).reshape(n_batches, b)  # round robin over the classes
    seen = np.zeros(n, dtype=bool)
    seen[rows.ravel()] = True
    return EpochPlan(
        batches=[ids[row] for row in rows], dropped=int(n - seen.sum()), pool_size=n
    )


def _balanced_draws(members: np.ndarray, need: int, per: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """``need`` draws of a class's ``members`` for batches of ``per`` each: fresh random
    permutations end to end, each reordered so that a batch which straddles two of them
    (the previous one's last samples, then the new one's first) holds no sample twice -- the
    samples already in that batch go to the new permutation's end (possible when the class has
    at least ``per`` members; with fewer, a batch repeats one anyway).

        >>> draws = _balanced_draws(np.arange(3), 8, 2, np.random.default_rng(0))
        >>> [len(set(pair)) for pair in draws.reshape(4, 2).tolist()]
        [2, 2, 2, 2]
    """
    out: list[np.ndarray] = []
    size = 0
    while size < need:
        perm = rng.permutation(members)
        started = size % per  # samples of the batch this permutation goes on filling
        if started and len(members) >= per:
            held = np.isin(perm, out[-1][-started:])
            perm = np.concatenate([perm[~held], perm[held]])
        out.append(perm)
        size += len(perm)
    return np.concatenate(out)[:need]


@register_counter("balanced")
def count_balanced(
    meta: SampleMeta, *, global_batch_size: int, epoch_samples: int | None = None, **_: object
) -> EpochCount:
    """``epoch_samples // B`` full batches (the planner's checks included)."""
    b, total = _balanced_shape(meta, global_batch_size, epoch_samples)
    if len(meta) == 0:
        return EpochCount(np.zeros(0, np.int64), 0)
    return EpochCount(np.full(total // b, b, dtype=np.int64), pool_size=len(meta))


def _balanced_shape(meta: SampleMeta, global_batch_size: int, epoch_samples: int | None
                    ) -> tuple[int, int]:
    """(B, the epoch's samples) of a balanced epoch, checked: labels present, the epoch's
    samples >= 0 and B divisible by the number of classes (of a non-empty pool)."""
    b = _check_batch_size(global_batch_size)
    labels = _column(meta, "labels", "balanced")
    total = len(meta) if epoch_samples is None else int(epoch_samples)
    if total < 0:
        raise ValueError(f"epoch_samples must be >= 0, got {epoch_samples}")
    k = len(np.unique(labels))
    if len(meta) and b % k:
        raise ValueError(
            f"balanced batching needs global_batch_size ({b}) divisible by the number of "
            f"classes ({k})"
        )
    return b, total


# --------------------------------------------------------------------------- curriculum


def curriculum_pool_size(
    n: int, epoch: int, *, pacing: str = "root", c0: float = 0.1, pacing_epochs: float = 10,
    steps: int = 4, growth: float = 2.0, min_size: int = 1,
) -> int:
    """``ceil(c * n)`` clipped to ``[min_size, n]`` with ``c = competence(epoch / pacing_epochs)``.

    A tolerance of a few floating-point steps of ``c * n`` guards against ``0.3 * 10 ->
    3.0000000000000004`` rounding the pool up by one (a relative 1e-9 of n, as before, took a
    whole sample off from n = 10^9 on). The planner passes ``min_size = global_batch_size``:
    the competence is floored at ``B / n``, so a pool always holds one global batch (never an
    epoch with no step).

        >>> [curriculum_pool_size(100, e, pacing="linear", c0=0.1, pacing_epochs=4)
        ...  for e in range(6)]
        [10, 33, 55, 78, 100, 100]
        >>> curriculum_pool_size(100, 0, pacing="linear", c0=0.1, pacing_epochs=4, min_size=32)
        32
    """
    if n <= 0:
        return 0
    if not (float(pacing_epochs) > 0):
        raise ValueError(f"pacing_epochs must be > 0, got {pacing_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    c = competence(epoch / float(pacing_epochs), pacing, c0=c0, steps=steps, growth=growth)
    size = math.ceil(c * n - 16 * math.ulp(c * n))
    return int(min(n, max(1, int(min_size), size)))


@register_planner("curriculum")
def plan_curriculum(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    pacing: str = "root", c0: float = 0.1, pacing_epochs: float = 10, steps: int = 4,
    growth: float = 2.0, **_: object,
) -> EpochPlan:
    """Competence-based curriculum: a growing pool of the easiest samples, shuffled.

    The pool holds the ``ceil(c * N)`` easiest samples (never fewer than one) where
    ``c = pacing.competence(epoch / pacing_epochs, pacing, c0=, steps=, growth=)``. Samples
    are ranked by a stable sort on ``meta.difficulty`` (ascending: easy first; NaN last), ties
    broken by id, so pools are nested and grow monotonically; from ``epoch >= pacing_epochs``
    the pool is the whole dataset. The pool is permuted by (seed, epoch) and cut into batches.
    ``pool_size`` is the pool's size; ``dropped`` counts pool samples cut by ``drop_last``
    (samples outside the pool are neither placed nor dropped). The pool never holds fewer than
    ``min(N, B)`` samples (the competence is floored at ``B / N``), so every epoch has a full
    global batch when ``N >= B``; when the floor raised the pool, ``note`` says so for the log.

    Worked example (difficulty = id, linear pacing over 2 epochs from c0 = 0.5):

        >>> meta = SampleMeta(ids=np.arange(8), difficulty=np.arange(8.0))
        >>> opts = dict(pacing="linear", c0=0.5, pacing_epochs=2, global_batch_size=2)
        >>> [sorted(np.concatenate(plan_curriculum(meta, seed=0, epoch=e, **opts).batches).tolist())
        ...  for e in (0, 1)]
        [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
        >>> plan_curriculum(meta, seed=0, epoch=2, **opts).pool_size
        8
        >>> plan_curriculum(meta, seed=0, epoch=0, **{**opts, "global_batch_size": 6}).note
        'curriculum pool raised from 4 to 6 samples at epoch 1 to hold one global batch (6)'
        >>> plan_curriculum(meta, seed=0, epoch=0, **{**opts, "global_batch_size": 12,
        ...                                            "drop_last": False}).note[33:]
        'the whole split at epoch 1: its 8 samples are fewer than one global batch (12)'
    """
    b = _check_batch_size(global_batch_size)
    difficulty = _column(meta, "difficulty", "curriculum").astype(np.float64)
    ids = _ids(meta)
    pace = dict(pacing=pacing, c0=c0, pacing_epochs=pacing_epochs, steps=steps, growth=growth)
    size = curriculum_pool_size(len(ids), epoch, min_size=b, **pace)
    paced = curriculum_pool_size(len(ids), epoch, **pace)
    note = ("" if size <= paced else
            f"curriculum pool raised from {paced} to {size} samples at epoch {epoch + 1} to hold "
            f"one global batch ({b})" if size >= b else
            f"curriculum pool raised from {paced} to the whole split at epoch {epoch + 1}: its "
            f"{size} samples are fewer than one global batch ({b})")
    easiest = np.lexsort((ids, difficulty))[:size]
    order = ids[easiest[epoch_rng(seed, epoch).permutation(size)]]
    batches, dropped = chunk(order, b, drop_last)
    return EpochPlan(batches=batches, dropped=dropped, pool_size=size, note=note)


@register_counter("curriculum")
def count_curriculum(
    meta: SampleMeta, *, epoch: int, global_batch_size: int, drop_last: bool = True,
    pacing: str = "root", c0: float = 0.1, pacing_epochs: float = 10, steps: int = 4,
    growth: float = 2.0, **_: object,
) -> EpochCount:
    """The pool of `plan_curriculum` (floored at one global batch), cut into batches."""
    b = _check_batch_size(global_batch_size)
    size = curriculum_pool_size(len(meta), epoch, pacing=pacing, c0=c0, pacing_epochs=pacing_epochs,
                                steps=steps, growth=growth, min_size=b)
    return EpochCount(chunk_sizes(size, b, drop_last), pool_size=size)


# --------------------------------------------------------------------------- hard mining


def rank_based_probabilities(losses: np.ndarray, selection_pressure: float = 100.0) -> np.ndarray:
    """Rank-based selection probabilities (Loshchilov & Hutter 2015), summing to 1.

    Samples are ranked by loss, descending (rank ``r = 0`` is the hardest) and
    ``p_r ∝ exp(-log(s) * r / N)``, so ``p_0 / p_{N-1} = exp(log(s) * (N - 1) / N)``
    (``-> s`` for large N). Tied losses share the mean probability of their ranks (so equal
    losses mean equal probabilities). NaN losses (samples not yet scored) count as the
    hardest: they are explored first. ``s = 1`` gives the uniform distribution; ``s < 1`` is
    a ValueError.

        >>> p = rank_based_probabilities(np.array([0.1, 3.0, 1.0, 2.0]), selection_pressure=16)
        >>> (p * 15).round(6).tolist()  # ranks 3, 0, 2, 1 -> 2**-r / (15 / 8)
        [1.0, 8.0, 2.0, 4.0]
    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    s = float(selection_pressure)
    if not (math.isfinite(s) and s >= 1.0):
        raise ValueError(f"selection_pressure must be a finite number >= 1, got {s}")
    n = len(losses)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    key = np.where(np.isnan(losses), np.inf, losses)
    order = np.argsort(-key, kind="stable")  # rank r -> sample
    by_rank = np.exp(-math.log(s) * np.arange(n) / n)
    # Average inside groups of equal loss (ranks of a group are contiguous).
    sorted_key = key[order]
    new_group = np.concatenate(([True], sorted_key[1:] != sorted_key[:-1]))
    group = np.cumsum(new_group) - 1
    mean = np.bincount(group, weights=by_rank) / np.bincount(group)
    p = np.empty(n, dtype=np.float64)
    p[order] = mean[group]
    return p / p.sum()


@register_planner("hard_mining")
def plan_hard_mining(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    selection_pressure: float = 100.0, **_: object,
) -> EpochPlan:
    """Online hard-example mining by loss rank (Loshchilov & Hutter 2015).

    ``meta.weights`` holds each sample's loss from the previous epoch (None or all-NaN on the
    first epoch: uniform sampling). Probabilities come from `rank_based_probabilities` with
    ``selection_pressure`` ``s`` (the hardest sample is about ``s`` times as likely as the
    easiest). The epoch draws ``N`` samples with replacement (``N - N % B`` with
    ``drop_last``) and cuts them into batches; a sample may appear several times, and
    ``dropped`` counts the samples of the pool that appear in no batch (as ``balanced``'s: about
    a third of the pool even under uniform draws, (1 - 1/N)^N).

    Worked example:

        >>> meta = SampleMeta(ids=np.arange(6), weights=np.array([5.0, 0, 0, 0, 0, 0]))
        >>> plan = plan_hard_mining(meta, seed=0, epoch=1, global_batch_size=4)
        >>> [len(b) for b in plan.batches], plan.dropped
        ([4], 2)
    """
    b = _check_batch_size(global_batch_size)
    ids = _ids(meta)
    n = len(ids)
    rng = epoch_rng(seed, epoch)
    losses = None if meta.weights is None else _column(meta, "weights", "hard_mining")
    if losses is None or np.all(np.isnan(np.asarray(losses, dtype=np.float64))):
        p = None
    else:
        p = rank_based_probabilities(losses, selection_pressure)
    size = n - (n % b if drop_last else 0)
    order = ids[rng.choice(n, size=size, replace=True, p=p)] if size else ids[:0]
    batches, _unused = chunk(order, b, drop_last)
    return EpochPlan(batches=batches, dropped=n - len(np.unique(order)), pool_size=n)


# --------------------------------------------------------------------------- length bucketing


def batch_tokens(lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """Greedy token-budget cut points for samples taken in the given order.

    A batch grows while ``(len(batch) + 1) * max(lengths in batch incl. the new one)`` stays
    ``<= max_tokens`` (padding to the batch's longest sample); every batch holds at least one
    sample, so a sample longer than ``max_tokens`` gets a batch of its own. Returns the cut
    points for ``np.split`` (the start offsets of batches 1, 2, ...).

        >>> lengths = np.array([2, 3, 3, 5, 9, 20])
        >>> [b.tolist() for b in np.split(lengths, batch_tokens(lengths, 10))]
        [[2, 3, 3], [5], [9], [20]]
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if max_tokens is None or int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    t = int(max_tokens)
    n = len(lengths)
    cuts: list[int] = []
    if n and bool(np.all(lengths[1:] >= lengths[:-1])):
        # Sorted ascending: the batch's longest is its last sample, and
        # (j - i + 1) * lengths[j] is non-decreasing in j: binary-search each batch's end.
        lst = lengths.tolist()
        i = 0
        while i < n:
            lo, hi = i + 1, n  # the batch is lst[i:end]; end in [i + 1, n]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - i) * lst[mid - 1] <= t:
                    lo = mid
                else:
                    hi = mid - 1
            i = lo
            if i < n:
                cuts.append(i)
        return np.asarray(cuts, dtype=np.int64)
    count, longest = 0, 0
    for pos, length in enumerate(lengths.tolist()):
        new_longest = max(longest, length)
        if count and (count + 1) * new_longest > t:
            cuts.append(pos)
            count, new_longest = 0, length
        count += 1
        longest = new_longest
    return np.asarray(cuts, dtype=np.int64)


@register_planner("length_bucket")
def plan_length_bucket(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    bucket_size_multiplier: int = 50, max_tokens: int | None = None, **_: object,
) -> EpochPlan:
    """Bucket by length to cut padding, keeping randomness (mega-batch sorting).

    Shuffle the pool (seed, epoch), cut it into mega-batches of
    ``bucket_size_multiplier * global_batch_size`` samples, sort each mega-batch by
    ``meta.lengths`` (stable), cut it into batches, then shuffle the order of the batches.

    - Fixed size (``max_tokens=None``): batches of ``global_batch_size``. The ``N % B``
      samples that cannot fill a batch are chosen at random (the tail of the shuffled pool,
      before bucketing): dropped with ``drop_last``, else one last partial batch (sorted by
      length) after the shuffled full batches.
    - Token budget (``max_tokens`` set): each sorted mega-batch is cut by `batch_tokens`
      (``n_samples * longest <= max_tokens``, at least one sample per batch); batch sizes
      vary and nothing is dropped (``drop_last`` has no effect). The last cut of a mega-batch
      -- its longest samples, what the budget left over, maybe fewer than there are workers
      -- joins the next mega-batch before that is sorted and cut, so that no mega-batch's
      boundary leaves a short batch (a batch of fewer samples than workers leaves some ranks
      an empty share; cut short at every mega-batch, the longest sequences would each be a
      batch of a few samples). Within a mega-batch a cut can still be short where the sorted
      lengths jump (a few mid-length samples before the long ones), and so can the epoch's
      last batch.

    Worked example (12 samples, batch 2, one mega-batch of 6 -> similar lengths together):

        >>> meta = SampleMeta(ids=np.arange(12), lengths=np.array([1, 9] * 6))
        >>> plan = plan_length_bucket(
        ...     meta, seed=0, epoch=0, global_batch_size=2, bucket_size_multiplier=3)
        >>> sorted(sorted(meta.lengths[b].tolist()) for b in plan.batches)
        [[1, 1], [1, 1], [1, 1], [9, 9], [9, 9], [9, 9]]
    """
    b = _check_batch_size(global_batch_size)
    lengths = _column(meta, "lengths", "length_bucket").astype(np.int64)
    ids = _ids(meta)
    n = len(ids)
    mult = int(bucket_size_multiplier)
    if mult < 1:
        raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
    mega = mult * b
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(n)

    if max_tokens is not None:
        mega_of = np.arange(n) // mega
        rows = perm[np.lexsort((lengths[perm], mega_of))]
        batches_rows: list[np.ndarray] = []
        carry = rows[:0]  # the last batch of the mega-batch before: its longest, maybe few
        for start in range(0, n, mega):
            seg = rows[start : start + mega]
            if len(carry):
                seg = np.concatenate([carry, seg])
                seg = seg[np.argsort(lengths[seg], kind="stable")]
            cut = np.split(seg, batch_tokens(lengths[seg], max_tokens))
            carry = cut.pop() if start + mega < n and len(cut) > 1 else rows[:0]
            batches_rows.extend(cut)
        order = rng.permutation(len(batches_rows))
        return EpochPlan(
            batches=[ids[batches_rows[i]] for i in order], dropped=0, pool_size=n
        )

    n_full = n // b
    keep, rest = perm[: n_full * b], perm[n_full * b :]
    mega_of = np.arange(len(keep)) // mega
    rows = keep[np.lexsort((lengths[keep], mega_of))].reshape(n_full, b)
    rows = rows[rng.permutation(n_full)]
    batches = [ids[row] for row in rows]
    if len(rest) and not drop_last:
        batches.append(ids[rest[np.argsort(lengths[rest], kind="stable")]])
        return EpochPlan(batches=batches, dropped=0, pool_size=n)
    return EpochPlan(batches=batches, dropped=int(len(rest)), pool_size=n)


@register_counter("length_bucket")
def count_length_bucket(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    max_tokens: int | None = None, **options: object,
) -> EpochCount:
    """Fixed size: like ``random``. Token budget: the sizes depend on which samples share a
    mega-batch, so the epoch is planned (O(N log N), no gather)."""
    if max_tokens is None:
        return count_once_each(meta, global_batch_size=global_batch_size, drop_last=drop_last)
    plan = plan_length_bucket(meta, seed=seed, epoch=epoch, global_batch_size=global_batch_size,
                              drop_last=drop_last, max_tokens=max_tokens, **options)
    return EpochCount(np.asarray([len(x) for x in plan.batches], np.int64), plan.pool_size)


# --------------------------------------------------------------------------- contrastive


@register_planner("contrastive")
def plan_contrastive(
    meta: SampleMeta, *, seed: int, epoch: int, global_batch_size: int, drop_last: bool = True,
    **options: object,
) -> EpochPlan:
    """Same batches as ``random``; the augmented views are made at collate time.

        >>> meta = SampleMeta(ids=np.arange(10))
        >>> a = plan_contrastive(meta, seed=1, epoch=2, global_batch_size=4)
        >>> b = plan_random(meta, seed=1, epoch=2, global_batch_size=4)
        >>> all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches))
        True
    """
    return plan_random(
        meta, seed=seed, epoch=epoch, global_batch_size=global_batch_size, drop_last=drop_last,
        **options,
    )
