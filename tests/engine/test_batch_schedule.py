"""Batch-size schedules (pure): goodput's choice against hand-computed values, the warmup ramp,
the step-cost fit, and the invariance rule -- a schedule's batches are whole unit batches of the
plan, whatever the worker count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.epochs import epoch_batches
from pipeline.data.plan import rank_slice
from pipeline.engine.batch_schedule import (
    BatchSchedule,
    best_units,
    efficiency,
    fit_step_cost,
    goodput,
    group_units,
    ramp_steps,
    warmup_units,
)
from pipeline.engine.loop import LoopState, PlannedStep, train_epoch
from tests.data.test_epochs import STRATEGIES, odd_setup


# -- goodput ---------------------------------------------------------------------------------
def test_efficiency_is_the_papers_ratio_and_goodput_peaks_at_sqrt_c_phi():
    # McCandlish et al.: a step at M is worth E(M) M / M0 steps at M0; at M = phi, E = (phi +
    # M0) / (2 phi): with phi = 96 and M0 = 32, E(96) = 128 / 192.
    assert efficiency(96, 32, 96.0) == pytest.approx(128 / 192)
    assert efficiency(32, 32, 5.0) == 1.0
    # Goodput E(M) M / (c + M) with c = 64, phi = 256: by hand at M = 64, 128, 256.
    assert goodput(64, 32, 256.0, 64.0) == pytest.approx((288 / 320) * 64 / 128)
    assert goodput(128, 32, 256.0, 64.0) == pytest.approx((288 / 384) * 128 / 192)
    assert goodput(256, 32, 256.0, 64.0) == pytest.approx((288 / 512) * 256 / 320)
    # The continuous optimum is sqrt(c phi) = 128; the discrete one among multiples of 32:
    assert best_units(256.0, 32, 16, 64.0) == 4


@pytest.mark.parametrize(("phi", "cost", "want"), [
    (float("nan"), 100.0, 1),  # not measured yet: the unit
    (-3.0, 100.0, 1),  # a negative estimate early in training: the unit
    (10.0, 10.0, 1),  # sqrt(100) = 10 < 32
    (1e9, 100.0, 8),  # no noise: as large as allowed
    (400.0, 100.0, 6),  # sqrt(4e4) = 200: 192 beats 224 (see the module docstring)
])
def test_best_units(phi, cost, want):
    assert best_units(phi, 32, 8, cost) == want


def test_the_batch_grows_as_the_noise_scale_grows():
    ks = [best_units(phi, 16, 64, 256.0) for phi in (16, 64, 256, 1024, 4096)]
    assert ks == sorted(ks) and ks[0] < ks[-1]


# -- warmup -------------------------------------------------------------------------------------
def test_warmup_ramps_linearly_from_one_unit_to_the_full_batch():
    assert [warmup_units(s, 4, 6) for s in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert warmup_units(0, 4, 0) == 4


@pytest.mark.parametrize(("epochs", "max_steps"), [([7, 9, 3], 100), ([7, 9, 3], 6), ([1, 1], 3)])
def test_ramp_steps_are_the_steps_training_groups(epochs, max_steps):
    """What the driver counts ahead (`ramp_steps`: the LR schedule's length under max_steps,
    the ramp's reach) is what training does: the schedule's k per step, grouped by
    `group_units` epoch by epoch, the last step of an epoch taking what is left."""
    sched = BatchSchedule(kind="warmup", unit=8, max_units=4, ramp_steps=5)
    done: list[tuple[int, int]] = []

    def units() -> int:
        return sched.next_units(len(done), math.nan)  # the step about to run

    for n in epochs:
        for _, taken in group_units([np.arange(i, i + 1) for i in range(n)], units):
            if len(done) == max_steps:
                break
            done.append((sched.units, taken))
    assert list(ramp_steps(epochs, 4, 5, max_steps)) == done


# -- the step cost from timed steps -------------------------------------------------------------
def test_step_cost_from_a_line_through_timed_steps():
    sizes = [32, 64, 96, 32, 64]
    seconds = [0.02 + 1e-4 * m for m in sizes]  # a = 0.02 s, b = 1e-4 s per sample: c = 200
    assert fit_step_cost(sizes, seconds) == pytest.approx(200.0)
    assert fit_step_cost([32, 32], [0.1, 0.2]) is None  # one size: no line
    assert fit_step_cost([32, 64], [0.2, 0.1]) is None  # no positive slope
    assert fit_step_cost([32, 64], [0.0, 0.1]) == 0.0  # negative intercept: no fixed cost


def test_a_few_slow_steps_do_not_move_the_step_cost():
    """Ten steps at each of 32 and 64 samples, a = 0.02 s and b = 1e-4 s/sample (c = 200), one
    of them slowed 20-fold (a validation pass, a busy machine): the medians keep c at 200,
    where a least-squares line through every step finds no positive slope at all."""
    sizes = [32] * 10 + [64] * 10
    seconds = [0.02 + 1e-4 * m for m in sizes]
    seconds[3] *= 20
    assert fit_step_cost(sizes, seconds) == pytest.approx(200.0)
    b, _ = np.polyfit(sizes, seconds, 1)  # the plain line through every step
    assert b < 0


def test_adaptive_explores_then_decides_by_goodput_every_interval():
    s = BatchSchedule("adaptive", unit=32, max_units=8, interval=3)
    ks = []
    for step in range(12):
        ks.append(s.next_units(step, phi_samples=400.0))
        s.observe(ks[-1] * 32, 0.01 + 1e-4 * ks[-1] * 32)  # c = 100 samples
    # steps 0-2 at the unit, 3-5 at 4 units (exploration), then goodput with the fitted c.
    assert ks[:6] == [1, 1, 1, 4, 4, 4]
    assert s.step_cost == pytest.approx(100.0) and s.measured
    # the best k is 6, but from 4 it promises less than 5% more goodput: the batch stays
    assert best_units(400.0, 32, 8, 100.0) == 6
    assert goodput(6 * 32, 32, 400.0, 100.0) < 1.05 * goodput(4 * 32, 32, 400.0, 100.0)
    assert ks[6:] == [4] * 6
    # The decisions use the mean over ranks of the timings (`agree`): slower timings on one
    # rank move every rank alike.
    t = BatchSchedule("adaptive", unit=32, max_units=8, interval=3)
    for step in range(6):
        t.next_units(step, 400.0)
        t.observe(t.units * 32, 0.01 + 1e-4 * t.units * 32)
    t.next_units(6, 400.0, agree=lambda xs: xs if len(xs) == 1 else  # (the noise scale)
                 [x * 0 + 0.05 + 1e-4 * m for x, m in zip(xs, [32, 32, 128, 128, 128],
                                                          strict=True)])
    assert t.step_cost == pytest.approx(500.0)
    # (step 0 is not timed: the process's first step warms up allocators and kernels)
    assert [m for m, _ in t.timings] == [32, 32, 128, 128, 128]


def test_a_step_no_slower_at_the_explored_batch_means_a_fixed_cost_and_the_largest_batch():
    """The explored size (4 units) timed no slower than the unit: the step time does not grow
    with the batch (a fixed cost dominates), c = inf, and goodput -- E(M) x M then -- is best
    at the largest batch. The schedule stayed at 4 units for good (c never fitted: the window
    soon held one size alone) whatever the noise scale."""
    s = BatchSchedule("adaptive", unit=8, max_units=16, interval=5)
    ks = []
    for step in range(40):
        ks.append(s.next_units(step, phi_samples=1e6))
        s.observe(ks[-1] * 8, 0.010 - 0.0001 * ks[-1])  # slightly faster at more units
    assert ks[:10] == [1] * 5 + [4] * 5
    assert s.step_cost == math.inf and s.measured
    assert ks[10:] == [16] * 30
    assert best_units(1e6, 8, 16, math.inf) == 16 and best_units(math.nan, 8, 16, math.inf) == 1
    # A timing of one size alone says nothing: c stays unset (and the explored size kept).
    t = BatchSchedule("adaptive", unit=8, max_units=16, interval=5)
    t.timings = [(32, 0.01)] * 10
    t.next_units(10, 1e6)
    assert t.step_cost is None


def test_a_measured_step_cost_is_fitted_again_at_every_decision():
    """After the first fit, each decision fits the line again through the steps timed since
    (up to 200): here the fixed cost of a step doubles at step 12, and c follows once the
    window's steps are mostly the new ones, at two batch sizes."""
    s = BatchSchedule("adaptive", unit=32, max_units=8, interval=3)
    costs = []
    for step in range(60):
        k = s.next_units(step, phi_samples=400.0 if step < 30 else 40.0)
        costs.append(s.step_cost)
        a = 0.01 if step < 12 else 0.02  # T(M) = a + 1e-4 M: c = 100, then 200
        s.observe(k * 32, a + 1e-4 * k * 32)
    assert costs[6] == pytest.approx(100.0) and s.measured
    assert s.step_cost == pytest.approx(200.0)  # the window: steps 12-59, all at a = 0.02
    assert len(s.timings) == 59  # (step 0, the process's first, is not timed)


def test_a_settled_schedule_keeps_its_c_rather_than_fit_a_line_through_noise():
    """Once the batch has settled, the window holds one size and each epoch's short last step:
    a line through those fits the step-to-step noise -- a short step a little slower than the
    full ones gave no positive slope, c = inf and the largest batch. A later fit needs two
    sizes of 5+ steps each, the larger at least twice the smaller; otherwise c stays."""
    s = BatchSchedule("adaptive", unit=32, max_units=16, interval=10, step_cost=100.0,
                      measured=True, units=4, cold=False)
    s.timings = [(128, 0.228)] * 199 + [(96, 0.23)]  # the epoch's last step: 3 units, slower
    assert fit_step_cost([m for m, _ in s.timings], [t for _, t in s.timings]) is None
    assert s.next_units(200, phi_samples=400.0) == 4  # (c = 100: 6 is best, not 5% better)
    assert s.step_cost == 100.0
    # the same with four such steps of 96 (under 5: no size of its own) and one of 32
    s.timings = [(128, 0.228)] * 195 + [(96, 0.23)] * 4 + [(32, 0.3)]
    s.next_units(210, phi_samples=400.0)
    assert s.step_cost == 100.0
    # sizes 1.5x apart, 5+ steps each: not far enough apart for a line
    s.timings = [(128, 0.1)] * 100 + [(192, 0.09)] * 100
    s.next_units(220, phi_samples=400.0)
    assert s.step_cost == 100.0
    # two sizes 2x apart, 5+ steps each: fitted again, through those two only (c = 50)
    s.timings = [(64, 0.0114)] * 10 + [(128, 0.0178)] * 10 + [(96, 1.0)] * 4
    s.next_units(230, phi_samples=400.0)
    assert s.step_cost == pytest.approx(50.0)


def test_every_rank_decides_with_one_noise_scale():
    """Each rank measures the noise scale itself (alike only where every kernel is): a decision
    takes its mean over the ranks (`agree`), so ranks that measured 40 and 1,000 both decide
    as at 520 (c = 100: M* = sqrt(100 x 520) = 228, 7 units of 32), not at 2 and 10 units."""
    def mean_of(values):
        def agree(xs):
            return [sum(values) / len(values)] if len(xs) == 1 else xs
        return agree

    ks = []
    for phi in (40.0, 1000.0):
        s = BatchSchedule("adaptive", unit=32, max_units=16, interval=2, step_cost=100.0)
        ks.append(s.next_units(2, phi, agree=mean_of([40.0, 1000.0])))
    assert ks == [best_units(520.0, 32, 16, 100.0)] * 2 == [7, 7]
    assert best_units(40.0, 32, 16, 100.0) == 2 and best_units(1000.0, 32, 16, 100.0) == 10


def test_exploring_at_4_units_measures_c_closer_than_at_2_on_a_noisy_machine():
    """Why the second interval is timed at 4 units: with step times that vary by a factor of
    up to 2.5 from step to step (uniform, seeded; what the README's runs saw), the c fitted
    through 9 steps at 1 unit and 10 at k units, for a true c of 150 samples at unit 32, lands
    within a factor of 2 of the truth far more often with k = 4 than with k = 2."""
    rng = np.random.default_rng(0)

    def within_2x(k: int) -> float:
        hits = 0
        for _ in range(400):
            sizes = [32] * 9 + [32 * k] * 10
            times = [1e-4 * (150 + m) * rng.uniform(1.0, 2.5) for m in sizes]
            c = fit_step_cost(sizes, times)
            hits += c is not None and 75 <= c <= 300
        return hits / 400

    at2, at4 = within_2x(2), within_2x(4)
    # the claim, "far more often": a rate of 400 draws has a standard error of at most 0.025,
    # so a gap of 0.25 is 7 of them (seeded, this run gives the README's 35% and 73%)
    assert at4 > at2 + 0.25, (at2, at4)


def test_a_configured_step_cost_is_deterministic_and_never_measured():
    s = BatchSchedule("adaptive", unit=32, max_units=8, interval=2, step_cost=100.0)
    ks = [s.next_units(step, phi_samples=400.0) for step in range(5)]
    assert ks == [1, 1, 6, 6, 6] and not s.measured and s.timings == []
    restored = BatchSchedule("adaptive", unit=32, max_units=8, interval=2)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


# -- the invariance rule --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_schedule_batches_are_whole_units_of_the_plan_whatever_the_worker_count(strategy):
    """Under a schedule, epochs are planned at the unit (train.batch_size_min) and a step is k
    consecutive unit batches: for a given sequence of k the global batches are the same on 1, 2
    and 3 workers, and the ranks' slices put back together give each of them."""
    ks = [1, 2, 3, 1, 4, 2, 2, 5]
    ref = None
    for world in (1, 2, 3):
        cfg, st, train = odd_setup(strategy, world, **{
            "train.batch_size_schedule": "warmup", "train.batch_size_min": 30,
            "train.batch_size_warmup_steps": 5})
        assert cfg.plan_batch_size() == 30  # balanced: a multiple of the 5 classes
        units = epoch_batches(cfg, st, train, 1, world).batches
        steps = [b for b, _ in group_units(units, iter(ks * 50).__next__)]
        assert np.array_equal(np.concatenate(steps), np.concatenate(units))  # nothing lost
        got = [s.tolist() for s in steps]
        ref = ref or got
        assert got == ref
        for s in steps:
            assert np.array_equal(np.concatenate([rank_slice(s, r, world) for r in range(world)]), s)


def test_a_random_plan_in_units_grouped_k_at_a_time_is_the_plan_at_k_units():
    cfg, st, train = odd_setup("random", 1, **{"train.batch_size_schedule": "warmup",
                                               "train.batch_size_min": 12,
                                               "train.batch_size_warmup_steps": 5})
    big, _, _ = odd_setup("random", 1, **{"train.global_batch_size": 36})
    units = epoch_batches(cfg, st, train, 2, 1).batches
    whole = epoch_batches(big, st, train, 2, 1).batches
    grouped = [b.tolist() for b, _ in group_units(units, lambda: 3)]
    assert grouped[: len(whole)] == [b.tolist() for b in whole]


@pytest.mark.parametrize(("overrides", "culprit"), [
    ({"train.batch_size_schedule": "adaptive"}, "train.batch_size_min"),
    ({"train.batch_size_schedule": "warmup", "train.batch_size_min": 7}, "train.batch_size_min=7"),
    ({"train.batch_size_schedule": "warmup", "train.batch_size_min": 12},
     "train.batch_size_warmup_steps"),
    ({"train.batch_size_schedule": "adaptive", "train.batch_size_min": 12,
      "train.noise_scale": False}, "train.noise_scale"),
    ({"train.batch_size_schedule": "adaptive", "train.batch_size_min": 15}, "scaling.num_workers"),
])
def test_schedule_config_refusals_name_the_key(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config(None, ["train.global_batch_size=60", "scaling.num_workers=2",
                           *[f"{k}={v}" for k, v in overrides.items()]])


def test_adaptive_on_one_worker_needs_a_micro_batch_below_the_unit():
    base = ["train.global_batch_size=64", "scaling.num_workers=1",
            "train.batch_size_schedule=adaptive", "train.batch_size_min=16"]
    with pytest.raises(ConfigError, match="train.micro_batch_size below"):
        load_config(None, [*base, "train.micro_batch_size=null"])
    assert load_config(None, [*base, "train.micro_batch_size=8"]).plan_batch_size() == 16


# -- the loop takes planned steps ---------------------------------------------------------------------
def test_planned_steps_carry_their_lr_and_count_samples_and_units():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return lambda size: [{"x": torch.randn(n, 3, generator=g),
                              "label": torch.randint(0, 2, (n,), generator=g)}]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, b):
            return self.lin(b["x"])

    state = LoopState(micro_batch_size=64)
    seen = []
    steps = [PlannedStep(batch(8), lr=0.1, batch_size=8, units=1),
             PlannedStep(batch(24), lr=0.3, batch_size=24, units=3)]
    m = train_epoch(M(), opt, steps, state, loss="cross_entropy",
                    on_step=lambda s, r: seen.append((r["lr"], r["global_batch_size"])))
    assert seen == [(0.1, 8.0), (0.3, 24.0)]
    assert (state.samples, state.units, state.batch_size) == (32, 4, 24)
    assert m["lr"] == 0.3 and math.isfinite(m["train_loss"])


def test_adaptive_keeps_its_batch_unless_the_best_is_5_percent_better():
    # phi = 400, c = 100: k = 6 is best, k = 7 within 0.3% of it: no change from 7; from 2
    # (goodput 0.363 against 0.480) it moves.
    assert goodput(7 * 32, 32, 400.0, 100.0) > 0.99 * goodput(6 * 32, 32, 400.0, 100.0)
    s = BatchSchedule("adaptive", unit=32, max_units=8, interval=1, step_cost=100.0, units=7)
    assert s.next_units(1, 400.0) == 7
    s.units = 2
    assert s.next_units(2, 400.0) == 6
