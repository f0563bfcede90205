"""LR scaling rules and the per-step LR schedule (pure functions of the step).

Scaling from a base batch size B0 at base LR lr0 to a global batch B:
- none:   lr = lr0
- linear: lr = lr0 * B / B0              (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.1)
- sqrt:   lr = lr0 * sqrt(B / B0)        (Krizhevsky 2014, "One weird trick", sec. 5; Hoffer et al. 2017)

Gradual warmup (Goyal et al. 2017, sec. 2.2): the LR ramps linearly from lr0 to the scaled LR
over the warmup steps, then follows the schedule (constant, step decay x0.1 at 50% and 75% of
the remaining steps, or cosine to zero). A batch below B0 (a batch-size schedule's first
steps, say) scales the LR below lr0: there is nothing to warm up to, and the ramp starts at
the scaled LR itself rather than above it.
"""

from __future__ import annotations

import math


def scale_lr(base_lr: float, base_batch_size: int, global_batch_size: int, rule: str) -> float:
    """The LR for `global_batch_size` under `rule`, from `base_lr` at `base_batch_size`.

    Goyal et al.'s ImageNet setting, base LR 0.1 at batch 256, at batch 1024 (4x):

    >>> scale_lr(0.1, 256, 1024, "linear"), scale_lr(0.1, 256, 1024, "sqrt")
    (0.4, 0.2)
    """
    ratio = global_batch_size / base_batch_size
    if rule == "none":
        return base_lr
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"unknown LR scaling rule {rule!r}; known: none, linear, sqrt")


def lr_at(
    step: int,
    *,
    base_lr: float,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "constant",
) -> float:
    """The LR applied at optimizer step `step` (0-based).

    >>> [round(lr_at(s, base_lr=0.1, peak_lr=0.5, warmup_steps=4, total_steps=10), 3)
    ...  for s in range(6)]
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
    >>> [lr_at(s, base_lr=0.1, peak_lr=0.025, warmup_steps=4, total_steps=10) for s in (0, 2)]
    [0.025, 0.025]
    >>> [round(lr_at(s, base_lr=0.1, peak_lr=0.4, warmup_steps=5, total_steps=6,
    ...                schedule="cosine"), 3) for s in (4, 5)], lr_at(
    ...     0, base_lr=0.1, peak_lr=0.4, warmup_steps=0, total_steps=1, schedule="cosine")
    ([0.34, 0.4], 0.4)
    """
    if warmup_steps > 0 and step < warmup_steps:
        start = min(base_lr, peak_lr)  # never above the LR the ramp leads to
        return start + (peak_lr - start) * step / warmup_steps
    # The last step trained (total_steps - 1) is the schedule's end: progress runs 0 -> 1 over
    # the steps after warmup, so a cosine run ends exactly at 0 and a step schedule at 0.01.
    # With no room to decay (one step after warmup, or a one-step run) that step is the peak:
    # an end at 0 would train nothing.
    decay_steps = total_steps - 1 - warmup_steps
    progress = 0.0 if decay_steps <= 0 else min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        return peak_lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; known: constant, step, cosine")
