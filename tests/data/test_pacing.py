"""Pacing functions: hand-computed values, monotonicity, 1 at the end of pacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.pacing import PACINGS, competence


def test_known_kinds():
    assert set(PACINGS) == {"linear", "root", "step", "exponential", "none"}


@pytest.mark.parametrize(
    ("kind", "progress", "kwargs", "expected"),
    [
        ("linear", 0.0, {"c0": 0.1}, 0.1),
        ("linear", 0.5, {"c0": 0.1}, 0.55),
        ("linear", 0.25, {"c0": 0.2}, 0.4),
        ("root", 0.0, {"c0": 0.1}, 0.1),
        ("root", 0.5, {"c0": 0.1}, math.sqrt(0.5 * 0.99 + 0.01)),  # 0.71063...
        ("root", 0.25, {"c0": 0.5}, math.sqrt(0.25 * 0.75 + 0.25)),
        ("step", 0.0, {"c0": 0.2, "steps": 4}, 0.2),
        ("step", 0.24, {"c0": 0.2, "steps": 4}, 0.2),
        ("step", 0.25, {"c0": 0.2, "steps": 4}, 0.4),
        ("step", 0.6, {"c0": 0.2, "steps": 4}, 0.6),
        ("step", 0.99, {"c0": 0.2, "steps": 4}, 0.8),
        ("exponential", 0.0, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.1),
        ("exponential", 0.3, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.2),
        ("exponential", 0.5, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.4),
        ("exponential", 0.8, {"c0": 0.1, "steps": 4, "growth": 2.0}, 0.8),
        ("exponential", 0.5, {"c0": 0.3, "steps": 4, "growth": 2.0}, 1.0),  # capped
        ("none", 0.0, {}, 1.0),
    ],
)
def test_hand_computed(kind, progress, kwargs, expected):
    assert competence(progress, kind, **kwargs) == pytest.approx(expected, rel=1e-12)


def test_root_value_spelled_out():
    assert competence(0.5, "root", c0=0.1) == pytest.approx(0.7106335, abs=1e-7)


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


def test_exponential_reaches_one_even_when_growth_is_slow():
    # 0.1 * 1.1**4 < 1, yet the pool is whole once pacing is over.
    assert competence(0.99, "exponential", c0=0.1, steps=4, growth=1.1) < 0.2
    assert competence(1.0, "exponential", c0=0.1, steps=4, growth=1.1) == 1.0


def test_errors():
    with pytest.raises(ValueError, match="linear"):
        competence(0.5, "quadratic")
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="c0"):
            competence(0.5, "linear", c0=bad)
    with pytest.raises(ValueError, match="progress"):
        competence(-0.1, "linear")
    with pytest.raises(ValueError, match="steps"):
        competence(0.5, "step", steps=0)
    with pytest.raises(ValueError, match="growth"):
        competence(0.5, "exponential", growth=0.5)
