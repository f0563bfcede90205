"""Tests of pipeline.engine.contrastive.nt_xent (pure torch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.engine.contrastive import nt_xent


def _layout(n: int, v: int) -> torch.Tensor:
    return torch.arange(n).repeat(v)  # view v of sample i at row v * n + i


def _reference(emb: torch.Tensor, v2s: torch.Tensor, tau: float) -> torch.Tensor:
    """Slow loop over anchors and positives, straight from the docstring's definition."""
    z = [row / row.norm() for row in emb.double()]
    r = len(z)
    losses = []
    for a in range(r):
        logits = {k: float(z[a] @ z[k]) / tau for k in range(r) if k != a}
        log_denom = math.log(sum(math.exp(s) for s in logits.values()))
        pos = [k for k in logits if int(v2s[k]) == int(v2s[a])]
        losses.append(-sum(logits[k] - log_denom for k in pos) / len(pos))
    return torch.tensor(losses, dtype=torch.float64)


def test_random_high_dim_is_log_2n_minus_1():
    n = 8
    emb = torch.randn(2 * n, 4096, generator=torch.Generator().manual_seed(0))
    loss = nt_xent(emb, _layout(n, 2), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=0.03)


@pytest.mark.parametrize("n", [2, 8, 16])
def test_perfect_positives_orthogonal_negatives(n):
    tau = 0.5
    q, _ = torch.linalg.qr(torch.randn(64, n, generator=torch.Generator().manual_seed(n)))
    samples = q.T * 3.0  # n orthogonal vectors (norm 3: normalisation must undo it)
    emb = torch.cat([samples, samples])  # two identical views per sample
    loss = nt_xent(emb, _layout(n, 2), temperature=tau)
    # positive logit 1/tau, 2N-2 negatives at 0:
    # -log(e^{1/tau} / (e^{1/tau} + 2N-2)) = log(1 + (2N-2) e^{-1/tau})
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    per_anchor = nt_xent(emb, _layout(n, 2), temperature=tau, reduction="none")
    assert per_anchor.shape == (2 * n,)
    torch.testing.assert_close(per_anchor, torch.full((2 * n,), expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("v,tau", [(3, 0.5), (2, 0.1), (4, 1.0)])
def test_matches_loop_reference(v, tau):
    n = 5
    g = torch.Generator().manual_seed(v)
    emb = torch.randn(n * v, 16, generator=g, dtype=torch.float64)
    v2s = _layout(n, v)
    ref = _reference(emb, v2s, tau)
    torch.testing.assert_close(nt_xent(emb, v2s, tau, reduction="none"), ref)
    torch.testing.assert_close(nt_xent(emb, v2s, tau), ref.mean())
    torch.testing.assert_close(nt_xent(emb, v2s, tau, reduction="sum"), ref.sum())


def test_row_order_does_not_matter():
    n, v = 6, 3
    emb = torch.randn(n * v, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v2s = _layout(n, v)
    perm = torch.randperm(n * v, generator=torch.Generator().manual_seed(2))
    per_anchor = nt_xent(emb, v2s, reduction="none")
    torch.testing.assert_close(nt_xent(emb[perm], v2s[perm], reduction="none"), per_anchor[perm])


def test_gradient_matches_finite_differences():
    """Not only "a gradient flows": autograd's gradient equals central finite differences
    (float64) of the loss, for the mean and the per-anchor losses."""
    emb = torch.randn(12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                      requires_grad=True)
    v2s = _layout(4, 3)
    assert torch.autograd.gradcheck(lambda e: nt_xent(e, v2s, temperature=0.2), (emb,))
    assert torch.autograd.gradcheck(lambda e: nt_xent(e, v2s, 0.5, reduction="none"), (emb,))
    nt_xent(emb, v2s, temperature=0.2).backward()
    assert emb.grad.abs().min() > 0  # every entry of every row gets a gradient


def test_invalid_arguments():
    emb = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least one other view"):
        nt_xent(emb, torch.tensor([0, 1, 2, 3]))  # no positives
    with pytest.raises(ValueError, match="reduction must be one of"):
        nt_xent(emb, _layout(2, 2), reduction="avg")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(emb, _layout(2, 2), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[rows, dim\]"):
        nt_xent(emb[None], _layout(2, 2))
    with pytest.raises(ValueError, match="3 entries for 4 rows"):
        nt_xent(emb, torch.tensor([0, 0, 1]))
