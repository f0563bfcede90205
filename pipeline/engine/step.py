"""One optimizer step over micro-batches with exact loss normalisation, and evaluation.

Exact normalisation: the loss of every micro-batch is its *sum* over loss elements (samples, or
real tokens for token-level losses) divided by the number of loss elements in the whole global
batch -- across micro-steps and ranks -- so the accumulated gradient equals the gradient of the
global batch's mean loss in one piece. The mean of per-micro-batch means is not that whenever
micro-batches hold different numbers of tokens (the 2024 gradient-accumulation bug in Hugging
Face Transformers). DDP averages gradients over ranks, so each rank's loss is multiplied by the
world size to turn that average back into the global sum / global count.

DDP synchronises gradients only on the last micro-step (`no_sync` on the others).

Contrastive loss (`nt_xent`) is not a sum of per-sample terms: every anchor's softmax runs over
all rows of the batch. Its step therefore computes the NT-Xent of the whole global batch --
embeddings all-gathered across ranks, as SimCLR does -- and reaches across micro-batches by
gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", arXiv 2101.06983): embed every micro-batch without a graph, take the gradient of
the global loss w.r.t. each embedding, then re-run each micro-batch's forward and back-propagate
that gradient. The update equals the single-batch update for any (workers, micro-batch) split
(for models without BatchNorm: with BatchNorm every split is Ghost Batch Normalization, see
`pipeline.engine.batchnorm`; and without dropout: its masks are drawn per rank and micro-batch,
so another split draws others).

Out of memory on some ranks only (`agree_oom`, used by `train.micro_batch_size: auto` with
several workers): a rank that runs out of memory inside DDP's synchronising backward would leave
the others waiting in an all-reduce it never joins -- the hang the field's auto-batch tools meet
(Composer PRs #2117/#3016). So in that mode no collective runs inside a forward or backward: every
micro-batch accumulates locally (`no_sync`), the ranks then vote (one all-reduce of an
out-of-memory flag), and only when every rank succeeded are the gradients averaged (one
all-reduce, as DDP's default hook: divide, then sum) and rank 0's buffers broadcast (what DDP's
`forward_sync_buffers` does at each forward; the worker turns it off in this mode). When any
rank failed, every rank raises `StepOutOfMemory` and the loop shrinks the micro-batch on all of
them together.

A rank that fails before its step's forward passes -- its rows (fetched in the streaming mode,
found changed since the checks), its micro-batches -- says so at the step's first collective
(`error`: one more number in the all-reduce every step makes anyway): it raises its error and
every other rank `PeerError`, there, so none is left waiting in a later collective; bad input
(the caller's `error_is_input`) stays bad input on every rank, which the worker ends at once
rather than retry. `evaluate` does the same with its one all-reduce.

A non-finite loss, or (fp32/bf16) non-finite gradients, are detected on the all-reduced values,
so every rank takes the same decision: the optimizer step is skipped and the result says so
(`nonfinite`); the loop decides whether to go on (`train.nonfinite`). A global batch with no
loss element (a token-level loss whose targets are all ignored) is skipped as well (`skipped`,
not `nonfinite`): its mean loss is 0 / 0, and stepping on its zero gradient would still move
the weights (momentum, weight decay). Under fp16 non-finite
gradients with a finite loss are the gradient scaler's overflow (skipped, the scale backed
off); a non-finite loss -- a forward that overflowed fp16, say -- is a non-finite step there
too, since no loss scale cures it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.engine.contrastive import nt_xent
from pipeline.engine.noise import LocalNorm

IGNORE_INDEX = -100
LOSSES = ("cross_entropy", "token_cross_entropy", "nt_xent")


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on device (non-blocking copies from pinned memory on CUDA)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        out[k] = t
    return out


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_count(batch: dict[str, torch.Tensor], loss: str) -> int:
    """Number of loss elements in a micro-batch, known before the forward pass."""
    if loss == "token_cross_entropy":
        return int((batch["token_targets"] != IGNORE_INDEX).sum())
    key = "view_to_sample" if loss == "nt_xent" else "label"
    return int(batch[key].shape[0])


def loss_sum(outputs: torch.Tensor, batch: dict[str, torch.Tensor], loss: str,
             temperature: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the loss over its elements, number of correct predictions)."""
    if loss == "cross_entropy":
        target = batch["label"]
        total = F.cross_entropy(outputs.float(), target, reduction="sum")
        return total, (outputs.argmax(-1) == target).sum()
    if loss == "token_cross_entropy":
        target = batch["token_targets"]
        total = F.cross_entropy(outputs.float().flatten(0, 1), target.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((outputs.argmax(-1) == target) & (target != IGNORE_INDEX)).sum()
        return total, correct
    if loss == "nt_xent":
        v2s = batch["view_to_sample"]
        total = nt_xent(outputs.float(), v2s, temperature=temperature, reduction="sum")
        return total, retrieval_hits(outputs, v2s).sum()
    raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


@torch.no_grad()
def retrieval_hits(embeddings: torch.Tensor, view_to_sample: torch.Tensor) -> torch.Tensor:
    """NT-Xent's accuracy, per row: is the most similar other row a view of the same sample?"""
    if embeddings.shape[0] == 0:  # no rows (a rank's empty share): no hits, and no argmax
        return torch.zeros(0, dtype=torch.bool, device=embeddings.device)
    z = F.normalize(embeddings.float(), dim=1)
    sim = (z @ z.T).fill_diagonal_(-float("inf"))
    return view_to_sample[sim.argmax(1)] == view_to_sample


def per_sample_loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor], loss: str
                    ) -> torch.Tensor:
    """Each sample's loss (hard-example mining ranks samples by it): its cross-entropy, or its
    tokens' mean cross-entropy. NT-Xent has none: a sample's term depends on the whole batch."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs.float(), batch["label"], reduction="none")
    if loss == "token_cross_entropy":
        target = batch["token_targets"]
        per_token = F.cross_entropy(outputs.float().flatten(0, 1), target.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="none")
        mask = (target != IGNORE_INDEX).float()
        return (per_token.view(target.shape) * mask).sum(1) / mask.sum(1).clamp_min(1)
    raise ValueError(f"no per-sample loss for train.loss={loss}")


def is_oom(err: BaseException) -> bool:
    """Whether an error is an out-of-memory: CUDA's, Python's `MemoryError` (numpy collating),
    or a message that says so (`StepOutOfMemory`; PyTorch's CPU allocator, whose RuntimeError
    reads "DefaultCPUAllocator: can't allocate memory ... (Cannot allocate memory)"; cuBLAS's
    and cuDNN's failed workspace allocations, `CUBLAS_STATUS_ALLOC_FAILED` and
    `CUDNN_STATUS_ALLOC_FAILED`, which PyTorch raises as a RuntimeError of their name).

    >>> is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    ...                     "4503599627370496 bytes. Error code 12 (Cannot allocate memory)"))
    True
    >>> is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    False
    >>> is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    True
    """
    message = str(err).lower()
    # torch.cuda.OutOfMemoryError: a name every torch that pyproject allows has (also a
    # CPU-only build); torch.OutOfMemoryError, the same class where it exists, came later
    return (isinstance(err, torch.cuda.OutOfMemoryError | MemoryError) or "out of memory" in message
            or "cannot allocate memory" in message or "can't allocate memory" in message
            or "status_alloc_failed" in message)


class StepOutOfMemory(RuntimeError):
    """Raised on every rank when at least one rank ran out of memory in a step (`agree_oom`)."""

    def __init__(self, failed: int, world: int) -> None:
        super().__init__(f"out of memory on {failed} of {world} rank(s)")
        self.failed, self.world = failed, world


class PeerError(RuntimeError):
    """Raised on every rank that did not fail when another rank failed before a step or an
    evaluation (`agreed`). `input`: that rank met bad input."""

    def __init__(self, failed: int, world: int, input_error: bool) -> None:
        what = "met bad input (their rows changed since the checks)" if input_error else "failed"
        super().__init__(f"{failed} other rank(s) of {world} {what}; their error is in that "
                         "worker's log")
        self.failed, self.world, self.input_error = failed, world, input_error


def agreed(values: list[float], error: BaseException | None, error_is_input: bool,
           device: torch.device) -> list[float]:
    """`all_reduce_sum(values)` that also tells every rank whether one failed before it: the
    rank with `error` raises it, the others `PeerError` -- all at this collective (a
    collective every rank makes anyway), none left waiting in a later one."""
    failed = error is not None
    try:
        *sums, n_input, n_other = all_reduce_sum(
            [*values, float(failed and error_is_input), float(failed and not error_is_input)],
            device)
    except Exception:
        if error is not None:  # (a broken process group): the error that came first
            raise error from None
        raise
    if error is not None:
        raise error
    if n_input or n_other:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        raise PeerError(int(n_input + n_other), world, input_error=bool(n_input))
    return sums


def _average_gradients(model: nn.Module, world: int) -> None:
    """Average every parameter's gradient over ranks in one all-reduce (a parameter without a
    gradient on this rank contributes zeros, so every rank sends the same layout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads).div_(world)
    dist.all_reduce(flat)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def _broadcast_buffers(model: nn.Module) -> None:
    for b in model.buffers():
        dist.broadcast(b, src=0)


def buffers_synced(model: nn.Module) -> None:
    """Before forward passes without grad (evaluation, scoring): rank 0's buffers broadcast now,
    and none in those forwards. A DDP model broadcasts them in its first forward after training
    (a collective inside the loop, which a rank failing before it would leave waiting) and in
    none after a forward without grad; the buffers do not change in evaluation."""
    if hasattr(model, "require_forward_param_sync") and dist.is_initialized() \
            and dist.get_world_size() > 1:
        if model.will_sync_module_buffers():
            _broadcast_buffers(model)
        model.require_forward_param_sync = False


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (a no-op without an initialised process group)."""
    # float64 on every backend (NCCL has ncclFloat64 among its reduction types; float32, used
    # here before, counts exactly only up to 2^24: a step's 16.7 M loss elements)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def all_gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows (rank order; row counts may differ by rank); return
    (all rows, offset of this rank's first row). Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(x) for x in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), sum(counts[:rank])


@dataclass
class StepResult:
    loss: float  # global-batch mean loss
    correct: float
    count: float  # loss elements in the global batch (all ranks)
    grad_norm: float
    skipped: bool  # no update: fp16's scaler skipped it, or the loss/gradient was non-finite
    local_samples: int
    nonfinite: bool = False  # a non-finite loss (or fp32/bf16 gradient): the update skipped
    # Squared gradient norms at two batch sizes, (|G_small|^2, B_small, |G_big|^2, B_big), for
    # the gradient noise scale (pipeline.engine.noise); None when there is no small batch.
    noise: tuple[float, float, float, float] | None = None


def _no_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _contrastive_backward(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], *,
                          precision: str, scaler: torch.amp.GradScaler | None,
                          device: torch.device, world: int, temperature: float
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """NT-Xent of the whole global batch by gradient caching; returns this rank's
    (loss sum, correct, global row count). `view_to_sample` must name samples uniquely
    across the global batch (e.g. table positions)."""
    from pipeline.engine.batchnorm import running_stats_frozen

    # 1. Embed every micro-batch without a graph (buffers untouched: the forward with a graph
    #    below updates BatchNorm statistics once, as any step does). Keep each RNG state so the
    #    second forward draws the same dropout masks.
    states, embedded = [], []
    with torch.no_grad(), running_stats_frozen(model):
        for mb in micro_batches:
            states.append(_rng_state(device))
            with autocast(precision, device):
                embedded.append(model(mb).float())
    local = torch.cat(embedded)
    v2s_local = torch.cat([mb["view_to_sample"].reshape(-1).to(device) for mb in micro_batches])
    # 2. The global batch: every rank's embeddings, the loss and its gradient w.r.t. each row.
    everything, offset = all_gather_rows(local)
    v2s, _ = all_gather_rows(v2s_local)
    everything = everything.detach().requires_grad_(True)
    per_anchor = nt_xent(everything, v2s, temperature=temperature, reduction="none")
    rows = everything.shape[0]
    (per_anchor.sum() / rows).backward()
    mine = slice(offset, offset + local.shape[0])
    grad = everything.grad[mine] * world  # DDP averages over ranks; the loss is a global sum
    correct = retrieval_hits(everything.detach(), v2s)[mine].sum()
    # 3. Re-run each micro-batch with a graph and back-propagate its rows' cached gradient.
    start = 0
    for i, (mb, state) in enumerate(zip(micro_batches, states, strict=True)):
        last = i == len(micro_batches) - 1
        _set_rng_state(state, device)
        with _no_sync(model, not last):
            with autocast(precision, device):
                out = model(mb).float()
            g = grad[start : start + out.shape[0]]
            if out.shape[0] == 0:  # no rows: every parameter still gets its (zero) gradient
                _zero_of_parameters(model, device).backward()
            else:
                (scaler.scale(out) if scaler is not None else out).backward(g)
        start += out.shape[0]
    return per_anchor[mine].detach().sum(), correct, float(rows)


def _zero_of_parameters(model: nn.Module, device: torch.device) -> torch.Tensor:
    """0 x (an element of) every trainable parameter: added to the loss of a micro-batch with
    no loss element, so that its backward gives each parameter a gradient (zero), as DDP needs
    from every rank -- a model may skip its layers on no rows (a rank's empty share of a last
    global batch smaller than the ranks), and a rank whose backward reaches fewer parameters
    runs other collectives than the others (gloo aborts on the mismatch).

    >>> net = nn.Linear(2, 3)
    >>> _zero_of_parameters(net, torch.device("cpu")).backward()
    >>> [p.grad.abs().sum().item() for p in net.parameters()]
    [0.0, 0.0]
    """
    return sum((p.reshape(-1)[:1].sum() * 0.0 for p in model.parameters() if p.requires_grad),
               torch.zeros((), device=device))


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients, without `clip_grad_norm_`'s multiply
    by 1 when nothing is clipped (`get_total_norm` came in torch 2.6; the project's floor is
    2.4, where the same norm comes from clipping at infinity)."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is None:
        return torch.nn.utils.clip_grad_norm_(params, math.inf)
    return total_norm([p.grad for p in params])


def _grad_sq(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(sum(gr.detach().float().pow(2).sum() for gr in grads)) if grads else math.nan


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]] | None,
    *,
    loss: str,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    device: torch.device | None = None,
    temperature: float = 0.5,
    noise_probe: LocalNorm | None = None,
    measure_noise: bool = True,
    agree_oom: bool = False,
    error: BaseException | None = None,
    error_is_input: bool = False,
) -> StepResult:
    """Accumulate gradients over this rank's micro-batches and take one optimizer step (or
    skip it: fp16 overflow, or a non-finite loss/gradient).

    `measure_noise`: fill `StepResult.noise`. `noise_probe` (the DDP hook state of
    `pipeline.engine.noise.attach_local_norm`) gives each
    rank's own gradient norm for the noise scale when there are several ranks; with one rank
    and several micro-batches the first micro-batch with elements is the small batch (see
    `StepResult.noise`).

    `agree_oom` (several ranks: a DDP model built with `forward_sync_buffers=False`; or one):
    no collective inside forward or backward; an out-of-memory there on any rank raises
    `StepOutOfMemory` on every rank, with the gradients cleared (see the module docstring), and
    any other error on a rank is raised on every rank after the same vote. `StepOutOfMemory` is
    the only out-of-memory the loop retries: one later in the step (averaging, clipping, the
    optimizer's step) may come after parameters changed, so it is raised as it is. Several
    ranks: not for `nt_xent`, whose step all-gathers embeddings between forwards (one rank:
    its out-of-memory is `StepOutOfMemory` too). `micro_batches=None` (with `agree_oom`): this
    rank ran out of memory building them; it votes so.

    `error`: this rank failed before the step (its rows, its micro-batches; `micro_batches`
    then empty): it is raised here, and `PeerError` on the other ranks, at the step's first
    collective (see the module docstring); `error_is_input`: it is bad input.
    """
    device = device or next(model.parameters()).device
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not all(m.training for m in model.modules()):  # (cheaper than train() each step)
        model.train()
    small = (math.nan, 0.0)  # (squared norm of the small batch's gradient, its element count)
    if micro_batches is None and not agree_oom:
        raise ValueError("micro_batches=None (not built: out of memory) needs agree_oom")
    if loss == "nt_xent":
        if world > 1 or error is not None:  # (its first collective is the embeddings' gather)
            agreed([], error, error_is_input, device)
        oom = micro_batches is None
        if not oom:
            try:
                loss_total, correct, global_count = _contrastive_backward(
                    model, micro_batches, precision=precision, scaler=scaler, device=device,
                    world=world, temperature=temperature)
            except Exception as err:
                if not (agree_oom and world == 1 and is_oom(err)):
                    raise
                oom = True  # the traceback (and the tensors its frames hold) goes here
        if oom:
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            raise StepOutOfMemory(1, world)
    else:
        failed_to_build = micro_batches is None
        micro_batches = micro_batches or []
        local = [loss_count(mb, loss) for mb in micro_batches]
        (global_count,) = agreed([float(sum(local))], error, error_is_input, device)
        # A global batch with no loss element (every target ignored): its mean is 0 / 0; the
        # micro-steps run (a zero loss, zero gradients: every rank's collectives as usual) and
        # the update is skipped below (momentum, Adam's moments and weight decay would move the
        # weights on no data).
        per_element = 1.0 / max(global_count, 1.0)
        loss_total = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        agree = agree_oom and world > 1
        failed, errored = float(failed_to_build), 0.0
        error: BaseException | None = None
        try:
            for i, mb in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with _no_sync(model, agree or not last):
                    with autocast(precision, device):
                        out = model(mb)
                    s, c = loss_sum(out, mb, loss, temperature)
                    if not local[i]:  # (no rows, say: every parameter still gets its gradient)
                        s = s + _zero_of_parameters(model, device)
                    scaled = s * (world * per_element)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_total += s.detach()
                correct += c.detach()
                if (measure_noise and world == 1 and not last and not small[1]  # alone: the
                        and sum(local[:i + 1])):  # first micro-batches with elements, not all
                    small = (_grad_sq(optimizer), float(sum(local[:i + 1])))
        except Exception as err:
            if not agree_oom:
                raise
            # join the vote below instead of leaving the other ranks waiting in it
            if is_oom(err):
                failed = 1.0
            else:
                errored, error = 1.0, err
        if agree_oom:
            n_failed, n_errored = (all_reduce_sum([failed, errored], device) if agree
                                   else (failed, errored))
            if n_failed or n_errored:
                optimizer.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
            if error is not None:
                raise error
            if n_errored:
                raise RuntimeError(f"the step failed on {int(n_errored)} other rank(s) of {world}")
            if n_failed:  # the one out-of-memory the loop retries with a smaller micro-batch
                raise StepOutOfMemory(int(n_failed), world)
        if agree:
            if measure_noise:  # this rank's own share, before the average
                small = (_grad_sq(optimizer), float(sum(local)))
            _average_gradients(model, world)
            _broadcast_buffers(model)
        elif measure_noise and world > 1 and noise_probe is not None:  # this rank's own share
            local_sq = noise_probe.take()
            small = (float(local_sq) if local_sq is not None else math.nan, float(sum(local)))
    # The accumulated gradient is (world / global_count) x the sum of per-element gradients:
    # rescale the small batch's to its own mean gradient (and undo fp16's loss scale).
    small_sq, b_small = small
    unscale = 1.0 / scaler.get_scale() ** 2 if scaler is not None else 1.0
    small_sq *= (global_count / (world * b_small)) ** 2 * unscale if b_small > 0 else math.nan
    # Each rank's |G_i|^2 estimates |G|^2 + tr(Sigma) / B_i: their mean over ranks is that of
    # a small batch of the harmonic mean of the B_i (the ranks' token counts can differ a lot).
    loss_g, correct_g, small_sum, inv_b_sum = all_reduce_sum(
        [float(loss_total), float(correct), small_sq, 1.0 / b_small if b_small > 0 else math.nan],
        device)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip
                 else _total_norm(params))
    # Gradients are all-reduced (DDP) and the loss too: every rank sees the same two numbers.
    # Under fp16 a non-finite gradient with a finite loss is the scaler's overflow (it skips and
    # backs off); a non-finite loss is not: no loss scale cures it (the loss is unscaled).
    nonfinite = not math.isfinite(loss_g) or (scaler is None and not math.isfinite(norm))
    skipped = nonfinite or global_count == 0  # (no loss element: nothing to step on)
    if scaler is not None:
        before = scaler.get_scale()
        if skipped:  # the scale kept; update() ends the step for the scaler
            scaler.update(before)  # (unscale_ ran): the next step starts afresh
            tracker = getattr(scaler, "_growth_tracker", None)  # and the run of clean steps
            if nonfinite and tracker is not None:  # that grows the scale starts again, as
                tracker.zero_()  # after a skip
        else:
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < before  # it backs off exactly when it skipped
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    b_small_eff = world / inv_b_sum if inv_b_sum > 0 else math.nan
    noise = ((small_sum / world, b_small_eff, norm * norm, global_count)
             if math.isfinite(small_sum) and 0 < b_small_eff < global_count and not skipped
             else None)
    return StepResult(loss=loss_g / max(global_count, 1.0), correct=correct_g, count=global_count,
                      grad_norm=norm, skipped=skipped, nonfinite=nonfinite, noise=noise,
                      local_samples=samples_in(*micro_batches))


def samples_in(*batches: dict[str, torch.Tensor]) -> int:
    """Samples drawn into collated micro-batches: contrastive rows are views (the first views,
    `view_index` 0, one per sample drawn, a sample drawn twice counted twice; counted on the
    device, read once for all the batches), a packed row holds several samples (one
    `sample_id` each)."""
    first_views = [(b["view_index"] == 0).sum() for b in batches if "view_index" in b]
    rows = sum(int((b["sample_id"] if "sample_id" in b else next(iter(b.values()))).shape[0])
               for b in batches if "view_index" not in b)
    return rows + (int(torch.stack(first_views).sum()) if first_views else 0)


@torch.no_grad()
def evaluate(model: nn.Module,
             batches: Iterator[dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]], *,
             loss: str, precision: str = "fp32", device: torch.device | None = None,
             input_errors: tuple[type[BaseException], ...] = ()) -> dict[str, float]:
    """Mean loss and accuracy over this rank's batches, summed over ranks. BatchNorm uses its
    running statistics (model.eval()). A batch given as a list of micro-batches is one batch
    embedded a micro-batch at a time: NT-Xent's loss is taken over all of its rows (its value
    depends on the batch, so validation fixes the batch: `contrastive_val_batches`). An error
    met on a rank (`input_errors`: bad input) is raised on every rank at the one all-reduce
    (`agreed`): the forward passes here run no collective (`buffers_synced`)."""
    device = device or next(model.parameters()).device
    model.eval()
    buffers_synced(model)
    total = correct = count = 0.0
    error: BaseException | None = None
    try:
        for b in batches:
            with torch.no_grad(), autocast(precision, device):
                if isinstance(b, list):
                    out = torch.cat([model(mb) for mb in b])
                    b = {"view_to_sample": torch.cat([mb["view_to_sample"] for mb in b])}
                else:
                    out = model(b)
            s, c = loss_sum(out, b, loss)
            total += float(s)
            correct += float(c)
            count += loss_count(b, loss)
    except Exception as err:  # (its rows, say): every rank learns it at the all-reduce below
        error = err
    total, correct, count = agreed([total, correct, count], error,
                                   isinstance(error, input_errors), device)
    return {"val_loss": total / max(count, 1.0), "val_accuracy": correct / max(count, 1.0)}


CONTRASTIVE_VAL_SAMPLES = 256  # NT-Xent's validation batch (samples), whatever G and the workers


def contrastive_val_batches(val: np.ndarray, rank: int, world: int, micro: int
                            ) -> list[list[np.ndarray]]:
    """This rank's NT-Xent validation batches, each as its micro-batches (table positions): the
    validation split in consecutive batches of `CONTRASTIVE_VAL_SAMPLES` (the same batches on
    any worker count and for any global batch, so `val_loss` compares across them; a last
    batch under half that joins the one before: a sample or two alone would have no
    negatives), batch i to rank i % world. Every rank gets as many batches, and every batch
    as many micro-batches (empty ones fill in), so the ranks run the same forward passes.

    >>> [[p.tolist() for p in b] for b in contrastive_val_batches(np.arange(5), 0, 2, 2)]
    [[[0, 1], [2, 3], [4]]]
    >>> [[p.tolist() for p in b] for b in contrastive_val_batches(np.arange(5), 1, 2, 2)]
    [[[], [], []]]
    >>> [[len(p) for p in b] for b in contrastive_val_batches(np.arange(700), 0, 2, 200)]
    [[200, 56], [188, 0]]
    >>> [sum(map(len, b)) for b in contrastive_val_batches(np.arange(513), 0, 1, 512)]
    [256, 257]
    """
    size = min(CONTRASTIVE_VAL_SAMPLES, max(len(val), 1))
    starts = list(range(0, len(val), size))
    if len(starts) > 1 and len(val) - starts[-1] < size // 2:
        starts.pop()
    batches = [val[a:b] for a, b in zip(starts, [*starts[1:], len(val)], strict=True)]
    slots = -(-len(batches) // world)
    parts = -(-max((len(b) for b in batches), default=1) // max(1, micro))
    out = []
    for i in range(rank, slots * world, world):
        batch = batches[i] if i < len(batches) else val[:0]
        split = [batch[j : j + micro] for j in range(0, len(batch), micro)]
        out.append(split + [val[:0]] * (parts - len(split)))
    return out
