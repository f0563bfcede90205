"""LARS / LAMB against hand-computed steps, torch equivalences, param groups and the factory."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.engine.optim import LAMB, LARS, build_optimizer, param_groups


def _param(values: list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _step(opt: torch.optim.Optimizer, p: torch.Tensor, grad: list[float]) -> None:
    p.grad = torch.tensor(grad, dtype=p.dtype)
    opt.step()


def _close(p: torch.Tensor, expected: list[float], tol: float = 1e-12) -> None:
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=p.dtype), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------- LARS


def test_lars_two_steps_by_hand() -> None:
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=2.0, momentum=0.9, trust_coefficient=0.001, eps=0.0)
    # step 1: ||w|| = 5, ||grad|| = 1, local_lr = 0.001 * 5 / 1 = 0.005
    #         v1 = 2 * 0.005 * [0.6, 0.8] = [0.006, 0.008];  w1 = [2.994, 3.992] (= 0.998 w)
    _step(opt, w, [0.6, 0.8])
    _close(w, [2.994, 3.992])
    # step 2: ||w1|| = 4.99, local_lr = 0.00499, lr * local_lr * g = [0.005988, 0.007984]
    #         v2 = 0.9 * [0.006, 0.008] + [0.005988, 0.007984] = [0.011388, 0.015184]
    #         w2 = [2.994 - 0.011388, 3.992 - 0.015184] = [2.982612, 3.976816]
    _step(opt, w, [0.6, 0.8])
    _close(opt.state[w]["momentum_buffer"], [0.011388, 0.015184])
    _close(w, [2.982612, 3.976816])


def test_lars_weight_decay_in_gradient_and_denominator() -> None:
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001, eps=0.0)
    # step 1: grad = [0.8, 0.6] (not parallel to w, so the two uses of wd are distinguishable)
    #   g = grad + 0.1 w = [1.1, 1.0];  denominator = ||grad|| + 0.1 ||w|| = 1 + 0.5 = 1.5
    #   local_lr = 0.001 * 5 / 1.5 = 1/300;  v1 = [1.1/300, 1/300];  w1 = w - v1
    _step(opt, w, [0.8, 0.6])
    v1 = [1.1 / 300, 1.0 / 300]
    w1 = [3.0 - v1[0], 4.0 - v1[1]]
    _close(w, w1)
    # step 2: same grad; g = grad + 0.1 w1;  denominator = 1 + 0.1 ||w1||
    g = [0.8 + 0.1 * w1[0], 0.6 + 0.1 * w1[1]]
    n1 = math.hypot(*w1)
    local = 0.001 * n1 / (1.0 + 0.1 * n1)
    v2 = [0.9 * v1[i] + local * g[i] for i in range(2)]
    _step(opt, w, [0.8, 0.6])
    _close(w, [w1[0] - v2[0], w1[1] - v2[1]])


def test_lars_momentum_follows_an_lr_change() -> None:
    # Goyal et al. 2017's momentum correction: the momentum accumulated at lr_old is scaled by
    # lr_new / lr_old when the LR changes, so the step follows the schedule at once.
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=2.0, momentum=0.9, eps=0.0)
    _step(opt, w, [0.6, 0.8])  # v1 = [0.006, 0.008], w1 = [2.994, 3.992] = 0.998 w
    opt.param_groups[0]["lr"] = 4.0
    # ||w1|| = 4.99, local_lr = 0.00499; v2 = 0.9 (4/2) v1 + 4 x 0.00499 x [0.6, 0.8]
    #    = [0.0108 + 0.011976, 0.0144 + 0.015968] = [0.022776, 0.030368]
    _step(opt, w, [0.6, 0.8])
    _close(w, [2.994 - 0.022776, 3.992 - 0.030368])
    opt.param_groups[0]["lr"] = 0.0
    _step(opt, w, [0.6, 0.8])  # v3 = 0.9 (0/4) v2 + 0: at LR 0 the weights stay
    _close(w, [2.994 - 0.022776, 3.992 - 0.030368])
    opt.param_groups[0]["lr"] = 2.0
    _step(opt, w, [0.6, 0.8])  # after LR 0 the momentum starts afresh: v4 = 2 local_lr g
    local = 0.001 * math.hypot(2.994 - 0.022776, 3.992 - 0.030368)
    _close(w, [2.971224 - 2 * local * 0.6, 3.961632 - 2 * local * 0.8])


@pytest.mark.parametrize("adapt", [True, False])
def test_zero_initialised_param_moves(adapt: bool) -> None:
    # ||w|| = 0: the trust ratio is 1, so the first step is the plain one.
    # LARS: w1 = -lr * grad.
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([{"params": [w], "adapt": adapt}], lr=0.1)
    _step(opt, w, [1.0, -2.0, 0.5])
    _close(w, [-0.1, 0.2, -0.05])
    # LAMB: bias-corrected m_hat = g, v_hat = g^2 after one step, so w1 = -lr * g / (|g| + eps)
    #   = -0.1 * [1 / (1 + 1e-6), -2 / (2 + 1e-6), 0.5 / (0.5 + 1e-6)]
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LAMB([{"params": [w], "adapt": adapt}], lr=0.1, eps=1e-6)
    _step(opt, w, [1.0, -2.0, 0.5])
    _close(w, [-0.1 / (1 + 1e-6), 0.2 / (2 + 1e-6), -0.05 / (0.5 + 1e-6)], tol=1e-15)


def test_lars_zero_gradient_with_weight_decay_takes_the_plain_decay_step() -> None:
    # ||grad|| = 0, ||w|| = 5, beta = 0.1: the trust ratio is 1 (as timm's Lars; the paper's
    # eta ||w|| / (0 + beta ||w||) = eta / beta would make it 0.01 here), so the step is the
    # plain decay lr * beta * w = 2.0 * 0.1 * [3, 4] = [0.6, 0.8]
    w = _param([3.0, 4.0])
    opt = LARS([w], lr=2.0, momentum=0.0, weight_decay=0.1, eps=0.0)
    _step(opt, w, [0.0, 0.0])
    _close(w, [2.4, 3.2])


# --------------------------------------------------------------------------------------- LAMB


def test_lamb_two_steps_by_hand() -> None:
    w = _param([3.0, 4.0])
    b1, b2, wd, lr = 0.9, 0.999, 0.5, 0.01
    opt = LAMB([w], lr=lr, betas=(b1, b2), eps=0.0, weight_decay=wd)
    # step 1: bias correction gives m_hat = g, v_hat = g^2, so r = g / |g| = [1, -1]
    #   u = r + 0.5 w = [1 + 1.5, -1 + 2] = [2.5, 1.0];  ||u|| = sqrt(7.25);  ||w|| = 5
    #   w1 = w - 0.01 * (5 / sqrt(7.25)) * [2.5, 1.0]
    _step(opt, w, [0.6, -0.8])
    trust = 5.0 / math.sqrt(7.25)
    w1 = [3.0 - lr * trust * 2.5, 4.0 - lr * trust * 1.0]
    _close(w, w1)
    # step 2 with grad [0.3, 0.4]:
    #   m2 = 0.9 * [0.06, -0.08] + 0.1 * [0.3, 0.4] = [0.084, -0.032]
    #   v2 = 0.999 * [0.00036, 0.00064] + 0.001 * [0.09, 0.16] = [0.00044964, 0.00079936]
    #   m_hat = m2 / (1 - 0.81) = m2 / 0.19;  v_hat = v2 / (1 - 0.998001) = v2 / 0.001999
    m_hat = [0.084 / 0.19, -0.032 / 0.19]
    v_hat = [0.00044964 / 0.001999, 0.00079936 / 0.001999]
    u = [m_hat[i] / math.sqrt(v_hat[i]) + wd * w1[i] for i in range(2)]
    trust = math.hypot(*w1) / math.hypot(*u)
    _step(opt, w, [0.3, 0.4])
    _close(w, [w1[i] - lr * trust * u[i] for i in range(2)])


def test_lamb_without_bias_correction() -> None:
    w = _param([3.0, 4.0])
    opt = LAMB([{"params": [w], "adapt": False}], lr=0.1, eps=0.0, bias_correction=False)
    # m = 0.1 g, v = 0.001 g^2;  r = 0.1 g / (sqrt(0.001) |g|) = sign(g) * 0.1 / sqrt(0.001)
    _step(opt, w, [0.6, -0.8])
    r = 0.1 / math.sqrt(0.001)
    _close(w, [3.0 - 0.1 * r, 4.0 + 0.1 * r])


# ------------------------------------------------------------------------- torch equivalences


def _lockstep(opt_a, model_a, opt_b, model_b, steps: int = 3,
              lrs: list[float] | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        if lrs is not None:  # a schedule's LR for both, per step
            for opt in (opt_a, opt_b):
                for group in opt.param_groups:
                    group["lr"] = lrs[i]
        x = torch.randn(16, 5, generator=gen)
        y = torch.randn(16, 2, generator=gen)
        for opt, model in ((opt_a, model_a), (opt_b, model_b)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    return a, copy.deepcopy(a)


@pytest.mark.parametrize(("wd", "nesterov"), [(0.0, False), (0.01, False), (0.0, True)])
def test_lars_without_adapt_equals_sgd(wd: float, nesterov: bool) -> None:
    a, b = _models()
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=wd,
                          nesterov=nesterov)
    ours = LARS([{"params": list(b.parameters()), "adapt": False}], lr=0.1, momentum=0.9,
                weight_decay=wd, nesterov=nesterov)
    _lockstep(ref, a, ours, b)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_without_adapt_equals_sgd_through_lr_changes(nesterov: bool) -> None:
    """A warmup, a batch-size schedule's jumps (0.04 -> 0.32: 64 -> 512 samples, linear rule)
    and a decay to 0: SGD's step follows each LR at once, and so does LARS's (the momentum
    correction). (An LR after 0 differs: LARS's momentum starts afresh, SGD's kept on.)"""
    a, b = _models()
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov)
    ours = LARS([{"params": list(b.parameters()), "adapt": False}], lr=0.1, momentum=0.9,
                nesterov=nesterov)
    lrs = [0.01, 0.02, 0.04, 0.04, 0.32, 0.32, 0.16, 0.05, 0.0]
    _lockstep(ref, a, ours, b, steps=len(lrs), lrs=lrs)


def test_lars_resumes_with_its_momentum_lr() -> None:
    """The LR the momentum was taken with is in the state_dict: a resumed optimizer corrects
    at the next LR change as the uninterrupted one does."""
    a, b = _models()
    whole = LARS(a.parameters(), lr=0.1, momentum=0.9)
    first = LARS(b.parameters(), lr=0.1, momentum=0.9)
    lrs = [0.1, 0.4, 0.4, 1.6, 0.8]
    _lockstep(whole, a, first, b, steps=3, lrs=lrs[:3])
    resumed = LARS(b.parameters(), lr=5.0, momentum=0.9)
    resumed.load_state_dict(first.state_dict())
    assert [g["momentum_lr"] for g in resumed.param_groups] == [0.4]
    gen = torch.Generator().manual_seed(1)
    for lr in lrs[3:]:
        x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 2, generator=gen)
        for opt, model in ((whole, a), (resumed, b)):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_without_adapt_equals_adamw(wd: float) -> None:
    a, b = _models()
    ref = torch.optim.AdamW(a.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-6,
                            weight_decay=wd)
    ours = LAMB([{"params": list(b.parameters()), "adapt": False}], lr=0.01, eps=1e-6,
                weight_decay=wd)
    _lockstep(ref, a, ours, b)


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_closure_returns_loss(cls: type) -> None:
    w = _param([3.0, 4.0])
    opt = cls([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 25.0
    assert w.grad is not None and not torch.equal(w.detach(), torch.tensor([3.0, 4.0]).double())


# ------------------------------------------------------------------------------ param groups


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10))


def test_param_groups_split_by_ndim() -> None:
    model = _convnet()
    model.temperature = nn.Parameter(torch.tensor(1.0))  # a 0-dim parameter is in a group too
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay"}
    decay, no_decay = groups["decay"], groups["no_decay"]
    assert (decay["weight_decay"], decay["adapt"]) == (0.1, True)
    assert (no_decay["weight_decay"], no_decay["adapt"]) == (0.0, False)
    ids_decay = {id(p) for p in decay["params"]}
    ids_no = {id(p) for p in no_decay["params"]}
    assert not ids_decay & ids_no
    assert ids_decay | ids_no == {id(p) for p in model.parameters()}
    assert ids_no == {id(p) for p in model.parameters() if p.ndim <= 1}
    # conv bias, BN weight, BN bias, linear bias, the scalar -> 5; conv, linear weights -> 2
    assert (len(ids_no), len(ids_decay)) == (5, 2)


def test_param_groups_options() -> None:
    model = _convnet()
    (only,) = param_groups(model, weight_decay=0.1, exclude_norm_and_bias=False)
    assert only["adapt"] is True and only["weight_decay"] == 0.1
    assert len(only["params"]) == 6
    model[1].requires_grad_(False)  # frozen BatchNorm is left out
    names = [g["name"] for g in param_groups(model, 0.1)]
    n_params = sum(len(g["params"]) for g in param_groups(model, 0.1))
    assert names == ["decay", "no_decay"] and n_params == 4
    assert [g["name"] for g in param_groups(nn.Linear(3, 2, bias=False), 0.1)] == ["decay"]


# ------------------------------------------------------------------------------------ factory


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS), ("lamb", LAMB)],
)
def test_build_optimizer(name: str, cls: type) -> None:
    model = _convnet()
    opt = build_optimizer(name, model, lr=0.05, weight_decay=1e-4)
    assert type(opt) is cls
    assert all(g["initial_lr"] == 0.05 and g["lr"] == 0.05 for g in opt.param_groups)
    wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wds == {"decay": 1e-4, "no_decay": 0.0}
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(2, 3, 8, 8)) ** 2).sum().backward()
    opt.step()  # extra group keys ("adapt", "name") must not break torch's optimizers
    for b, p in zip(before, model.parameters(), strict=True):
        # (a conv bias before BatchNorm gets a ~0 gradient, so only check real gradients)
        if p.grad.abs().max() > 1e-4:
            assert not torch.equal(b, p)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_train_momentum_is_each_optimizers_momentum_or_beta1(name: str) -> None:
    """`train.momentum` is SGD's and LARS's momentum and AdamW's and LAMB's beta1 (it was
    ignored by the last two: a sweep over it changed nothing)."""
    opt = build_optimizer(name, nn.Linear(2, 2), lr=0.1, momentum=0.5)
    group = opt.param_groups[0]
    assert (group["betas"] == (0.5, 0.999)) if name in ("adamw", "lamb") else group["momentum"] == 0.5
    default = build_optimizer(name, nn.Linear(2, 2), lr=0.1).param_groups[0]
    assert (default["betas"] == (0.9, 0.999)) if name in ("adamw", "lamb") else default["momentum"] == 0.9


def test_lars_refuses_a_trust_coefficient_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="trust_coefficient must be > 0"):
        LARS([_param([1.0])], lr=0.1, trust_coefficient=-0.001)


def test_build_optimizer_unknown_name() -> None:
    with pytest.raises(ValueError, match="sgd, adamw, lars, lamb"):
        build_optimizer("adagrad", nn.Linear(2, 2), lr=0.1)
