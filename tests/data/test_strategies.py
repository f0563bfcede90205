"""Exact invariants of the batch planners on odd, embedded-like data.

N is prime (1009); labels are 10 long-tailed classes, one of them with 3 samples; lengths are
lognormal clipped to 1..2000; ids are a permutation of table positions (not 0..N-1) so that a
row/id mix-up shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data import strategies
from pipeline.data.pacing import PACINGS, competence
from pipeline.data.plan import PLANNERS, EpochPlan, SampleMeta, plan_epoch, rank_slice
from pipeline.data.strategies import (
    batch_tokens,
    curriculum_pool_size,
    plan_balanced,
    plan_curriculum,
    plan_hard_mining,
    plan_length_bucket,
    plan_random,
    plan_stratified,
    rank_based_probabilities,
)

N = 1009
CLASS_COUNTS = [400, 220, 130, 90, 60, 40, 30, 20, 16, 3]  # sums to 1009
ONCE_PER_EPOCH = ["random", "sequential", "stratified", "length_bucket", "contrastive"]
ALL = ["random", "sequential", "stratified", "balanced", "curriculum", "hard_mining",
       "length_bucket", "contrastive"]
PLANNER_OPTIONS = {"balanced": {"global_batch_size": 60}}


def _make_meta(seed: int = 0) -> SampleMeta:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), CLASS_COUNTS))
    lengths = np.clip(np.round(rng.lognormal(5.0, 1.0, N)), 1, 2000).astype(np.int64)
    difficulty = np.round(rng.random(N), 2)  # many ties
    losses = rng.gamma(2.0, 1.0, N)
    ids = rng.permutation(N).astype(np.int64) + 100
    return SampleMeta(ids=ids, labels=labels, lengths=lengths, difficulty=difficulty,
                      weights=losses)


META = _make_meta()
ROW_OF = {int(i): r for r, i in enumerate(META.ids)}


def _rows(batch: np.ndarray) -> np.ndarray:
    return np.array([ROW_OF[int(i)] for i in batch], dtype=np.int64)


def _plan(name: str, meta: SampleMeta = META, **kw) -> EpochPlan:
    args = {"seed": 3, "epoch": 0, "global_batch_size": 32}
    args.update(PLANNER_OPTIONS.get(name, {}))
    args.update(kw)
    return plan_epoch(name, meta, **args)


def _same(a: EpochPlan, b: EpochPlan) -> bool:
    return (len(a.batches) == len(b.batches) and a.dropped == b.dropped
            and all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True)))


def test_registered():
    for name in ALL:
        assert name in PLANNERS
    assert strategies.plan_contrastive is PLANNERS["contrastive"]


# --------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", ONCE_PER_EPOCH)
@pytest.mark.parametrize("batch_size", [32, 100, 1009, 2000])
def test_each_sample_at_most_once(name, batch_size):
    for drop_last in (True, False):
        plan = _plan(name, global_batch_size=batch_size, drop_last=drop_last)
        placed = np.concatenate(plan.batches) if plan.batches else np.zeros(0, np.int64)
        assert placed.dtype == np.int64
        assert len(np.unique(placed)) == len(placed)
        assert set(placed.tolist()) <= set(META.ids.tolist())
        assert len(placed) + plan.dropped == N
        assert plan.pool_size == N
        sizes = [len(b) for b in plan.batches]
        if drop_last:
            assert all(s == batch_size for s in sizes)
            assert plan.dropped == N % batch_size
        else:
            assert plan.dropped == 0
            assert sorted(placed.tolist()) == sorted(META.ids.tolist())
            assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed_and_epoch(name):
    a, b = _plan(name, epoch=4), _plan(name, epoch=4)
    assert _same(a, b)
    if name != "sequential":
        assert not _same(a, _plan(name, epoch=5))
        assert not _same(a, _plan(name, epoch=4, seed=4))


@pytest.mark.parametrize("name", ALL)
def test_each_global_batch_splits_over_any_worker_count_within_one_sample(name):
    base = _plan(name, epoch=1)  # the plan takes no worker count (tests/data/test_epochs.py
    # checks the whole pipeline's invariance); each global batch splits over any worker count
    for batch in base.batches:
        for world in (1, 2, 3):
            parts = [rank_slice(batch, r, world) for r in range(world)]
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert np.array_equal(np.concatenate(parts), batch)


def test_empty_pool():
    meta = SampleMeta(ids=np.zeros(0, np.int64), labels=np.zeros(0), lengths=np.zeros(0),
                      difficulty=np.zeros(0), weights=np.zeros(0))
    for name in ALL:
        plan = _plan(name, meta)
        assert plan.batches == [] and plan.dropped == 0


# --------------------------------------------------------------------------- stratified


@pytest.mark.parametrize("batch_size", [7, 32, 64, 100, 333])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_within_one_of_share(batch_size, seed):
    plan = _plan("stratified", seed=seed, global_batch_size=batch_size, drop_last=False)
    share = np.asarray(CLASS_COUNTS) / N
    full = [b for b in plan.batches if len(b) == batch_size]
    assert len(full) == N // batch_size
    per_class = np.array([np.bincount(META.labels[_rows(b)], minlength=10) for b in full])
    assert np.all(np.abs(per_class - batch_size * share) <= 1 + 1e-9)
    # Tighter: floor(quota) or floor(quota) + 1, and never more than the class holds.
    base = np.floor(batch_size * share)
    assert np.all((per_class == base) | (per_class == base + 1))
    assert np.all(per_class.sum(axis=0) <= CLASS_COUNTS)


def test_stratified_remainder_seats_rotate():
    plans = [_plan("stratified", epoch=e, global_batch_size=64) for e in range(2)]
    tiny = [[int((META.labels[_rows(b)] == 9).sum()) for b in p.batches] for p in plans]
    assert tiny[0] != tiny[1]  # the 3-sample class lands in different batches
    assert all(sum(t) <= 3 for t in tiny)


def test_stratified_within_batch_order_is_shuffled():
    plan = _plan("stratified", global_batch_size=100)
    labels = [META.labels[_rows(b)] for b in plan.batches]
    assert not all(np.all(np.diff(lab) >= 0) for lab in labels)


def test_stratified_string_labels_and_errors():
    meta = SampleMeta(ids=np.arange(11), labels=np.array(list("aaaaaaabbbc")))
    plan = plan_stratified(meta, seed=0, epoch=0, global_batch_size=5)
    assert [len(b) for b in plan.batches] == [5, 5] and plan.dropped == 1
    for b in plan.batches:
        counts = {c: int((meta.labels[b] == c).sum()) for c in "abc"}
        assert abs(counts["a"] - 5 * 7 / 11) <= 1 and abs(counts["b"] - 5 * 3 / 11) <= 1
    with pytest.raises(ValueError, match="labels"):
        plan_stratified(SampleMeta(ids=np.arange(4)), seed=0, epoch=0, global_batch_size=2)


# --------------------------------------------------------------------------- balanced


@pytest.mark.parametrize(("batch_size", "epoch_samples"), [(60, None), (20, 5000), (10, 9)])
def test_balanced_equal_classes_and_length(batch_size, epoch_samples):
    plan = _plan("balanced", global_batch_size=batch_size, epoch_samples=epoch_samples)
    total = N if epoch_samples is None else epoch_samples
    assert len(plan.batches) == total // batch_size
    for b in plan.batches:
        assert len(b) == batch_size
        assert np.all(np.bincount(META.labels[_rows(b)], minlength=10) == batch_size // 10)
    placed = np.concatenate(plan.batches) if plan.batches else np.zeros(0, np.int64)
    assert plan.dropped == N - len(np.unique(placed))


def test_balanced_cycles_fresh_permutations():
    plan = _plan("balanced", global_batch_size=20, epoch_samples=5000)  # 250 batches, 500/class
    rows = _rows(np.concatenate(plan.batches))
    seen = np.bincount(rows, minlength=N)
    for c, n_c in enumerate(CLASS_COUNTS):
        counts = seen[META.labels == c]
        # 500 draws over n_c samples: every sample floor or ceil of 500 / n_c times.
        assert counts.min() == 500 // n_c and counts.max() == -(-500 // n_c)
    # Minority repeats only once exhausted: the first 3 draws of the 3-sample class are distinct.
    tiny = [r for r in rows if META.labels[r] == 9]
    assert len(set(tiny[:3])) == 3


def test_balanced_batch_repeats_a_sample_only_when_its_class_is_too_small():
    """A class of 3 samples at 2 a batch: a batch straddling two of its permutations (the last
    of one, the first of the next) could draw one sample twice; it never does. A class of 1
    at 2 a batch must repeat it."""
    meta = SampleMeta(ids=np.arange(33), labels=np.array([0] * 30 + [1] * 3))
    for seed in range(50):
        for b in plan_balanced(meta, seed=seed, epoch=0, global_batch_size=4).batches:
            assert len(set(b.tolist())) == 4
    tiny = SampleMeta(ids=np.arange(11), labels=np.array([0] * 10 + [1]))
    batches = plan_balanced(tiny, seed=0, epoch=0, global_batch_size=4).batches
    assert all(np.sum(b == 10) == 2 for b in batches)


@pytest.mark.parametrize("batch_size", [20, 60])
def test_balanced_slices_for_worker_counts_that_do_not_divide_the_batch(batch_size):
    """README: "any worker count": with one that does not divide the batch the ranks' slices
    differ in length by one (`rank_slice`), and each still holds every class within 1 of its
    equal share of that slice (len / classes)."""
    plan = _plan("balanced", global_batch_size=batch_size, epoch_samples=3000)
    worst = 0.0
    for b in plan.batches:
        for w in (w for w in range(2, batch_size) if batch_size % w):
            for r in range(w):
                part = rank_slice(b, r, w)
                counts = np.bincount(META.labels[_rows(part)], minlength=10)
                worst = max(worst, float(np.abs(counts - len(part) / 10).max()))
    assert worst <= 1.0


@pytest.mark.parametrize("batch_size", [20, 60, 120])
def test_balanced_every_slice_of_a_batch_is_balanced(batch_size):
    """Every rank's contiguous slice (any worker count dividing the batch), and every window of
    a batch, holds each class floor or ceil of its equal share."""
    plan = _plan("balanced", global_batch_size=batch_size, epoch_samples=3000)
    for b in plan.batches:
        labels = META.labels[_rows(b)]
        for w in (w for w in range(1, batch_size + 1) if batch_size % w == 0):
            per_slice = np.stack([np.bincount(s, minlength=10) for s in labels.reshape(w, -1)])
            share = batch_size // 10 / w
            assert per_slice.min() >= np.floor(share) and per_slice.max() <= np.ceil(share)


def test_balanced_errors():
    with pytest.raises(ValueError, match=r"\(32\).*\(10\)"):
        _plan("balanced", global_batch_size=32)
    with pytest.raises(ValueError, match="labels"):
        plan_balanced(SampleMeta(ids=np.arange(4)), seed=0, epoch=0, global_batch_size=2)


# --------------------------------------------------------------------------- curriculum


@pytest.mark.parametrize("pacing", PACINGS)
def test_curriculum_pool_grows_to_everything(pacing):
    opts = {"pacing": pacing, "c0": 0.05, "pacing_epochs": 6, "steps": 3, "growth": 2.0}
    easy_order = META.ids[np.lexsort((META.ids, META.difficulty))]
    previous: set[int] = set()
    for epoch in range(9):
        plan = _plan("curriculum", epoch=epoch, drop_last=False, **opts)
        c = competence(epoch / 6, pacing, c0=0.05, steps=3, growth=2.0)
        assert plan.pool_size == max(1, math.ceil(round(c * N, 6)))
        pool = np.concatenate(plan.batches)
        assert len(pool) == plan.pool_size and len(set(pool.tolist())) == len(pool)
        assert set(pool.tolist()) == set(easy_order[: plan.pool_size].tolist())
        assert previous <= set(pool.tolist())
        previous = set(pool.tolist())
        if epoch >= 6:
            assert plan.pool_size == N
    # Pool is random inside: not in difficulty order.
    assert not np.array_equal(pool, easy_order)


def test_curriculum_pool_never_empty_and_drop_last_counts():
    assert curriculum_pool_size(N, 0, pacing="linear", c0=1e-6, pacing_epochs=5) == 1
    plan = _plan("curriculum", pacing="linear", c0=0.1, pacing_epochs=5, global_batch_size=32)
    assert plan.pool_size == 101
    assert plan.num_samples == 96 and plan.dropped == 5


def test_curriculum_needs_difficulty():
    with pytest.raises(ValueError, match="difficulty"):
        plan_curriculum(SampleMeta(ids=np.arange(4)), seed=0, epoch=0, global_batch_size=2)
    with pytest.raises(ValueError, match="pacing"):
        _plan("curriculum", pacing="cubic")


# --------------------------------------------------------------------------- hard mining


@pytest.mark.parametrize("n", [2, 10, 1009])
@pytest.mark.parametrize("s", [1.0, 2.0, 100.0])
def test_rank_based_ratio(n, s):
    losses = np.random.default_rng(n).permutation(n).astype(float)
    p = rank_based_probabilities(losses, s)
    assert p.sum() == pytest.approx(1.0)
    hardest, easiest = p[np.argmax(losses)], p[np.argmin(losses)]
    assert hardest / easiest == pytest.approx(math.exp(math.log(s) * (n - 1) / n), rel=1e-12)
    # Probability decreases strictly along the loss ranking (s > 1).
    by_rank = p[np.argsort(-losses)]
    if s > 1:
        assert np.all(np.diff(by_rank) < 0)
    # Geometric: consecutive ranks differ by the constant factor s ** (1 / n).
    assert np.allclose(by_rank[:-1] / by_rank[1:], s ** (1 / n))


def test_rank_based_ties_nan_and_errors():
    p = rank_based_probabilities(np.array([1.0, 1.0, 1.0]), 100)
    assert np.allclose(p, 1 / 3)
    p = rank_based_probabilities(np.array([2.0, np.nan, 1.0, 2.0]), 100)
    assert p[1] == p.max() and p[0] == p[3] and p[2] == p.min()
    with pytest.raises(ValueError, match="selection_pressure"):
        rank_based_probabilities(np.ones(3), 0.5)


def test_hard_mining_uniform_without_losses():
    for weights in (None, np.full(N, np.nan)):
        meta = SampleMeta(ids=META.ids, weights=weights)
        a = plan_hard_mining(meta, seed=3, epoch=0, global_batch_size=32)
        b = plan_hard_mining(SampleMeta(ids=META.ids), seed=3, epoch=0, global_batch_size=32)
        assert _same(a, b)
        assert a.num_samples == N - N % 32
        # drawn with replacement: `dropped` counts the samples in no batch (as balanced's),
        # about (1 - 1/N)^N of the pool, not the N % 32 draws short of N
        unseen = N - len(np.unique(np.concatenate(a.batches)))
        assert a.dropped == unseen and abs(unseen / N - (1 - 1 / N) ** N) < 0.05


def test_hard_mining_prefers_hard_samples():
    plan = _plan("hard_mining", selection_pressure=100.0, drop_last=False)
    assert plan.num_samples == N
    counts = np.bincount(_rows(np.concatenate(plan.batches)), minlength=N)
    assert plan.dropped == (counts == 0).sum() > N // 2  # the easy half mostly never drawn
    order = np.argsort(-META.weights)
    decile = N // 10
    hard, easy = counts[order[:decile]].sum(), counts[order[-decile:]].sum()
    assert hard > 10 * easy  # expected ratio ~ 100 ** 0.9 / (decile spread) ~ 40
    assert counts[order[0]] >= counts[order[-1]]


def test_hard_mining_draws_at_the_hand_computed_probabilities_of_its_pressure():
    """Four samples of losses 0.1, 3.0, 1.0, 2.0 at selection_pressure 16: ranks 3, 0, 2, 1,
    p_r = 2^-r / (15/8) -> (1, 8, 2, 4) / 15 (Loshchilov & Hutter 2015's rule, by hand). Over
    3,000 epochs of 4 draws each the frequencies within 5 standard errors -- a planner that
    ignored the option (its default, 100) or bent the pressure (16^0.8) is off by 10 or more."""
    meta = SampleMeta(ids=np.array([10, 11, 12, 13]), weights=np.array([0.1, 3.0, 1.0, 2.0]))
    epochs = 3000
    drawn = np.concatenate([np.concatenate(plan_hard_mining(
        meta, seed=7, epoch=e, global_batch_size=4, selection_pressure=16.0).batches)
        for e in range(epochs)])
    freq = np.bincount(drawn - 10, minlength=4) / len(drawn)
    want = np.array([1, 8, 2, 4]) / 15
    stderr = np.sqrt(want * (1 - want) / len(drawn))
    assert np.all(np.abs(freq - want) <= 5 * stderr), (freq, want)


def test_sequential_is_table_order_the_same_every_epoch():
    """README: "table order, the same every epoch" -- the batches, joined, are the pool's ids
    as given (the last partial batch dropped), whatever the seed and epoch."""
    plans = [_plan("sequential", epoch=e, seed=s) for e, s in ((0, 3), (5, 3), (0, 9))]
    for plan in plans:
        assert np.array_equal(np.concatenate(plan.batches), META.ids[: N - N % 32])
        assert plan.dropped == N % 32


# --------------------------------------------------------------------------- length bucket


def _padding_efficiency(plan: EpochPlan) -> float:
    return float(np.mean([
        META.lengths[_rows(b)].sum() / (len(b) * META.lengths[_rows(b)].max())
        for b in plan.batches
    ]))


def test_length_bucket_padding_efficiency_and_random_order():
    bucketed = _plan("length_bucket", global_batch_size=32)
    assert _padding_efficiency(bucketed) >= 0.9
    assert _padding_efficiency(_plan("random", global_batch_size=32)) < 0.6
    longest = [META.lengths[_rows(b)].max() for b in bucketed.batches]
    assert not np.all(np.diff(longest) >= 0) and not np.all(np.diff(longest) <= 0)


def test_length_bucket_partial_batch_goes_last():
    plan = _plan("length_bucket", global_batch_size=32, drop_last=False)
    assert [len(b) for b in plan.batches] == [32] * (N // 32) + [N % 32]


@pytest.mark.parametrize("max_tokens", [500, 4096, 20000])
def test_length_bucket_token_budget(max_tokens):
    plan = _plan("length_bucket", global_batch_size=32, max_tokens=max_tokens)
    placed = np.concatenate(plan.batches)
    assert plan.dropped == 0 and sorted(placed.tolist()) == sorted(META.ids.tolist())
    assert len({len(b) for b in plan.batches}) > 1
    for b in plan.batches:
        lengths = META.lengths[_rows(b)]
        assert len(b) >= 1
        assert len(b) * lengths.max() <= max_tokens or (len(b) == 1 and lengths[0] > max_tokens)
    if max_tokens == 500:
        assert any(len(b) == 1 and META.lengths[_rows(b)][0] > 500 for b in plan.batches)


def test_token_budget_batches_are_cut_short_only_at_the_epochs_end():
    """A mega-batch's last cut holds its longest samples, as many as were left: carried into
    the next mega-batch, so only the epoch's last batch may hold fewer samples than the
    budget's worst case allows (4 of the longest, 128, in 512 tokens) -- the training feed
    drops a batch of fewer samples than workers, and cut short at every mega-batch that
    dropped the longest sequences (24.5 samples an epoch here before; now one batch at most)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 129, 2000)
    meta = SampleMeta(ids=np.arange(2000), lengths=lengths)
    for epoch in range(10):
        plan = plan_epoch("length_bucket", meta, seed=0, epoch=epoch, global_batch_size=32,
                          max_tokens=512, bucket_size_multiplier=4)
        placed = np.concatenate(plan.batches)
        assert sorted(placed.tolist()) == list(range(2000)) and plan.dropped == 0
        assert all(len(b) * lengths[b].max() <= 512 for b in plan.batches)
        short = [b for b in plan.batches if len(b) < 4]
        assert len(short) <= 1, [lengths[b].tolist() for b in short]


def _naive_batch_tokens(lengths, max_tokens):
    cuts, count, longest = [], 0, 0
    for pos, length in enumerate(lengths):
        if count and (count + 1) * max(longest, length) > max_tokens:
            cuts.append(pos)
            count, longest = 0, 0
        count += 1
        longest = max(longest, length)
    return cuts


def test_batch_tokens_matches_naive_greedy():
    rng = np.random.default_rng(7)
    for trial in range(200):
        lengths = rng.integers(1, 50, size=rng.integers(0, 40))
        if trial % 2:
            lengths = np.sort(lengths)  # the binary-search path
        budget = int(rng.integers(1, 200))
        assert batch_tokens(lengths, budget).tolist() == _naive_batch_tokens(lengths, budget)
    with pytest.raises(ValueError, match="max_tokens"):
        batch_tokens(np.array([1, 2]), 0)


def test_length_bucket_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        plan_length_bucket(SampleMeta(ids=np.arange(4)), seed=0, epoch=0, global_batch_size=2)


# --------------------------------------------------------------------------- contrastive


def test_contrastive_is_random():
    assert _same(_plan("contrastive", epoch=2), plan_random(META, seed=3, epoch=2,
                                                            global_batch_size=32))
