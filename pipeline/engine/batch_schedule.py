"""Batch-size schedules: the global batch of every optimizer step (pure Python, no Ray).

A schedule builds each step's global batch from whole *unit batches*: the epoch is planned with
the unit M0 = `train.batch_size_min` as its global batch size (`pipeline.data.epochs`), and a step
takes the next k unit batches of the epoch, k = 1 .. K with K = global_batch_size / M0 (the last
step of an epoch takes what is left). The batches are therefore a function of the data, seed,
epoch and the sequence of k's -- never of the worker count: each rank takes its slice of the
concatenated units, and grows it through accumulation (the micro-batch stays the size that fits).
A random plan cut into units and concatenated k at a time is the same as one cut into k-unit
batches; a stratified or length-bucketed plan stays balanced unit by unit.

- `constant`: k = K every step (the ordinary fixed batch; its unit is the global batch).
- `warmup`: a fixed linear ramp of k from 1 to K over `train.batch_size_warmup_steps` optimizer
  steps. GPT-3 (Brown et al. 2020, Appendix B) ramps its batch linearly over the first tokens;
  Merrill et al. 2025 (arXiv 2505.23971) show why: the critical batch starts near 0 and grows,
  and a batch-size warmup reached OLMo-1B's loss with 43% fewer gradient steps.
  Its k's are a function of the step alone, so a warmup run's steps are too.
- `adaptive`: every `train.batch_size_interval` steps, the k that maximises goodput (Pollux,
  Qiao et al. OSDI'21, sec. 3): the statistical efficiency of a batch M against the unit M0,

      E(M) = (phi + M0) / (phi + M),       phi = the gradient noise scale (in samples),

  (McCandlish et al. 2018: one step at M makes E(M) * M / M0 steps' worth of progress at M0),
  times the throughput M / T(M), with the step time T(M) = a + b M. Goodput is then
  proportional to M (phi + M0) / ((c + M)(phi + M)) with c = a / b, the fixed cost of a step in
  samples' worth of compute; its maximum over real M is at M* = sqrt(c phi), so the batch grows
  as the noise scale grows. The batch changes only when the best k promises 5% more goodput
  than the current one, so that noise in the estimates does not make it flap.

  c comes from `train.batch_size_step_cost` when set (a deterministic schedule), else from the run:
  the first interval is timed at k = 1, the second at k = min(4, K), and a line through the
  median step time of each size gives a and b (step times averaged over ranks, so every rank
  decides alike; medians, so that a validation pass or a busy moment does not move the line).
  Four units, not two: on a shared machine a step's time varies by a factor of 2-3 from step
  to step, and 1 and 2 units differ by less than that (c from 0 to 3,040 samples between runs
  of the same trial, README); 1 and 4 units differ by 3 units' compute. At every later
  decision the line is fitted again through the last 200 steps, which span the batch sizes
  the schedule chose since, so c sharpens as the run goes on -- while they hold two sizes of
  at least 5 steps each, the larger at least twice the smaller (a settled schedule's window
  holds one size and each epoch's short last step: a line through those is the step-to-step
  noise, and set c anywhere up to inf); otherwise c stays as last fitted. A measured c makes the
  schedule depend on timing: it is logged, and kept in checkpoints so a resume goes on with
  the same model. The k's themselves are therefore the worker count's too: the noise scale is
  measured from each rank's share (the small batch) and a measured c from the cluster's step
  times, so 1 and 4 workers cut the same unit batches into steps differently.

    >>> best_units(phi=400.0, unit=32, max_units=32, step_cost=100.0)  # M* = sqrt(100*400) = 200
    6
    >>> warmup_units(0, 8, 10), warmup_units(5, 8, 10), warmup_units(10, 8, 10)
    (1, 4, 8)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEDULES = ("constant", "warmup", "adaptive")
MARGIN = 0.05  # adaptive: change the batch only for 5% more goodput (no flapping on noise)
EXPLORE_UNITS = 4  # adaptive, c measured: the second interval's k (the first is timed at 1)
REFIT_STEPS, REFIT_SPAN = 5, 2.0  # a later fit: sizes of 5+ steps each, the largest 2x the least


def efficiency(batch: float, unit: float, phi: float) -> float:
    """Statistical efficiency E(M) = (phi + M0) / (phi + M) of batch M against the unit M0.

    >>> efficiency(64, 32, 32.0)  # twice the unit at phi = M0: 2/3 of the progress per sample
    0.6666666666666666
    """
    return (phi + unit) / (phi + batch)


def goodput(batch: float, unit: float, phi: float, step_cost: float) -> float:
    """Progress per unit time, up to a constant: E(M) x M / (c + M) (throughput M / (a + b M)
    with c = a / b). Larger is better; compare values of the same (unit, phi, c) only.
    c = inf (a step's time does not grow with its batch): E(M) x M, the limit up to 1 / c.

    >>> goodput(64, 32, 32.0, math.inf) > goodput(32, 32, 32.0, math.inf)
    True
    """
    if math.isinf(step_cost):
        return efficiency(batch, unit, phi) * batch
    return efficiency(batch, unit, phi) * batch / (step_cost + batch)


def best_units(phi: float, unit: int, max_units: int, step_cost: float) -> int:
    """The k in 1..max_units whose batch k * unit has the highest goodput (the smallest k on a
    tie). A noise scale that is not yet measured (nan) or not positive gives 1."""
    if not (math.isfinite(phi) and phi > 0):
        return 1
    scores = [goodput(k * unit, unit, phi, step_cost) for k in range(1, max_units + 1)]
    return int(np.argmax(scores)) + 1


def warmup_units(step: int, max_units: int, ramp_steps: int) -> int:
    """k at optimizer step `step` (0-based) of a linear ramp from 1 unit to `max_units` over
    `ramp_steps` steps (rounded down, so the full batch starts exactly at `ramp_steps`)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return max_units
    return 1 + (max_units - 1) * step // ramp_steps


def ramp_steps(epoch_units: Sequence[int], max_units: int, ramp: int,
               max_steps: float = math.inf) -> Iterator[tuple[int, int]]:
    """The optimizer steps of a `warmup` ramp (over `ramp` steps) over epochs of `epoch_units`
    unit batches, as training groups them (`group_units`: an epoch's last step takes what is
    left of it), up to `max_steps` steps: (k the ramp asks for, the unit batches it takes).

    >>> list(ramp_steps([5, 5], max_units=4, ramp=4, max_steps=5))
    [(1, 1), (1, 1), (2, 2), (3, 1), (4, 4)]
    """
    step = 0
    for left in epoch_units:
        while left > 0 and step < max_steps:
            k = warmup_units(step, max_units, ramp)
            yield k, min(k, left)
            left, step = left - k, step + 1


def fit_step_cost(sizes: Sequence[float], seconds: Sequence[float]) -> float | None:
    """c = a / b of the least-squares line T(M) = a + b M through the median step time of each
    batch size (medians: a step slowed by a validation pass, an epoch's set-up or a busy
    machine does not move the line); None when the sizes do not vary or the fit has no positive
    slope. A negative intercept (noise) gives 0.

    >>> fit_step_cost([32, 64, 32, 64], [0.5, 0.6, 0.5, 0.6])  # a = 0.4, b = 1/320 -> c = 128
    128.0
    """
    m, t = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    if len(m) < 2 or np.ptp(m) == 0:
        return None
    levels = np.unique(m)
    medians = np.array([np.median(t[m == level]) for level in levels])
    b, a = np.polyfit(levels, medians, 1)
    if not b > 0:
        return None
    return round(float(max(a, 0.0) / b), 6)


@dataclass
class BatchSchedule:
    """Chooses k (unit batches per step) for each optimizer step; see the module docstring.

    `agree` averages a list of floats over ranks (an all-reduce; identity with one rank), so
    that the measured step cost, and so every decision, is the same on every rank.
    """

    kind: str
    unit: int  # M0: the plan's global batch size
    max_units: int  # K: global_batch_size / unit
    ramp_steps: int = 0  # warmup
    interval: int = 10  # adaptive: steps between decisions
    step_cost: float | None = None  # adaptive: c; None = measure in the run
    measured: bool = False  # whether step_cost came from the run's timings
    units: int = 1  # the current k
    timings: list[tuple[int, float]] = field(default_factory=list)  # (batch, seconds) per step
    decisions: int = 0
    phi: float = field(default=math.nan, compare=False)  # the noise scale of the last decision
    # the next step observed is this process's first (allocators and kernels warming up: its
    # time is not the step's); a fresh schedule, as after a restart or resume, starts cold
    cold: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown batch-size schedule {self.kind!r}; known: {SCHEDULES}")
        if self.kind == "constant":
            self.units = self.max_units

    def next_units(self, step: int, phi_samples: float,
                   agree: Callable[[list[float]], list[float]] | None = None) -> int:
        """k for optimizer step `step` (0-based), given the noise scale in samples."""
        if self.kind == "constant":
            return self.max_units
        if self.kind == "warmup":
            self.units = warmup_units(step, self.max_units, self.ramp_steps)
            return self.units
        if step == 0 or step % self.interval:
            return self.units
        if agree is not None:  # every rank decides with one noise scale (each measured its
            phi_samples = agree([phi_samples])[0]  # own: alike only with identical kernels)
        self.phi = phi_samples
        self.decisions += 1
        if self.step_cost is None and step == self.interval and self.max_units > 1:
            # explore: time the next interval at more units, so T(M) = a + b M has two sizes
            self.units = min(EXPLORE_UNITS, self.max_units)
            return self.units
        if self.step_cost is None or self.measured:
            self._fit(agree)
        if self.step_cost is not None and math.isfinite(phi_samples) and phi_samples > 0:
            best = best_units(phi_samples, self.unit, self.max_units, self.step_cost)
            now = goodput(self.units * self.unit, self.unit, phi_samples, self.step_cost)
            if goodput(best * self.unit, self.unit, phi_samples, self.step_cost) > (1 + MARGIN) * now:
                self.units = best
        return self.units

    def planned(self, step: int) -> int | None:
        """k at optimizer step `step` where it is known in advance (constant, warmup: a function
        of the step), None where it is decided in the run (adaptive): what the streaming mode
        fetches rows ahead for (`StreamedRows.steps`).

        >>> BatchSchedule("warmup", unit=8, max_units=4, ramp_steps=6).planned(3)
        2
        >>> BatchSchedule("adaptive", unit=8, max_units=4).planned(3) is None
        True
        """
        if self.kind == "constant":
            return self.max_units
        if self.kind == "warmup":
            return warmup_units(step, self.max_units, self.ramp_steps)
        return None

    def observe(self, batch: int, seconds: float) -> None:
        """Record one step's wall time (adaptive without a configured step cost), but for the
        first step of the process (`cold`)."""
        if self.kind == "adaptive" and (self.step_cost is None or self.measured):
            if self.cold:
                self.cold = False
                return
            self.timings = [*self.timings[-199:], (int(batch), float(seconds))]

    def _fit(self, agree: Callable[[list[float]], list[float]] | None) -> None:
        timed = self.timings
        if self.measured:  # a later fit: only through sizes timed often enough, far enough apart
            counts = {m: n for m, n in Counter(m for m, _ in timed).items() if n >= REFIT_STEPS}
            if len(counts) < 2 or max(counts) < REFIT_SPAN * min(counts):
                return  # (every rank alike: the sizes are the same on all)
            timed = [(m, t) for m, t in timed if m in counts]
        if not timed:
            return
        sizes = [float(m) for m, _ in timed]
        seconds = [s for _, s in timed]
        if agree is not None:
            seconds = agree(seconds)
        cost = fit_step_cost(sizes, seconds)
        if cost is None and len(set(sizes)) > 1:
            # Two sizes timed and the larger no slower: a fixed cost dominates the step (c = inf:
            # the largest batch has the best goodput). Left unset, the schedule stayed at the
            # explored size for good (the window soon holding that size alone: nothing to fit).
            cost = math.inf
        if cost is not None:
            self.step_cost, self.measured = cost, True

    def state_dict(self) -> dict[str, object]:
        return {"units": self.units, "step_cost": self.step_cost, "measured": self.measured,
                "timings": list(self.timings), "decisions": self.decisions}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.units = int(state["units"])
        self.step_cost = None if state["step_cost"] is None else float(state["step_cost"])
        self.measured = bool(state["measured"])
        self.timings = [(int(m), float(s)) for m, s in state["timings"]]
        self.decisions = int(state["decisions"])


def group_units(batches: Sequence[np.ndarray], units: Callable[[], int]
                ) -> Iterator[tuple[np.ndarray, int]]:
    """The epoch's steps from its unit batches: ask `units()` before each step for k, take the
    next k unit batches (fewer at the epoch's end) and yield (their concatenation, how many).

    >>> [b.tolist() for b, _ in group_units([np.arange(2), np.arange(2, 4), np.arange(4, 6)],
    ...                                     lambda: 2)]
    [[0, 1, 2, 3], [4, 5]]
    """
    i = 0
    while i < len(batches):
        k = max(1, int(units()))
        group = batches[i : i + k]
        i += len(group)
        yield (group[0] if len(group) == 1 else np.concatenate(group)), len(group)
