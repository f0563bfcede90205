"""BatchNorm and how a batch is split (pure PyTorch).

BatchNorm is the one layer whose output for a sample depends on the other samples of its batch,
so it is where "the update does not depend on how the batch is split" stops being true:

- **Micro-batching is Ghost Batch Normalization.** Each micro-batch is normalised over its own
  rows, so a step of global batch B in micro-batches of b is the step of a model whose BatchNorm
  normalises over "ghost batches" of b rows (Hoffer, Hubara & Soudry 2017, "Train longer,
  generalize better", arXiv 1705.08741, sec. 4), with the running statistics updated once per
  ghost batch. `ghost_batch_norm(model, b)` makes a model do exactly that on a whole batch, so
  the claim is testable: one step over micro-batches of b == one whole-batch step under
  `ghost_batch_norm(model, b)`. Without SyncBatchNorm each rank's share is its own ghost batch
  too; with SyncBatchNorm (GPU) the ghost batch is the micro-batch summed over ranks.
- **Activation checkpointing recomputes the forward in backward.** A BatchNorm in a recomputed
  block would update its running statistics a second time; `running_stats_frozen` runs the
  recompute with the batch's statistics, then puts the buffers back (see
  `pipeline.engine.models.checkpointed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BN)]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any layer of `model` is a BatchNorm (its update then depends on the split).

    >>> has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))), has_batchnorm(nn.Linear(2, 2))
    (True, False)
    """
    return bool(batchnorm_layers(model))


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Inside, training-mode BatchNorm still normalises with the batch's statistics and may
    update its buffers; on leaving, `running_mean`, `running_var` and `num_batches_tracked`
    are put back as they were (in place, so the tensors autograd saved stay the same objects).

    >>> bn = nn.BatchNorm1d(2)
    >>> with running_stats_frozen(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> int(bn.num_batches_tracked), bn.running_mean.tolist()
    (0, [0.0, 0.0])
    """
    saved = [(buf, buf.detach().clone()) for m in batchnorm_layers(model)
             for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _ghost_forward(bn: nn.modules.batchnorm._BatchNorm, size: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training and bn.running_mean is not None:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                0.0, bn.eps)
        # (no running statistics, track_running_stats=False: batch statistics in eval too)
        parts = []
        for chunk in x.split(size, dim=0):  # each ghost batch in turn, as micro-steps run
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            parts.append(F.batch_norm(chunk, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                      True, momentum, bn.eps))
        return torch.cat(parts, dim=0)

    return forward


@contextlib.contextmanager
def ghost_batch_norm(model: nn.Module, size: int) -> Iterator[None]:
    """Inside: every BatchNorm of `model` normalises consecutive chunks of `size` rows of its
    input separately (Ghost Batch Normalization), updating running statistics once per chunk.

    >>> bn = nn.BatchNorm1d(1, affine=False)
    >>> x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    >>> with ghost_batch_norm(bn, 2):
    ...     y = bn(x)
    >>> [round(v, 3) for v in y.flatten().tolist()]  # each pair normalised on its own
    [-1.0, 1.0, -1.0, 1.0]
    >>> int(bn.num_batches_tracked)
    2
    """
    if size < 1:
        raise ValueError(f"ghost batch size must be >= 1, got {size}")
    layers = batchnorm_layers(model)
    for m in layers:
        m.forward = _ghost_forward(m, size)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m in layers:
            del m.forward
