"""The gradient noise scale (McCandlish et al. 2018, Appendix A) on a problem with a known
answer: logistic regression with fixed weights (SGD at LR 0), where the per-example gradients
give |G|^2 and tr(Sigma) exactly. Batches are drawn with replacement, so
E|G_B|^2 = |G|^2 + tr(Sigma) / B holds exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.engine.models import build_model
from pipeline.engine.noise import NoiseScale, attach_local_norm
from pipeline.engine.step import train_step
from tests.engine.ranks import run_ranks

N, D, C = 400, 6, 3


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, C, generator=g)
    y = torch.multinomial(torch.softmax(0.7 * x @ w, 1), 1, generator=g).squeeze(1)
    return x, y


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", input_dim=D, num_outputs=C, vocab_size=None, depth=0)


def truth(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from the N per-example gradients."""
    rows = []
    for i in range(N):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model({"features": x[i : i + 1]}), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad(set_to_none=True)
    g = torch.stack(rows)
    mean = g.mean(0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


def test_noise_scale_within_5_percent_and_the_mean_of_ratios_is_biased():
    x, y = problem()
    model = linear_model()
    g2, tr = truth(model, x, y)
    expected = tr / g2
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights, hence G and Sigma, stay fixed
    rng = np.random.default_rng(0)
    ema, per_step = NoiseScale(beta=0.9995), []
    for _ in range(4000):  # global batch 256 in 4 micro-batches: the first (64) is the small batch
        ix = torch.from_numpy(rng.integers(0, N, 256))
        res = train_step(model, opt, [{"features": x[ix[j : j + 64]], "label": y[ix[j : j + 64]]}
                                      for j in range(0, 256, 64)], loss="cross_entropy")
        sq_small, b_small, sq_big, b_big = res.noise
        assert (b_small, b_big) == (64, 256)
        ema.update(sq_small=sq_small, b_small=b_small, sq_big=sq_big, b_big=b_big)
        per_step.append(NoiseScale(beta=0.0).update(sq_small=sq_small, b_small=b_small,
                                                    sq_big=sq_big, b_big=b_big))
    assert ema.value == pytest.approx(expected, rel=0.05)
    assert ema.grad_sq == pytest.approx(g2, rel=0.05) and ema.trace == pytest.approx(tr, rel=0.05)
    naive = float(np.nanmean(per_step))  # the ratio of noisy estimates, then averaged
    assert naive / expected - 1 > 0.15  # 0.185 here, against 0.007 for the smoothed ratio


def test_the_scale_in_samples_divides_by_tokens_per_sample_smoothed_as_the_scale_is():
    """A token-level loss counts B in tokens; batches are in samples. Length buckets make a
    step's tokens per sample jump (8 to 283 on `sequences`): divided by each step's own ratio,
    the scale in samples moved 35x between steps of the same gradients. Smoothed by the
    scale's EMA, the divisor is the EMA's weighted tokens / samples (exact below), and the
    scale in samples steadies as the scale itself does."""
    ns = NoiseScale()  # the default beta
    per_step = []
    for step in range(200):
        tokens = (8, 283)[step % 2]  # per sample; 64 samples a step; same gradient statistics
        ns.update(sq_small=5.0, b_small=2, sq_big=2.0, b_big=8, elements=64 * tokens, samples=64)
        per_step.append(ns.value / tokens)  # what dividing by the step's own ratio gave
        w = [ns.beta ** (step - i) for i in range(step + 1)]
        expect = sum(wi * (8, 283)[i % 2] for i, wi in enumerate(w)) / sum(w)
        assert ns.per_sample == pytest.approx(expect, rel=1e-12)
    assert ns.value == pytest.approx(8.0)  # (tokens: 8 = tr / |G|^2 of these statistics)
    assert ns.value_samples == pytest.approx(8.0 / ns.per_sample, rel=1e-12)
    assert 140 < ns.per_sample < 150  # about the mean, 145.5, not the last step's 283
    assert max(per_step[-2:]) / min(per_step[-2:]) > 35  # the old divisor's swing
    # a step without a loss element (every target ignored) leaves it
    before = ns.per_sample
    ns.update(sq_small=5.0, b_small=2, sq_big=2.0, b_big=8, elements=0, samples=64)
    assert ns.per_sample == before


def test_one_worker_one_micro_batch_measures_nothing():
    x, y = problem()
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, opt, [{"features": x[:32], "label": y[:32]}], loss="cross_entropy")
    assert res.noise is None


def test_one_worker_an_empty_first_micro_batch_takes_the_next_as_the_small_batch():
    """Micro-batches of 0, 24 and 40 samples (an empty share's micro-batch comes first, say):
    the small batch is the first with elements, its squared norm that of its own mean
    gradient (the step measured nothing: micro-batch 0 was always the small batch)."""
    x, y = problem()
    model = linear_model()
    small, big = _mean_grad_sq(model, x[:24], y[:24]), _mean_grad_sq(model, x[:64], y[:64])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, opt, [{"features": x[a:b], "label": y[a:b]}
                                  for a, b in ((0, 0), (0, 24), (24, 64))], loss="cross_entropy")
    sq_small, b_small, sq_big, b_big = res.noise
    assert (b_small, b_big) == (24, 64)
    assert sq_small == pytest.approx(small, rel=1e-5) and sq_big == pytest.approx(big, rel=1e-5)


def test_fp16_measures_the_gradients_unscaled():
    """Under fp16 the gradients are the loss scale S times the true ones: both squared norms
    are unscaled by 1/S^2 before they reach the estimator (S = 1024 would make them 1e6 times
    too large, the small one read before the scaler's own unscale)."""
    x, y = problem()
    batches = [{"features": x[a:b], "label": y[a:b]} for a, b in ((0, 24), (24, 64))]
    model = linear_model()
    plain = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batches,
                       loss="cross_entropy").noise
    model = linear_model()
    scaled = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batches,
                        loss="cross_entropy", precision="fp16",
                        scaler=torch.amp.GradScaler("cpu", init_scale=1024.0)).noise
    assert scaled[1::2] == plain[1::2] == (24, 64)
    assert scaled[0] == pytest.approx(plain[0], rel=1e-3)
    assert scaled[2] == pytest.approx(plain[2], rel=1e-3)


def _mean_grad_sq(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model({"features": x}), y).backward()
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return sq


def _ranks_noise(rank: int, world: int) -> tuple[float, ...]:
    x, y = problem()
    model = DDP(linear_model())
    probe = attach_local_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mine = slice(rank * 40, rank * 40 + 40)  # 2 ranks x 40 = the global batch of 80
    res = train_step(model, opt, [{"features": x[mine][i : i + 20], "label": y[mine][i : i + 20]}
                                  for i in (0, 20)], loss="cross_entropy", noise_probe=probe)
    return res.noise


def test_ranks_small_batch_is_each_ranks_share_read_by_the_ddp_hook():
    """2 ranks x 40 samples (2 micro-batches each): |G_small|^2 is the mean over ranks of each
    rank's own mean-gradient norm, |G_big|^2 that of all 80, exactly."""
    x, y = problem()
    model = linear_model()
    small = (_mean_grad_sq(model, x[:40], y[:40]) + _mean_grad_sq(model, x[40:80], y[40:80])) / 2
    big = _mean_grad_sq(model, x[:80], y[:80])
    got = run_ranks(_ranks_noise, 2)
    assert got[0] == got[1]
    sq_small, b_small, sq_big, b_big = got[0]
    assert (b_small, b_big) == (40, 80)
    assert sq_small == pytest.approx(small, rel=1e-5) and sq_big == pytest.approx(big, rel=1e-5)
    assert math.isfinite(NoiseScale().update(sq_small=sq_small, b_small=b_small, sq_big=sq_big,
                                             b_big=b_big))


def _unequal_ranks_noise(rank: int, world: int, steps: int) -> tuple[float, float, float]:
    x, y = problem()
    model = DDP(linear_model())
    probe = attach_local_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rng = np.random.default_rng(0)  # the same draws on both ranks: one global batch per step
    ema = NoiseScale(beta=0.9995)
    b_smalls = set()
    for _ in range(steps):
        ix = torch.from_numpy(rng.integers(0, N, 128))
        mine = ix[:16] if rank == 0 else ix[16:]  # shares of 16 and 112 samples
        res = train_step(model, opt, [{"features": x[mine], "label": y[mine]}],
                         loss="cross_entropy", noise_probe=probe)
        sq_small, b_small, sq_big, b_big = res.noise
        b_smalls.add(round(b_small, 9))
        ema.update(sq_small=sq_small, b_small=b_small, sq_big=sq_big, b_big=b_big)
    (b_small,) = b_smalls
    return ema.value, ema.trace, b_small


@pytest.mark.timeout(300)
def test_ranks_with_unequal_shares_measure_the_noise_scale_with_the_harmonic_mean_share():
    """Ranks holding different numbers of loss elements (token counts do): the mean over
    ranks of |G_i|^2 estimates |G|^2 + tr(Sigma) x mean(1/B_i), so the small batch is the
    harmonic mean of the shares, 2 / (1/16 + 1/112) = 28 (the arithmetic mean, 64, would put
    tr(Sigma) at 3.6x the truth). Within 5% of the per-example truth, on 2 gloo ranks."""
    x, y = problem()
    g2, tr = truth(linear_model(), x, y)
    (value, trace, b_small), _ = run_ranks(_unequal_ranks_noise, 2, 800)
    assert b_small == pytest.approx(28.0)
    assert trace == pytest.approx(tr, rel=0.05) and value == pytest.approx(tr / g2, rel=0.05)
