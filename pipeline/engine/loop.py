"""The per-epoch training loop (pure PyTorch): LR per step, micro-batching, OOM back-off.

`train_epoch` walks the epoch's steps. Each step is a callable `make_micro_batches(size)` that
cuts this rank's share of one global batch into micro-batches of at most `size` samples. With
`auto_micro=True`, an out-of-memory error halves the micro-batch size (doubling accumulation)
and retries the same step -- on every rank together, even when only one ran out of memory
(`pipeline.engine.step`'s `agree_oom` vote) --, so the global batch stays the same, and so does
the update, except for BatchNorm, whose ghost batch is the micro-batch
(`pipeline.engine.batchnorm`), and dropout (below): every change is reported through `on_event`.

Randomness in the forward pass (dropout) is seeded per (seed, rank, step) before every step:
reproducible, independent across ranks, and the same after a resume. An out-of-memory retry
starts the step from the same seed, but its smaller micro-batches draw the masks in another
order, so a model with dropout takes another (equally random) update.

A step whose loss or gradient is non-finite is skipped (no update, counted in `skipped_steps` and
`nonfinite_steps`); with `nonfinite="stop"` more than `nonfinite_limit` of them end training with
`NonFiniteError` naming the epoch and step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.engine.noise import LocalNorm, NoiseScale
from pipeline.engine.step import StepOutOfMemory, is_oom, train_step

MicroBatcher = Callable[[int], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PlannedStep:
    """One optimizer step whose global batch and LR the caller chose (a batch-size schedule,
    `pipeline.engine.batch_schedule`): `train_epoch` takes these or plain `MicroBatcher`s."""

    make_micro: MicroBatcher
    lr: float
    batch_size: int  # samples in the global batch (all ranks)
    units: int = 1  # unit batches it is made of


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken so far (global, survives resume)
    epoch: int = 0  # the epoch being trained (0-based)
    micro_batch_size: int = 0  # current micro-batch size per worker
    samples: int = 0  # global samples trained so far (PlannedStep steps)
    units: int = 0  # unit batches trained so far (PlannedStep steps)
    batch_size: int = 0  # the last PlannedStep's global batch
    elements_per_sample: float = 1.0  # loss elements (tokens, views) per sample, smoothed as
    # the noise scale is (`NoiseScale.per_sample`; 1.0 without it)
    skipped_steps: int = 0  # steps without an update: fp16 scaler skips, non-finite steps and
    # global batches without a loss element (all targets ignored)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss (or fp32/bf16 gradient)
    noise: NoiseScale | None = None  # the gradient noise scale's running estimate (None: off)
    history: list[dict[str, float]] = field(default_factory=list)  # per-step records


def _built(make_micro: MicroBatcher, size: int, auto_micro: bool
           ) -> tuple[list | None, Exception | None]:
    """The step's micro-batches, or None when building them ran out of memory (the collate, the
    copy to the device) under `auto_micro`: `train_step` then votes for a smaller size; and
    the error that building them met otherwise, which `train_step` raises on every rank."""
    try:
        return make_micro(size), None
    except Exception as err:
        if not (auto_micro and is_oom(err)):
            return [], err
    return None, None  # past the except block: the traceback and what its frames held go


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient under `train.nonfinite: stop`."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's forward randomness at one optimizer step.

    >>> step_seed(0, 0, 5) == step_seed(0, 0, 5), step_seed(0, 0, 5) == step_seed(0, 1, 5)
    (True, False)
    """
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


def seed_forward(seed: int) -> None:
    """Seed the random generators a forward pass draws from (dropout): the CPU's, and CUDA's
    once it is in use -- what `torch.manual_seed` seeds, without its cost (about 0.15 ms a
    call here, a stack trace formatted for each lazily seeded device type, every step).

    >>> seed_forward(7); a = torch.rand(2)
    >>> _ = torch.manual_seed(7); bool((torch.rand(2) == a).all())
    True
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def assert_finite_weights(model: nn.Module, where: str) -> None:
    """Raise NonFiniteError if any parameter or buffer is inf/nan (never checkpoint those)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"non-finite weights in {name!r} {where}; no checkpoint written")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: Iterable[MicroBatcher | PlannedStep],
    state: LoopState,
    *,
    lr_fn: Callable[[int], float] | None = None,
    loss: str,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    auto_micro: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[LoopState, dict[str, float]], None] | None = None,
    seed: int | None = None,
    rank: int = 0,
    nonfinite: str = "stop",
    nonfinite_limit: int = 0,
    on_event: Callable[[str], None] | None = None,
    noise_probe: LocalNorm | None = None,
    input_errors: tuple[type[BaseException], ...] = (),
) -> dict[str, float]:
    """Train one epoch; return epoch metrics (rank-global sums turned into means).

    `lr_fn(step)`: the LR of a plain `MicroBatcher` step (a `PlannedStep` carries its own).
    `seed`: seed torch per (seed, rank, step) before every step (None: leave the RNG alone).
    `on_event`: called with a one-line message for every micro-batch size change.
    An error met on this rank before a step's forward passes -- taking the step from `steps`,
    building its micro-batches -- is raised on every rank at the step's first collective
    (`train_step`'s `error`): here, `PeerError` on the others; `input_errors`: the errors that
    are bad input (the worker's `ConfigError`), which stay so on every rank.
    A step whose loss or gradient is not finite changes nothing: its update is skipped (fp16:
    by the scaler), the BatchNorm running statistics its forward passes moved are put back,
    and it counts in `steps` but not in the epoch's means of what was not finite (loss and
    accuracy, gradient norm). `epoch_time_s` leaves out
    the time spent in `on_step` (a validation pass within the epoch).
    """
    loss_sum = correct = count = grad_norm_sum = 0.0
    samples = n_steps = finite_losses = finite_norms = 0
    hook_s = 0.0
    start = time.perf_counter()
    lr = math.nan
    pending = iter(steps)
    # (max_steps is checked before the next step is pulled: its rows fetched and its size
    # decided for nothing)
    while max_steps is None or state.step < max_steps:
        try:
            item = next(pending)
        except StopIteration:
            break
        except Exception as err:  # this rank's rows of the step (fetched, found changed):
            train_step(model, optimizer, [], loss=loss, precision=precision,  # raised on
                       scaler=scaler, measure_noise=False, agree_oom=auto_micro,  # every rank
                       error=err, error_is_input=isinstance(err, input_errors))  # at its vote
            raise
        planned = item if isinstance(item, PlannedStep) else None
        make_micro = planned.make_micro if planned is not None else item
        lr = planned.lr if planned is not None else lr_fn(state.step)
        set_lr(optimizer, lr)
        step_start = time.perf_counter()
        # An out-of-memory retry, or a step skipped as non-finite, must not count its forward
        # passes in the BatchNorm running statistics: keep the buffers to put them back.
        saved = [b.detach().clone() for b in model.buffers()]
        while True:
            if seed is not None:
                seed_forward(step_seed(seed, rank, state.step))
            try:
                micro, error = _built(make_micro, state.micro_batch_size, auto_micro)
                res = train_step(model, optimizer, micro, loss=loss,
                                 precision=precision, scaler=scaler, grad_clip=grad_clip,
                                 noise_probe=noise_probe, measure_noise=state.noise is not None,
                                 agree_oom=auto_micro, error=error,
                                 error_is_input=isinstance(error, input_errors))
                break
            except StepOutOfMemory as err:  # in a forward or backward, nothing updated yet
                if state.micro_batch_size <= 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buf, kept in zip(model.buffers(), saved, strict=True):
                        buf.copy_(kept)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                old = state.micro_batch_size
                state.micro_batch_size //= 2
                where = f" ({err})" if err.world > 1 else ""
                if on_event is not None:
                    on_event(f"out of memory at step {state.step + 1}{where}: micro_batch_size "
                             f"{old} -> {state.micro_batch_size} on every rank (the step is retried)")
        step_time = time.perf_counter() - step_start
        state.step += 1
        state.skipped_steps += int(res.skipped)
        if res.nonfinite or res.skipped:  # its update was skipped (a non-finite loss or
            with torch.no_grad():  # gradient; fp16: the scaler's): so are its statistics
                for buf, kept in zip(model.buffers(), saved, strict=True):
                    buf.copy_(kept)
        if res.nonfinite:
            state.nonfinite_steps += 1
            if nonfinite == "stop" and state.nonfinite_steps > nonfinite_limit:
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(res.loss) else 'gradient'} at epoch "
                    f"{state.epoch + 1}, step {state.step} (train_loss={res.loss:.4g}, "
                    f"grad_norm={res.grad_norm:.4g}, lr={lr:.4g}); the update was skipped and "
                    f"training stopped "
                    f"(train.nonfinite=stop, {state.nonfinite_steps} non-finite step(s))")
        if math.isfinite(res.loss) and not res.nonfinite:  # (a NaN would make them NaN; a
            # finite loss of a step whose gradient was not is left out with it, as said)
            loss_sum += res.loss * res.count
            correct += res.correct
            count += res.count
            finite_losses += 1
        if math.isfinite(res.grad_norm) and res.count:  # (an fp16 overflow: a finite loss, an
            # inf norm; no loss element: a zero gradient, skipped, as the skipped steps are)
            grad_norm_sum += res.grad_norm
            finite_norms += 1
        samples += res.local_samples
        n_steps += 1
        record = {"lr": lr, "train_loss_step": res.loss, "grad_norm": res.grad_norm,
                  "micro_batch_size": float(state.micro_batch_size), "step_time_s": step_time}
        if planned is not None:
            state.samples += planned.batch_size
            state.units += planned.units
            state.batch_size = planned.batch_size
            record["global_batch_size"] = float(planned.batch_size)
            record["samples"] = float(state.samples)
        if scaler is not None:
            record["loss_scale"] = float(scaler.get_scale())
        if state.noise is not None and res.noise is not None:
            sq_small, b_small, sq_big, b_big = res.noise
            record["noise_scale"] = state.noise.update(
                sq_small=sq_small, b_small=b_small, sq_big=sq_big, b_big=b_big,
                elements=res.count, samples=planned.batch_size if planned is not None else 0)
            record["noise_grad_sq"], record["noise_trace"] = state.noise.grad_sq, state.noise.trace
            state.elements_per_sample = state.noise.per_sample
            if state.elements_per_sample != 1.0:  # token-level: the same in samples, as batches are
                record["noise_scale_samples"] = state.noise.value_samples
        if on_step is not None:
            hook_start = time.perf_counter()
            on_step(state, record)
            hook_s += time.perf_counter() - hook_start
    elapsed = time.perf_counter() - start - hook_s
    # every step non-finite: no mean to give (steps without a loss element: a zero loss)
    none = math.nan if n_steps and not finite_losses else 0.0
    return {
        "train_loss": loss_sum / count if count else none,
        "train_accuracy": correct / count if count else none,
        "grad_norm": grad_norm_sum / finite_norms if finite_norms else (
            math.nan if n_steps else 0.0),
        "steps": float(n_steps),
        "epoch_time_s": elapsed,
        "worker_samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "lr": lr if math.isfinite(lr) or lr_fn is None else lr_fn(max(state.step - 1, 0)),
        # the noise scale is in loss elements (tokens for a token-level loss); batch sizes are in
        # samples: `noise_scale_samples` is the one to set beside them (tokens per sample
        # smoothed as the scale is)
        **({"noise_scale": state.noise.value, "noise_grad_sq": state.noise.grad_sq,
            "noise_trace": state.noise.trace, "noise_scale_samples": state.noise.value_samples}
           if state.noise is not None and state.noise.steps else {}),
    }
