"""Pacing functions against values worked out by hand from the papers' formulas, monotonicity,
and 1 at the end of pacing.

Platanios et al. 2019 ("Competence-based curriculum learning for neural machine translation",
NAACL), with p = t / T:
    c_linear(p) = min(1, p (1 - c0) + c0)        c_sqrt(p) = min(1, sqrt(p (1 - c0^2) + c0^2))
Hacohen & Weinshall 2019 ("On the power of curriculum learning in training deep networks",
ICML), fixed exponential pacing with step length T / steps:
    g(p) = min(1, c0 * growth ** floor(p * steps))
Each expected value below is the formula evaluated by hand (the arithmetic in the comment), so
the test does not recompute the code's own expression."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.pacing import PACINGS, competence

# (kind, progress, kwargs, expected): every kind in PACINGS has at least two cases.
REFERENCE = [
    # linear: c0 + p (1 - c0)
    ("linear", 0.0, {"c0": 0.1}, 0.1),
    ("linear", 0.5, {"c0": 0.1}, 0.55),  # 0.1 + 0.5 * 0.9
    ("linear", 0.25, {"c0": 0.2}, 0.4),  # 0.2 + 0.25 * 0.8
    ("linear", 0.5, {"c0": 0.01}, 0.505),  # the paper's c0 = 0.01, half-way
    # root: sqrt(c0^2 + p (1 - c0^2)), picked so the square root is exact where possible
    ("root", 0.0, {"c0": 0.1}, 0.1),  # sqrt(0.01)
    ("root", 13 / 64, {"c0": 0.6}, 0.7),  # 0.36 + 0.203125 * 0.64 = 0.49
    ("root", 7 / 16, {"c0": 0.6}, 0.8),  # 0.36 + 0.4375 * 0.64 = 0.64
    ("root", 0.5, {"c0": 0.1}, 0.7106335201775947),  # sqrt(0.01 + 0.5 * 0.99) = sqrt(0.505)
    ("root", 0.5, {"c0": 0.01}, 0.7071421356417675),  # sqrt(0.0001 + 0.49995) = sqrt(0.50005)
    # step: c0 + (1 - c0) floor(p steps) / steps
    ("step", 0.0, {"c0": 0.2, "steps": 4}, 0.2),
    ("step", 0.24, {"c0": 0.2, "steps": 4}, 0.2),  # floor(0.96) = 0
    ("step", 0.25, {"c0": 0.2, "steps": 4}, 0.4),  # 0.2 + 0.8 * 1/4
    ("step", 0.6, {"c0": 0.2, "steps": 4}, 0.6),  # floor(2.4) = 2: 0.2 + 0.8 * 2/4
    ("step", 0.99, {"c0": 0.2, "steps": 4}, 0.8),  # floor(3.96) = 3: 0.2 + 0.8 * 3/4
    # exponential: c0 growth^floor(p steps), capped at 1
    ("exponential", 0.0, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.1),
    ("exponential", 0.3, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.2),  # 0.1 * 2^1
    ("exponential", 0.5, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.4),  # 0.1 * 2^2
    ("exponential", 0.8, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.8),  # 0.1 * 2^3
    ("exponential", 0.5, {"c0": 0.3, "steps": 4, "growth": 2.0}, 1.0),  # 0.3 * 4 = 1.2 -> 1
    ("exponential", 0.75, {"c0": 0.04, "steps": 4, "growth": 1.5}, 0.135),  # 0.04 * 1.5^3
    # 2^500 x 0.1 -> 1 (2.0 ** 1024 would raise OverflowError: 2,000 steps, half-way)
    ("exponential", 0.5, {"c0": 0.1, "steps": 2000, "growth": 2.0}, 1.0),
    ("exponential", 0.9, {"c0": 0.1, "steps": 2000, "growth": 2.0}, 1.0),  # k = 1,800
    ("exponential", 0.001, {"c0": 0.1, "steps": 2000, "growth": 2.0}, 0.4),  # k = 2: 0.1 * 4
    # none: the whole pool from the start
    ("none", 0.0, {}, 1.0),
    ("none", 0.5, {"c0": 0.1}, 1.0),
]


def test_every_pacing_has_reference_values():
    """A kind added to PACINGS without hand-computed values fails here."""
    assert {case[0] for case in REFERENCE} == set(PACINGS)
    for kind in PACINGS:
        assert sum(case[0] == kind for case in REFERENCE) >= 2, kind


@pytest.mark.parametrize(("kind", "progress", "kwargs", "expected"), REFERENCE)
def test_hand_computed(kind, progress, kwargs, expected):
    assert competence(progress, kind, **kwargs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("c0", [0.01, 0.1, 0.5, 0.9])
def test_root_gives_more_of_the_pool_than_linear(c0):
    """c_sqrt >= c_linear over the pacing, equal at both ends -- why Platanios et al. prefer it
    (less time on the easiest samples). By hand: c_sqrt^2 - c_linear^2 = p (1 - p) (1 - c0)^2."""
    for p in np.linspace(0.0, 1.0, 41):
        root, linear = competence(p, "root", c0=c0), competence(p, "linear", c0=c0)
        assert root**2 - linear**2 == pytest.approx(p * (1 - p) * (1 - c0) ** 2, abs=1e-12)
    assert competence(0.0, "root", c0=c0) == pytest.approx(competence(0.0, "linear", c0=c0))


@pytest.mark.parametrize("kind", PACINGS)
@pytest.mark.parametrize("c0", [0.01, 0.1, 0.37, 1.0])
def test_monotone_in_range_and_one_at_end(kind, c0):
    grid = np.linspace(0.0, 1.5, 301)
    values = np.array([competence(p, kind, c0=c0, steps=5, growth=1.5) for p in grid])
    assert np.all(np.diff(values) >= 0)
    assert np.all((values > 0) & (values <= 1))
    assert competence(1.0, kind, c0=c0, steps=5, growth=1.5) == 1.0
    assert competence(7.0, kind, c0=c0) == 1.0
    assert competence(math.inf, kind, c0=c0) == 1.0
    if kind != "none":
        assert values[0] == pytest.approx(c0)


def test_a_step_starts_at_its_epoch_though_the_progress_is_rounded_in_floats():
    """Epoch e of P = steps epochs is step e exactly: 15 / 22 x 22 is 14.999... in floats,
    which put epoch 15 of 22 on step 14 (c0 + (1 - c0) 14/22) -- one step late. By hand:
    0.1 + 0.9 x 15/22 = 0.71363..., and 0.1 x 2^15 > 1."""
    assert 15 / 22 * 22 < 15  # (the float that floor() met)
    assert competence(15 / 22, "step", c0=0.1, steps=22) == pytest.approx(0.1 + 0.9 * 15 / 22)
    for e, p in ((13, 23), (31, 39)):  # two more such cases
        assert competence(e / p, "step", c0=0.1, steps=p) == pytest.approx(0.1 + 0.9 * e / p)
    assert competence(15 / 22, "exponential", c0=0.001, steps=22, growth=1.5) == \
        pytest.approx(0.001 * 1.5**15)
    # every epoch e < P of P <= 60 epochs paced in P steps: step e
    for p in range(1, 61):
        for e in range(p):
            assert competence(e / p, "step", c0=0.1, steps=p) == pytest.approx(0.1 + 0.9 * e / p)


def test_exponential_reaches_one_even_when_growth_is_slow():
    # 0.1 * 1.1**3 = 0.1331 just before the end; the pool is whole once pacing is over.
    assert competence(0.99, "exponential", c0=0.1, steps=4, growth=1.1) == pytest.approx(0.1331)
    assert competence(1.0, "exponential", c0=0.1, steps=4, growth=1.1) == 1.0


def test_errors():
    with pytest.raises(ValueError, match="unknown pacing 'quadratic'; known: .*'linear'"):
        competence(0.5, "quadratic")
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="c0"):
            competence(0.5, "linear", c0=bad)
    with pytest.raises(ValueError, match="progress"):
        competence(-0.1, "linear")
    with pytest.raises(ValueError, match="progress"):
        competence(float("nan"), "linear")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            competence(0.5, "step", steps=bad)
    with pytest.raises(ValueError, match="growth"):
        competence(0.5, "exponential", growth=0.5)
