"""The gradient noise scale, measured during training from gradients the step computes anyway.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162), Appendix A: with the gradient G and per-example covariance Sigma, a batch of
B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes B_small < B_big give unbiased
estimates of both terms:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the simple noise scale is B_simple = tr(Sigma) / |G|^2, the batch size beyond which larger
batches buy less and less. Each estimate is noisy and |G|^2 can even come out negative, so the
two are smoothed by an EMA *before* the ratio: the mean of per-step ratios is biased
(`tests/engine/test_noise.py` shows both on a problem with a known answer).

Where the two batches come from (`pipeline.engine.step.train_step`):
- several workers: the small batch is one rank's share (its accumulated local gradient, read by
  a DDP communication hook just before the all-reduce, `attach_local_norm`), averaged over
  ranks; the big batch is the global batch (the all-reduced gradient);
- one worker with accumulation: the small batch is the first micro-batch with elements (its
  gradient is the accumulator after that micro-step), the big one the global batch;
- one worker, one micro-batch: there is no second batch size, and nothing is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class NoiseScale:
    """EMA-smoothed estimates of |G|^2 and tr(Sigma), and their ratio.

    >>> ns = NoiseScale(beta=0.0)  # no smoothing: the last step's estimates
    >>> # |G|^2 = 1, tr(Sigma) = 8: E|G_B|^2 = 1 + 8 / B, so at B = 2 and 8:
    >>> ns.update(sq_small=5.0, b_small=2, sq_big=2.0, b_big=8)
    8.0
    >>> ns.grad_sq, ns.trace
    (1.0, 8.0)
    """

    beta: float = 0.95  # EMA factor per step
    grad_sq: float = math.nan  # smoothed |G|^2
    trace: float = math.nan  # smoothed tr(Sigma)
    steps: int = 0
    per_sample: float = 1.0  # loss elements (tokens) per sample, smoothed alike (`update`)
    _g2: float = 0.0  # the raw EMAs behind grad_sq and trace
    _tr: float = 0.0
    _elements: float = 0.0  # ... and behind per_sample: loss elements, samples
    _samples: float = 0.0

    def update(self, *, sq_small: float, b_small: float, sq_big: float, b_big: float,
               elements: float = 1.0, samples: float = 1.0) -> float:
        """Feed one step's squared gradient norms at two batch sizes (B counted in loss
        elements, as the loss is normalised); return the noise scale. `elements` per `samples`:
        the step's loss elements (tokens, for a token-level loss) and samples, smoothed by the
        same EMA into `per_sample`, which turns the scale into samples (`value_samples`): a
        step's own ratio moved 12x between length buckets, and the scale in samples with it.

        >>> ns = NoiseScale(beta=0.5)
        >>> for tokens in (8, 283, 40):  # tokens per sample of three steps of 64 samples
        ...     _ = ns.update(sq_small=5.0, b_small=2, sq_big=2.0, b_big=8,
        ...                   elements=64 * tokens, samples=64)
        >>> round(ns.per_sample, 2)  # (8 / 8 + 283 / 4 + 40 / 2) / (1 / 8 + 1 / 4 + 1 / 2)
        104.86
        """
        if not b_big > b_small > 0:
            raise ValueError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
        g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
        tr = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
        if not (math.isfinite(g2) and math.isfinite(tr)):
            return self.value
        # Bias-corrected EMA (as Adam's moments): the first steps are not over-weighted.
        self.steps += 1
        self._g2 = self.beta * self._g2 + (1 - self.beta) * g2
        self._tr = self.beta * self._tr + (1 - self.beta) * tr
        correction = 1.0 - self.beta**self.steps
        self.grad_sq, self.trace = self._g2 / correction, self._tr / correction
        if elements > 0 and samples > 0:  # (a ratio of EMAs: the correction cancels)
            self._elements = self.beta * self._elements + (1 - self.beta) * elements
            self._samples = self.beta * self._samples + (1 - self.beta) * samples
            self.per_sample = self._elements / self._samples
        return self.value

    @property
    def value_samples(self) -> float:
        """The noise scale in samples, as batch sizes are (`value` is in loss elements)."""
        return self.value / self.per_sample

    @property
    def value(self) -> float:
        """B_simple = tr(Sigma) / |G|^2 of the smoothed estimates (nan until |G|^2 > 0; below
        0 while the smoothed tr(Sigma) is: the unbiased estimate of a noise too small for the
        batches to resolve -- the adaptive schedule and a sweep's report count only values
        above 0)."""
        if self.steps == 0 or not self.grad_sq > 0:
            return math.nan
        return self.trace / self.grad_sq

    def state_dict(self) -> dict[str, float]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, float], per_sample: float | None = None,
                        batch_size: int = 0) -> None:
        """`state` as `state_dict` gave it. One of a checkpoint written before `per_sample`
        was smoothed has none: `per_sample` (the loop's last ratio, kept beside it) seeds the
        smoothing, as if every step so far had had it and `batch_size` samples (the last
        step's; 0: unknown, the smoothing starts again from the next step) -- a restart from
        a step alone would bring back the jumps it smooths.

        >>> ns = NoiseScale(beta=0.5)
        >>> ns.load_state_dict({"steps": 2, "grad_sq": 1.0, "trace": 8.0}, per_sample=40.0,
        ...                    batch_size=64)
        >>> _ = ns.update(sq_small=5.0, b_small=2, sq_big=2.0, b_big=8, elements=64 * 8,
        ...               samples=64)
        >>> ns.per_sample  # (40 x 0.75 x 0.5 + 8 x 0.5) / (0.75 x 0.5 + 0.5)
        21.714285714285715
        """
        for key, value in state.items():
            setattr(self, key, value)
        if "per_sample" not in state and per_sample is not None:
            self.per_sample = per_sample
            mass = (1.0 - self.beta ** self.steps) * batch_size  # the EMA's, in samples
            self._elements, self._samples = per_sample * mass, mass


class LocalNorm:
    """A DDP communication hook's state: the squared norm of this rank's gradient buckets just
    before they are all-reduced (so: of the rank's own, accumulated gradient)."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None  # a device tensor: no host sync inside backward

    def take(self) -> torch.Tensor | None:
        """The squared norm gathered since the last call (None when no bucket was reduced)."""
        sq, self.sq = self.sq, None
        return sq


def _norm_then_allreduce(state, bucket):  # noqa: ANN001  (DDP checks unannotated or exact types)
    buf = bucket.buffer()
    sq = buf.detach().float().pow(2).sum()
    state.sq = sq if state.sq is None else state.sq + sq
    group = dist.group.WORLD
    fut = dist.all_reduce(buf.div_(dist.get_world_size(group)), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def attach_local_norm(ddp_model: nn.Module) -> LocalNorm:
    """Register a communication hook on a DDP model that records each rank's local gradient
    norm and then averages the buckets over ranks exactly as DDP's default does."""
    state = LocalNorm()
    ddp_model.register_comm_hook(state, _norm_then_allreduce)
    return state
