"""Optimizers for large-batch training: parameter groups, LARS, LAMB and a name-based factory.

Large global batches need large learning rates, and plain SGD/Adam become unstable there because
one global LR is too big for some layers and too small for others. LARS and LAMB rescale every
layer's step by a *trust ratio* ||w|| / ||update||, so each layer moves by a bounded fraction of
its own norm whatever the gradient scale.

Biases and normalisation parameters (every tensor with ndim <= 1) get neither weight decay nor the
trust ratio: decaying a BatchNorm scale fights the normalisation, and a trust ratio on a tensor
initialised to zero (a BatchNorm shift, a bias) would freeze it. This is the usual practice for
LARS/LAMB (Goyal et al. 2017 sec. 5.1 excludes BatchNorm's scale and shift from decay; You et
al. 2019 for BERT; biases are excluded with them here by the same ndim rule).

Every group carries the key ``adapt``; torch's own optimizers ignore unknown group keys, so the
same groups serve SGD and AdamW too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")


def param_groups(
    model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool = True
) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed/adapted group and a no-decay group.

    ``no_decay`` holds every parameter with ``ndim <= 1`` (biases, norm weights and shifts);
    ``decay`` holds the rest. Empty groups are omitted (torch rejects empty groups). With
    ``exclude_norm_and_bias=False`` there is a single group named ``decay`` holding everything.
    Shared (tied) parameters appear once: ``named_parameters`` deduplicates them.

    A linear layer's weight is decayed and adapted; its bias and BatchNorm's weight and bias
    are not:

    >>> model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    >>> [(g["name"], len(g["params"]), g["weight_decay"], g["adapt"])
    ...  for g in param_groups(model, weight_decay=0.1)]
    [('decay', 1, 0.1, True), ('no_decay', 3, 0.0, False)]
    """
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if not exclude_norm_and_bias:
        groups = [{"params": params, "weight_decay": weight_decay, "adapt": True, "name": "decay"}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay,
             "adapt": True, "name": "decay"},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
             "adapt": False, "name": "no_decay"},
        ]
    return [g for g in groups if g["params"]]


def _grads(group: dict[str, Any]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("LARS/LAMB do not support sparse gradients")
        yield p, p.grad


def _ratio(num: torch.Tensor, den: torch.Tensor, w_norm: torch.Tensor, d_norm: torch.Tensor):
    """num / den, but 1 where ||w|| or the reference norm is 0 (kept on device: no host sync)."""
    ok = (w_norm > 0) & (d_norm > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, You, Gitman & Ginsburg 2017 (arXiv:1708.03888), Alg. 1.

    Per parameter tensor (a "layer"), with global LR ``lr`` = gamma_t, trust coefficient eta,
    weight decay beta and momentum m, exactly as in Algorithm 1 of the paper:

        g        = grad + beta * w                                   (Alg. 1, line 4)
        local_lr = eta * ||w|| / (||grad|| + beta * ||w|| + eps)    (Alg. 1 line 3 / eq. 6)
        v        = m * v + lr * local_lr * g                         (Alg. 1, line 5)
        w        = w - v                                             (Alg. 1, line 6)

    LR convention: the global LR enters *inside* the momentum buffer, as in the paper (v
    accumulates already-scaled steps), with Goyal et al. 2017's momentum correction (arXiv
    1706.02677, sec. 3, "Remark 3"): when a schedule changes ``lr`` from lr_old to lr_new, v is
    first scaled by lr_new / lr_old. Without it an LR change reaches the step only over about
    1 / (1 - m) steps (a batch-size schedule's jump from LR 0.4 to 3.2, m = 0.9: the next step
    a fifth of SGD's, and at LR 0 the weights still moved by m v). So the step follows the LR
    schedule exactly as torch's SGD convention (v = m v + g; w -= lr v) does, to which
    ``adapt=False`` is equal at any LR sequence that does not rise again after an LR of 0
    (there v is 0: momentum starts afresh, where SGD's kept on; a schedule reaches 0 only at
    its last step).

    If ||w|| == 0 or ||grad|| == 0, local_lr is 1 (not eta): the step is plain SGD-momentum, so a
    zero-initialised tensor still trains, and a tensor without gradient takes the plain decay
    step lr * beta * w (as timm's Lars; NVIDIA's LARC adds no decay to it, and the paper's
    formula would give it local_lr = eta / beta). Beware: LARS
    runs take a global LR typically many times SGD's (the trust ratio eta ||w|| / ||g|| is
    small), so such a tensor's first step is that much larger than the trust ratio would
    allow (the paper's formula would freeze it at 0).
    A group with ``adapt=False`` always uses local_lr = 1, i.e. it is SGD-momentum with its own
    weight decay.
    ``nesterov=True`` applies w = w - (lr * local_lr * g + m * v) with the updated v, which is
    torch's Nesterov form with lr moved inside.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-9,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eps < 0:
            raise ValueError("lr, momentum, weight_decay and eps must be >= 0")
        if not trust_coefficient > 0:  # (a negative one would step up the gradient)
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            # the momentum correction (class docstring): the LR the buffers were taken with is
            # kept in the group, so in the optimizer's state_dict (a checkpoint without it, as
            # written before, resumes with no correction at its first step)
            before = group.get("momentum_lr")
            if m != 0 and before is not None and before != lr and before > 0:
                for p in group["params"]:
                    if "momentum_buffer" in self.state[p]:
                        self.state[p]["momentum_buffer"].mul_(lr / before)
            group["momentum_lr"] = lr
            for p, grad in _grads(group):
                g = grad.add(p, alpha=wd) if wd != 0 else grad.clone()  # Alg. 1 line 4
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    # eq. 6 with weight decay: eta ||w|| / (||grad|| + beta ||w||)
                    local_lr = _ratio(group["trust_coefficient"] * w_norm,
                                      g_norm + wd * w_norm + group["eps"], w_norm, g_norm)
                    g.mul_(local_lr * lr)
                else:
                    g.mul_(lr)
                # g is now the scaled step lr * local_lr * g
                if m == 0:
                    p.sub_(g)
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(m).add_(g)  # Alg. 1 line 5
                p.sub_(g.add_(v, alpha=m) if group["nesterov"] else v)  # Alg. 1 line 6
        return loss


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments, You et al. 2019 (arXiv:1904.00962), Algorithm 2.

    Per parameter tensor at step t, with phi = identity:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2              (Alg. 2, moments)
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)              (if bias_correction)
        r = m_hat / (sqrt(v_hat) + eps)                              (Adam ratio)
        u = r + wd * w                                               (decoupled decay)
        w = w - lr * (||w|| / ||u||) * u                             (layer-wise trust ratio)

    The trust ratio is 1 when ||w|| or ||u|| is 0 (zero-initialised tensors still train) and
    always 1 in a group with ``adapt=False``, which then is exactly AdamW: torch's AdamW also
    uses sqrt(v_hat) + eps and applies decay as lr * wd * w on the pre-step weights.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), wd = group["betas"], group["weight_decay"]
            for p, grad in _grads(group):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bc1, bc2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
                u = (m / bc1).div_((v / bc2).sqrt_().add_(group["eps"]))  # r = m_hat/(sqrt+eps)
                if wd != 0:
                    u.add_(p, alpha=wd)  # u = r + wd * w
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(u)
                    u.mul_(_ratio(w_norm, u_norm, w_norm, u_norm))  # trust = ||w|| / ||u||
                p.sub_(u, alpha=group["lr"])
        return loss


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    trust_coefficient: float = 0.001,
    exclude_norm_and_bias: bool = True,
) -> torch.optim.Optimizer:
    """Build ``name`` (one of OPTIMIZERS) over ``param_groups(model, ...)``.

    ``eps=None`` means each optimizer's own default (AdamW 1e-8, LAMB 1e-6, LARS 1e-9; unused
    by SGD). ``betas=None`` (AdamW, LAMB): ``(momentum, 0.999)`` -- `train.momentum` is beta1.
    Every group gets ``initial_lr = lr`` so an external schedule can scale group["lr"].

    >>> build_optimizer("lamb", nn.Linear(2, 2), lr=0.1, momentum=0.5).param_groups[0]["betas"]
    (0.5, 0.999)
    """
    betas = (momentum, 0.999) if betas is None else betas
    groups = param_groups(model, weight_decay, exclude_norm_and_bias)
    for g in groups:
        g["initial_lr"] = lr
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                                 eps=1e-8 if eps is None else eps)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient, eps=1e-9 if eps is None else eps)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                    eps=1e-6 if eps is None else eps)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
