"""Contrastive loss: SimCLR's NT-Xent generalised to any number of views per sample (pure torch).

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
eq. 1: for a positive pair (i, j) among 2N augmented rows,

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

with ``sim`` the cosine similarity; the loss is the mean of l over all 2N anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def nt_xent(
    embeddings: torch.Tensor,
    view_to_sample: torch.Tensor,
    temperature: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Normalized temperature-scaled cross-entropy over rows that are views of samples.

    ``embeddings`` is ``[R, D]`` (R rows, any order), ``view_to_sample`` is ``(R,)``: the sample
    each row is a view of. Rows with equal ``view_to_sample`` are positives of each other; all
    other rows are negatives. Exactly:

    1. ``z = embeddings / ||embeddings||`` row-wise (L2-normalised);
    2. ``s = z @ z.T / temperature``, with the diagonal set to ``-inf`` (no self-similarity);
    3. ``log_p[a, k] = s[a, k] - logsumexp_{m != a} s[a, m]`` (log-softmax over the other rows);
    4. for anchor ``a`` with positive set ``P(a) = {k != a : view_to_sample[k] ==
       view_to_sample[a]}``: ``loss[a] = -(1 / |P(a)|) * sum_{k in P(a)} log_p[a, k]``.

    With two views per sample ``|P(a)| = 1`` and ``loss[a]`` is exactly ``l(a, j)`` of eq. 1,
    so the "mean" reduction is SimCLR's loss ``1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``. With V
    views every anchor averages over its V - 1 positives (the softmax denominator still runs
    over all R - 1 other rows, positives included, as in eq. 1).

    ``reduction``: "mean" (over anchors), "sum", or "none" (``(R,)`` per-anchor losses).
    Every row needs at least one positive, else ``ValueError``. Half-precision inputs are
    computed in float32; the result has the computation's dtype.

    >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> loss = nt_xent(z, torch.tensor([0, 0, 1, 1]), temperature=0.5)
    >>> expected = torch.log(1 + 2 * torch.exp(torch.tensor(-2.0)))  # log(1 + (2N-2) e^{-1/tau})
    >>> bool(torch.isclose(loss, expected))
    True
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [rows, dim], got shape {tuple(embeddings.shape)}")
    view_to_sample = view_to_sample.reshape(-1).to(embeddings.device)
    rows = embeddings.shape[0]
    if view_to_sample.shape[0] != rows:
        raise ValueError(f"view_to_sample has {view_to_sample.shape[0]} entries for {rows} rows")

    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    z = F.normalize(embeddings, dim=1)
    self_mask = torch.eye(rows, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_p = F.log_softmax(sim, dim=1)

    positives = (view_to_sample[:, None] == view_to_sample[None, :]) & ~self_mask
    num_pos = positives.sum(dim=1)
    if bool((num_pos == 0).any()):
        raise ValueError("every row needs at least one other view of its sample (a positive)")
    # masked_fill, not multiplication: log_p is -inf on the diagonal and -inf * 0 is nan.
    per_anchor = -log_p.masked_fill(~positives, 0.0).sum(dim=1) / num_pos

    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor
