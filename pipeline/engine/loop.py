"""The per-epoch training loop (pure PyTorch): LR per step, micro-batching, OOM back-off.

`train_epoch` walks the epoch's steps. Each step is a callable `make_micro_batches(size)` that
cuts this rank's share of one global batch into micro-batches of at most `size` samples. With
`auto_micro=True`, an out-of-memory error halves the micro-batch size (doubling accumulation)
and retries the same step, so the global batch -- and the update -- stay the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.engine.step import train_step

MicroBatcher = Callable[[int], list[dict[str, torch.Tensor]]]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken so far (global, survives resume)
    epoch: int = 0  # the epoch being trained (0-based)
    micro_batch_size: int = 0  # current micro-batch size per worker
    skipped_steps: int = 0  # fp16 steps skipped by the gradient scaler
    history: list[dict[str, float]] = field(default_factory=list)  # per-step records


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: Iterable[MicroBatcher],
    state: LoopState,
    *,
    lr_fn: Callable[[int], float],
    loss: str,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    auto_micro: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[LoopState, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train one epoch; return epoch metrics (rank-global sums turned into means)."""
    loss_sum = correct = count = grad_norm_sum = 0.0
    samples = n_steps = 0
    start = time.perf_counter()
    for make_micro in steps:
        if max_steps is not None and state.step >= max_steps:
            break
        lr = lr_fn(state.step)
        set_lr(optimizer, lr)
        while True:
            try:
                res = train_step(model, optimizer, make_micro(state.micro_batch_size), loss=loss,
                                 precision=precision, scaler=scaler, grad_clip=grad_clip)
                break
            except RuntimeError as err:
                if not (auto_micro and is_oom(err)) or state.micro_batch_size <= 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                state.micro_batch_size //= 2
        state.step += 1
        state.skipped_steps += int(res.skipped)
        loss_sum += res.loss * res.count
        correct += res.correct
        count += res.count
        grad_norm_sum += res.grad_norm
        samples += res.local_samples
        n_steps += 1
        record = {"lr": lr, "train_loss_step": res.loss, "grad_norm": res.grad_norm,
                  "micro_batch_size": float(state.micro_batch_size)}
        if scaler is not None:
            record["loss_scale"] = float(scaler.get_scale())
        if on_step is not None:
            on_step(state, record)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(count, 1.0),
        "train_accuracy": correct / max(count, 1.0),
        "grad_norm": grad_norm_sum / max(n_steps, 1),
        "steps": float(n_steps),
        "epoch_time_s": elapsed,
        "worker_samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "lr": lr_fn(max(state.step - 1, 0)),
    }
