"""Stratified batches per rank (issue 9, item 8): every rank's contiguous slice of a global batch
within +-1 of its class share, for every world size dividing the batch, the plan unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from pipeline.data.datasets import make_digits_imbalanced
from pipeline.data.plan import SampleMeta, rank_slice
from pipeline.data.strategies import interleave_pattern, plan_stratified

THREE = np.repeat([0, 1, 2], [700, 250, 53])  # the issue's set
IMBALANCED = make_digits_imbalanced().column("label").to_numpy()


def meta_of(labels: np.ndarray, seed: int = 0) -> SampleMeta:
    return SampleMeta(ids=np.arange(len(labels)),
                      labels=np.random.default_rng(seed).permutation(labels))


def divisors(b: int) -> list[int]:
    return [w for w in range(1, b + 1) if b % w == 0]


def worst_slice_deviation(plan, labels: np.ndarray, world: int) -> float:
    share = np.bincount(labels) / len(labels)
    worst = 0.0
    for batch in plan.batches:
        for r in range(world):
            part = rank_slice(batch, r, world)
            counts = np.bincount(labels[part], minlength=len(share))
            worst = max(worst, float(np.abs(counts - share * len(part)).max()))
    return worst


@pytest.mark.parametrize(("labels", "batch"), [(THREE, 40), (IMBALANCED, 40), (IMBALANCED, 60)])
def test_every_rank_slice_within_one_of_its_share(labels, batch):
    """All world sizes dividing the batch (1, 2, 4, 5 included), every slice, two seeds, three
    epochs; world 1 is the global batch's own +-1."""
    for seed, epoch in itertools.product((0, 1), (0, 1, 2)):
        meta = meta_of(labels, seed)
        plan = plan_stratified(meta, seed=seed, epoch=epoch, global_batch_size=batch)
        for world in divisors(batch):
            assert worst_slice_deviation(plan, meta.labels, world) <= 1 + 1e-9, (seed, world)


def test_the_issue_case_was_three_off_and_is_now_within_one():
    """Without the interleave (batch order shuffled, today's plan) a 2-rank slice was up to 3
    samples off; the same plan's batches, interleaved, are within 1."""
    meta = meta_of(THREE)
    plan = plan_stratified(meta, seed=0, epoch=0, global_batch_size=40)
    rng = np.random.default_rng(0)
    shuffled = type(plan)(batches=[rng.permutation(b) for b in plan.batches])
    assert worst_slice_deviation(shuffled, meta.labels, 2) > 1.5
    assert worst_slice_deviation(plan, meta.labels, 2) <= 1 + 1e-9


@pytest.mark.parametrize("b", range(2, 13))
def test_pattern_exhaustive_over_counts_and_slices(b):
    """Every count vector of 3 classes summing to b (zeros included), every w | b, every slice:
    floor or ceil of count / w."""
    for c0 in range(b + 1):
        for c1 in range(b + 1 - c0):
            counts = (c0, c1, b - c0 - c1)
            pattern = interleave_pattern(counts)
            assert pattern is not None and sorted(np.bincount(pattern, minlength=3)) == sorted(counts)
            assert np.array_equal(np.bincount(pattern, minlength=3), counts)
            for w in divisors(b):
                per_slice = (pattern.reshape(w, b // w)[:, :, None] == np.arange(3)).sum(1)
                assert np.all(per_slice >= np.array(counts) // w)
                assert np.all(per_slice <= -(-np.array(counts) // w))


def test_order_inside_batches_is_random_and_seeded():
    meta = meta_of(THREE)
    a = plan_stratified(meta, seed=0, epoch=0, global_batch_size=40)
    b = plan_stratified(meta, seed=1, epoch=0, global_batch_size=40)
    c = plan_stratified(meta, seed=0, epoch=1, global_batch_size=40)
    same = plan_stratified(meta, seed=0, epoch=0, global_batch_size=40)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, same.batches, strict=True))
    assert not np.array_equal(a.batches[0], b.batches[0])
    assert not np.array_equal(a.batches[0], c.batches[0])
    # Class sequences of the batches are not all the same pattern (mirrored at random).
    seqs = {tuple(meta.labels[x].tolist()) for x in a.batches}
    assert len(seqs) > 1


def test_summary_reports_worst_rank_deviation():
    from pipeline.inspect import summarize

    # One global batch of 4 on 2 ranks, shares 1/2 - 1/2: rank 0 holds [0, 0], rank 1 [1, 1].
    df = pd.DataFrame({"epoch": 0, "rank": [0, 0, 1, 1], "batch": 0, "micro": 0,
                       "sample_id": [0, 1, 2, 3], "label": [0, 0, 1, 1], "length": 0,
                       "padded_length": 0, "pool_size": 4})
    share = pd.Series([0.5, 0.5], index=[0, 1])
    s = summarize(df, 4, 4, share)
    assert s["epochs"][0]["max_class_deviation"] == 0.0  # the global batch is exact
    assert s["worst_rank_class_deviation"] == 1.0  # each rank: 2 of a class against 1
    df["label"] = [0, 1, 0, 1]
    assert summarize(df, 4, 4, share)["worst_rank_class_deviation"] == 0.0


def test_under_a_warmup_schedule_the_deviation_is_per_unit_batch():
    """A step of two unit batches of 4 (3 classes of a third each), each as close to its
    shares as 4 rows can be (2, 1, 1: off by 2/3): per unit batch, as a schedule keeps them,
    the deviation is 2/3; the step as one batch (8 rows: 4, 2, 2) is off by 4/3."""
    from pipeline.inspect import summarize

    df = pd.DataFrame({"epoch": 0, "rank": [0, 0, 0, 0, 1, 1, 1, 1], "batch": 0, "micro": 0,
                       "sample_id": range(8), "label": [0, 0, 1, 2, 0, 0, 1, 2], "length": 0,
                       "padded_length": 0, "pool_size": 8})
    share = pd.Series([1 / 3] * 3, index=[0, 1, 2])
    per_unit = summarize(df, 8, 8, share, unit=4)["epochs"][0]["max_class_deviation"]
    per_step = summarize(df, 8, 8, share)["epochs"][0]["max_class_deviation"]
    assert per_unit == pytest.approx(2 / 3) and per_step == pytest.approx(4 / 3)


def _slices_hold_floor_or_ceil(pattern: np.ndarray, counts, ws) -> bool:
    c, b, k = np.array(counts), len(pattern), len(counts)
    for w in ws:
        per_slice = (pattern.reshape(w, b // w)[:, :, None] == np.arange(k)).sum(1)
        if np.any(per_slice < c // w) or np.any(per_slice > -(-c // w)):
            return False
    return np.array_equal(np.bincount(pattern, minlength=k), c)


@pytest.mark.parametrize("b", [8, 9, 16, 25, 27, 32])
def test_prime_power_batches_take_the_digit_reversal_exact_for_every_divisor(b):
    """A prime-power batch's divisors are one chain: the digit reversal serves every one of
    them (no solver), for every count vector of 3 classes."""
    from pipeline.data.strategies import _digit_reversal

    for c0 in range(b + 1):
        for c1 in range(b + 1 - c0):
            counts = (c0, c1, b - c0 - c1)
            pattern = interleave_pattern(counts)
            assert np.array_equal(pattern, _digit_reversal(np.array(counts)))
            assert _slices_hold_floor_or_ceil(pattern, counts, divisors(b)), counts


def test_a_large_composite_batch_is_laid_out_along_its_chain_without_the_solver():
    """B = 960 with digits_imbalanced's shares: the count vector on which the integer program
    took 193 s (every rank, every process) is laid out by the digit reversal, exact for every
    worker count of the chain 2, 4, ..., 64, 192, 960; a 1024 batch (a power of 2) for all."""
    from pipeline.data.strategies import MILP_ATOMS, _digit_reversal

    slow = (433, 259, 130, 69, 35, 17, 8, 5, 2, 2)
    pattern = interleave_pattern(slow)
    assert np.array_equal(pattern, _digit_reversal(np.array(slow)))
    assert _slices_hold_floor_or_ceil(pattern, slow, [2, 4, 8, 16, 32, 64, 192, 960])
    assert MILP_ATOMS < 704  # the atoms of 960 (beyond the bound: not solved)
    wide = (500, 300, 150, 50, 24)
    assert _slices_hold_floor_or_ceil(interleave_pattern(wide), wide, divisors(1024))


def test_many_classes_are_laid_out_exactly_with_one_solve_per_multiset_of_counts():
    """30 classes in batches of 96 (2 to 4 samples of each: all in the program): every slice
    of every worker count dividing 96 within floor..ceil of its class counts. The program is
    solved once per multiset of the counts of 2 or more (sorted), not once per count vector."""
    from pipeline.data.strategies import _solved_pattern

    labels = np.random.default_rng(7).integers(0, 30, 9_600)
    meta = meta_of(labels)
    _solved_pattern.cache_clear()
    plan = plan_stratified(meta, seed=0, epoch=0, global_batch_size=96)
    vectors, multisets = set(), set()
    for batch in plan.batches:
        counts = np.bincount(meta.labels[batch], minlength=30)
        assert _slices_hold_floor_or_ceil(meta.labels[batch], counts, divisors(96))
        vectors.add(tuple(counts.tolist()))
        multisets.add(tuple(sorted(counts[counts >= 2].tolist())))
    assert len(plan.batches) == 100 and min(c for v in vectors for c in v) >= 2
    assert _solved_pattern.cache_info().misses == len(multisets) < len(vectors)


def test_a_thousand_classes_of_one_sample_each_need_no_solver(monkeypatch):
    """1,000 classes in batches of 240: at most one sample of a class per batch (shares of
    0.24), so any layout holds the bound and no program is solved (with every class in it,
    1,000 classes took 9.5 s a batch)."""
    import scipy.optimize

    from pipeline.data.strategies import _solved_pattern

    def no_solver(*args, **kwargs):
        raise AssertionError("an integer program was solved")

    monkeypatch.setattr(scipy.optimize, "milp", no_solver)
    meta = meta_of(np.repeat(np.arange(1_000), 24))
    _solved_pattern.cache_clear()
    plan = plan_stratified(meta, seed=0, epoch=0, global_batch_size=240)
    for batch in plan.batches[:10]:
        counts = np.bincount(meta.labels[batch], minlength=1_000)
        assert counts.max() == 1
        assert _slices_hold_floor_or_ceil(meta.labels[batch], counts, divisors(240))


def test_a_hundred_classes_of_two_or_three_are_solved_and_past_the_cap_the_chain_holds(
        monkeypatch):
    """100 classes of 2 or 3 samples in a batch of 240 (176 atoms): 17,600 variables, solved
    (exact for every worker count); with the cap below that, the digit reversal, exact for the
    chain of 240's prime factors (2, 4, 8, 16, 48, 240) only."""
    import pipeline.data.strategies as strategies

    counts = tuple([3] * 40 + [2] * 60)
    strategies._solved_pattern.cache_clear()
    pattern = strategies.interleave_pattern(counts)
    assert _slices_hold_floor_or_ceil(pattern, counts, divisors(240))
    monkeypatch.setattr(strategies, "MILP_VARIABLES", 176 * 99)
    strategies._solved_pattern.cache_clear()
    pattern = strategies.interleave_pattern(counts)
    assert np.array_equal(pattern, strategies._digit_reversal(np.array(counts)))
    assert _slices_hold_floor_or_ceil(pattern, counts, [2, 4, 8, 16, 48, 240])
    assert not _slices_hold_floor_or_ceil(pattern, counts, divisors(240))


def _largest_remainder(share: np.ndarray, b: int) -> tuple[int, ...]:
    """A batch of b's class counts at `share`, by largest remainder (hand-written here: the
    planner's counts vary as pools deplete; the README's claim is per count vector)."""
    raw = share * b
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: b - counts.sum()]:
        counts[i] += 1
    return tuple(int(c) for c in counts)


def test_every_batch_up_to_300_holds_every_worker_count_at_digits_imbalanced_shares():
    """README: every rank's slice within +-1 of its share for every worker count dividing the
    batch, "every batch up to 300" -- checked for each of 2..300 at `digits_imbalanced`'s ten
    class shares (skewed 433 : ... : 2 at 960)."""
    share = np.bincount(IMBALANCED) / len(IMBALANCED)
    for b in range(2, 301):
        counts = _largest_remainder(share, b)
        pattern = interleave_pattern(counts)
        assert pattern is not None and _slices_hold_floor_or_ceil(pattern, counts, divisors(b)), b


@pytest.mark.parametrize(("b", "chain"), [(960, [2, 4, 8, 16, 32, 64, 192, 960]),
                                          (1536, [2, 4, 8, 16, 32, 64, 128, 256, 512, 1536])])
def test_past_300_the_chain_is_exact_and_the_other_worker_counts_within_three_and_a_half(b, chain):
    """README: beyond the solver's reach, the worker counts of the batch's prime-factor chain
    within +-1, the others off their share by up to about 3.5 samples (at 960 and 1536)."""
    share = np.bincount(IMBALANCED) / len(IMBALANCED)
    counts = _largest_remainder(share, b)
    pattern = interleave_pattern(counts)
    assert _slices_hold_floor_or_ceil(pattern, counts, chain)
    off_chain = [w for w in divisors(b) if w not in chain]
    assert not _slices_hold_floor_or_ceil(pattern, counts, off_chain)  # (the claim's condition)
    worst = 0.0
    for w in off_chain:
        per_slice = (pattern.reshape(w, b // w)[:, :, None] == np.arange(len(counts))).sum(1)
        worst = max(worst, float(np.abs(per_slice - np.array(counts) / w).max()))
    assert 1 < worst <= 3.5
