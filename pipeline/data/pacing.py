"""Curriculum pacing: how much of the (easiest-first) pool a model may see, as a pure function.

`competence(progress, kind)` maps training progress ``t / T`` (``T`` = pacing length, e.g. in
epochs) to the fraction ``c`` in ``(0, 1]`` of the easiest samples that form the pool. Every
kind is monotone non-decreasing in progress and equals 1 once ``progress >= 1`` (pacing over).

Kinds (``p = progress``, ``c0`` = initial competence):

- ``"linear"``      ``c = min(1, p * (1 - c0) + c0)``  (Platanios et al. 2019, NAACL,
  "Competence-based curriculum learning for neural machine translation").
- ``"root"``        ``c = min(1, sqrt(p * (1 - c0**2) + c0**2))``  (Platanios et al. 2019).
- ``"step"``        ``c = min(1, c0 + (1 - c0) * floor(p * steps) / steps)``: ``c0`` for the
  first ``1/steps`` of pacing, then ``steps`` equal increments, reaching 1 at ``p = 1``.
- ``"exponential"`` fixed exponential pacing (Hacohen & Weinshall 2019, "On the power of
  curriculum learning in training deep networks"):
  ``c = min(1, c0 * growth ** floor(p * steps))`` for ``p < 1`` and ``c = 1`` for ``p >= 1``
  (so the pool is whole at the end of pacing even when ``c0 * growth**steps < 1``).
- ``"none"``        ``c = 1``.

Worked example:

    >>> round(competence(0.5, "root", c0=0.1), 4)
    0.7106
    >>> competence(0.5, "linear", c0=0.1)
    0.55
    >>> [round(competence(p, "step", c0=0.2, steps=4), 6) for p in (0.0, 0.25, 0.5, 1.0)]
    [0.2, 0.4, 0.6, 1.0]
    >>> [competence(p, "exponential", c0=0.1, steps=4, growth=2.0) for p in (0, 0.3, 0.8, 1)]
    [0.1, 0.2, 0.8, 1.0]
"""

from __future__ import annotations

import math

PACINGS: tuple[str, ...] = ("linear", "root", "step", "exponential", "none")


def competence(
    progress: float, kind: str, *, c0: float = 0.1, steps: int = 4, growth: float = 2.0
) -> float:
    """Fraction in ``(0, 1]`` of the easiest samples available at ``progress = t / T``.

    ``progress`` must be a non-negative number (``inf`` is allowed: pacing over). ``c0`` must
    lie in ``(0, 1]``; ``steps`` (step / exponential) must be an integer >= 1 and ``growth``
    (exponential) must be >= 1 so the schedule is monotone. Raises ValueError otherwise, and
    for an unknown ``kind`` (the message lists `PACINGS`).
    """
    if kind not in PACINGS:
        raise ValueError(f"unknown pacing {kind!r}; known: {list(PACINGS)}")
    c0 = float(c0)
    if not (0.0 < c0 <= 1.0):
        raise ValueError(f"c0 must be in (0, 1], got {c0}")
    p = float(progress)
    if math.isnan(p) or p < 0:
        raise ValueError(f"progress must be >= 0, got {progress}")
    if kind == "none" or p >= 1.0:
        return 1.0
    if kind == "linear":
        return min(1.0, p * (1.0 - c0) + c0)
    if kind == "root":
        return min(1.0, math.sqrt(p * (1.0 - c0 * c0) + c0 * c0))
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    # (+1e-9: progress 15 / 22 of 22 steps is 14.999... in floats, and its step 15 came late)
    k = math.floor(p * int(steps) + 1e-9)
    if kind == "step":
        return min(1.0, c0 + (1.0 - c0) * k / int(steps))
    # exponential
    if not (float(growth) >= 1.0):
        raise ValueError(f"growth must be >= 1, got {growth}")
    if k * math.log(float(growth)) > 1.0 - math.log(c0):  # c0 growth^k > e: the whole pool
        return 1.0  # (growth ** k overflows a float from k ~ 1,000 at growth 2)
    return min(1.0, c0 * float(growth) ** k)
