"""The largest per-worker micro-batch that trains a full step, to the exact boundary (pure torch).

`find_max_micro_batch(try_step)` doubles the size from `start` until the first size that does
not fit (or `limit`), then bisects between the last fit and the first failure: the answer is
exact (100 when 100 fits and 101 does not), not the power of two below it -- halving on
out-of-memory, as HF Accelerate's `find_executable_batch_size` does, lands on 64 there.
Every size tried is recorded (`Trial`). Out-of-memory (`torch.cuda.OutOfMemoryError`, or an
error that says "out of memory") counts as "does not fit" and the search goes on. Within a
memory budget a size predicted far past it is refused unrun, for now: the search runs it when
it closes on it (`find_max_micro_batch`).

Several ranks: every rank tries the same size and `agree` -- an all-reduce MIN over the
process group -- turns the ranks' verdicts into one before any rank moves on, so all ranks walk
the same sizes and return the same answer, the minimum over ranks. The trial step itself must
run WITHOUT cross-rank collectives: a rank that runs out of memory in its forward pass would
otherwise leave the other ranks blocked in the step's own collectives (DDP's gradient
all-reduce in backward, a loss all-reduce), waiting for a peer that is already in the
agreement all-reduce -- the deadlock Composer's auto micro-batching met. `make_trial_step`
therefore steps the plain module (a DDP wrapper is unwrapped) with a local loss: forward,
backward, optimizer step, all on this rank; the only collective is the agreement, which every
rank reaches whatever happened in its step. (Measured with two gloo ranks stepping the DDP
wrapper instead: rank 1's agreement met rank 0's gradient all-reduce and gloo aborted the
process, `gloo::EnforceNotMet`; NCCL would wait forever.) DDP's gradient buckets, about one
more copy of the gradients, are held beside the trial step as a block of their size
(`make_trial_step(extra_bytes=...)`: `find-batch-size` does so for several workers), and a
step of several micro-batches is searched apart, its steps holding the gradients accumulated
so far (`hold_gradients`).

Memory. CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (everything the
caching allocator handed out at the peak of the step). CPU, where a step rarely raises
out-of-memory, a trial fits only when its peak is within `max_memory_bytes`; the peak is the
bytes of the tensors alive when the step starts (weights, gradients, optimizer state, the batch)
plus the high-water mark of the CPU allocator during the step, read from `torch.profiler`'s
memory events (every allocation and free, in order) -- the CPU's `max_memory_allocated`.
Checked against the process's peak RSS (sequences Transformer, 64 x 512 tokens, SGD): 203.0 MiB
here, an RSS rise of 200.9 MiB with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536),
328 MiB with glibc's default, whose heap keeps freed blocks (the CPU's `memory_reserved`): leave
that headroom, or set the variable, when the budget is the machine's RAM. Interpreter and
library memory is not counted: it does not grow with the batch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from pipeline.engine.batch_schedule import fit_step_cost
from pipeline.engine.step import autocast, is_oom, loss_count, loss_sum


def human_bytes(n: float) -> str:
    """A memory size as a person reads it (binary units, 3 significant digits).

    >>> human_bytes(1024), human_bytes(830_000), human_bytes(64 * 2**20), human_bytes(5 * 2**30)
    ('1.00 KiB', '811 KiB', '64.0 MiB', '5.00 GiB')
    >>> human_bytes(12), human_bytes(99.96 * 2**20), human_bytes(1000 * 2**10), human_bytes(3 * 2**40)
    ('12 B', '100 MiB', '1000 KiB', '3.00 TiB')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 99.95 else f"{v:#.3g} {unit}"
    return f"{n:.0f} B"


class Measured(NamedTuple):
    """What one rank saw of one trial step."""

    fits: bool
    peak_memory_bytes: int | None = None
    samples_per_s: float | None = None
    note: str | None = None  # why it did not fit
    predicted: bool = False  # not run: refused on its predicted peak (the search may run it later)


@dataclass
class Trial:
    micro_batch_size: int
    fits: bool  # agreed by every rank
    peak_memory_bytes: int | None  # this rank's
    samples_per_s: float | None  # this rank's; None where the size does not fit (on any rank)
    note: str | None = None


@dataclass
class Search:
    max_micro_batch_size: int  # 0: not even 1 fits
    trials: list[Trial] = field(default_factory=list)
    limit: int | None = None
    hit_limit: bool = False  # the limit fits: the true boundary may lie beyond it


def min_over_ranks(value: int) -> int:
    """The minimum of `value` over the ranks of the default process group; `value` itself
    without one. Every rank must call it (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return int(value)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _release_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# A rank's vote on a size; the minimum over the ranks is the verdict (-1: its step raised).
_NO, _REFUSED, _FITS = 0, 1, 2  # run and did not fit | refused unrun on a prediction | fits


def find_max_micro_batch(try_step: Callable[..., Measured | tuple], *, start: int = 1,
                         limit: int | None = None,
                         agree: Callable[[int], int] = min_over_ranks,
                         on_trial: Callable[[Trial], None] | None = None) -> Search:
    """Double from `start` to the first size that does not fit (or `limit`), then bisect to
    the exact boundary. `try_step(size)` runs one training step of `size` samples and returns
    `Measured` (or `(fits, peak_memory_bytes, samples_per_s)`); out-of-memory raised from it
    counts as not fitting. Every rank must pass the same `start` and `limit`. `on_trial` is
    called with each size's `Trial` as soon as it is decided (progress).

    A size refused unrun on a prediction (`Measured(predicted=True)`, `make_trial_step`'s
    guard against running a size far past the budget) bounds the search only for now: when
    the bisection closes on it -- one sample more than a size that fits -- it is run,
    `try_step(size, predict=False)`, and where it fits the search goes on above it (memory
    that grows slower than the line predicts: packed rows that later, shorter samples fill).
    Such a size then shows twice in `trials`, refused and then run. No size is run twice
    (but by a rank that fitted it where another rank refused it).

    >>> fits_below_100 = lambda n: (n <= 100, None, None)
    >>> s = find_max_micro_batch(fits_below_100)
    >>> s.max_micro_batch_size, [t.micro_batch_size for t in s.trials]
    (100, [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101])
    >>> find_max_micro_batch(fits_below_100, limit=37).max_micro_batch_size
    37
    """
    if start < 1 or (limit is not None and limit < 1):
        raise ValueError(f"start ({start}) and limit ({limit}) must be >= 1")
    search = Search(0, limit=limit)
    start = min(start, limit) if limit is not None else start

    def decide(size: int, predict: bool) -> int:
        oom, error = False, None
        try:
            m = Measured(*(try_step(size) if predict else try_step(size, predict=False)))
        except Exception as err:
            if is_oom(err):
                oom = True  # the traceback (and the tensors its frames hold) is released here
            else:
                error = err
        if oom:
            _release_cuda()
            m = Measured(False, None, None, "out of memory")
        # Every rank votes, also one whose step failed otherwise: -1 on any rank is raised on
        # all of them (the others would wait in this vote forever).
        verdict = agree(-1 if error is not None else
                        _FITS if m.fits else _REFUSED if m.predicted else _NO)
        if error is not None:
            raise error
        if verdict < 0:
            raise RuntimeError(f"micro-batch {size}: the trial step failed on another rank")
        fits = verdict == _FITS
        if not m.fits or fits:
            note = m.note
        elif verdict == _NO:
            note = "another rank did not fit"
        else:
            note = "another rank refused it unrun (predicted over budget)"
        # (a speed only where the size fits: this rank's step of a size another rank could
        # not take is no speed of the job's)
        search.trials.append(Trial(size, fits, m.peak_memory_bytes,
                                   m.samples_per_s if fits else None, note))
        if on_trial is not None:
            on_trial(search.trials[-1])
        return verdict

    # lo fits (0 trivially). Above it: `failed`, the smallest size run and found not to fit,
    # and `refused`, the sizes refused unrun (one may fit when run). Every size tried lies at
    # or below lo or at or above the smallest of those, so a new size is never one tried.
    lo, failed, refused = 0, None, set()
    while True:
        hi = min(refused | ({failed} if failed is not None else set()), default=None)
        if hi is None:  # nothing above lo is known not to fit: grow
            if limit is not None and lo >= limit:
                search.hit_limit = True  # the limit fits: the true boundary may lie beyond it
                break
            size, predict = start if lo == 0 else 2 * lo, True
            size = size if limit is None else min(size, limit)
        elif hi - lo > 1:
            size, predict = (lo + hi) // 2, True
        elif hi in refused:  # the boundary, if the prediction was right: run it to know
            size, predict = hi, False
        else:
            break
        verdict = decide(size, predict)
        refused.discard(size)
        if verdict == _FITS:
            lo = size
        elif verdict == _REFUSED and predict:  # (refused again when asked to run: a failure,
            refused.add(size)                  # or the search would ask for ever)
        else:
            failed = size if failed is None else min(failed, size)
    search.max_micro_batch_size = lo
    return search


# -- one trial step ---------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto prints a line to file descriptor 2 whenever a profiler starts or stops."""
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """Run `fn()`; return (its result, the high-water mark of CPU tensor memory allocated
    during it, relative to the start), from the profiler's allocation and free events.

    >>> def step():
    ...     a = torch.empty(1000, dtype=torch.uint8)
    ...     b = torch.empty(3000, dtype=torch.uint8)
    ...     del a
    ...     c = torch.empty(500, dtype=torch.uint8)
    ...     return 1
    >>> cpu_peak_bytes(step)
    (1, 4000)
    """
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Python's cycle collector, run inside `fn`, would free tensors of earlier work (a test's,
    # a notebook's) and lower the peak by what they held: it waits until `fn` is done.
    collecting = gc.isenabled()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:  # (on again however this ends: a profiler that would not start, say)
        gc.disable()
        with _quiet_stderr():
            prof.__enter__()
        try:
            result = fn()
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
    finally:
        if collecting:
            gc.enable()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep the recorded order
    return result, max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def resident_bytes(*objects: object) -> int:
    """Bytes of the distinct tensor storages held by modules, optimizers, dicts, lists and
    tensors (shared storages counted once).

    >>> w = torch.zeros(10)
    >>> resident_bytes(w, {"a": w, "b": [torch.zeros(5, dtype=torch.float64)]})
    80
    """
    seen: dict[int, int] = {}

    def visit(o: object) -> None:
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(o, nn.Module):
            for t in itertools.chain(o.parameters(), o.buffers()):
                visit(t)
                visit(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            visit(list(o.state.values()))
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    for o in objects:
        visit(o)
    return sum(seen.values())


def local_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               *, loss: str, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
               device: torch.device, keep_grads: bool = False) -> None:
    """One optimizer step on this rank alone: forward, mean loss, backward, step, zero_grad
    (`keep_grads`: zeroed in place, not freed). No collective anywhere (see the module
    docstring)."""
    model.train()
    with autocast(precision, device):
        out = model(batch)
    total, _ = loss_sum(out, batch, loss)
    mean = total / max(loss_count(batch, loss), 1)
    if scaler is not None:
        scaler.scale(mean).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        mean.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)


def make_trial_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batch_of: Callable[[int], dict[str, torch.Tensor]], *, loss: str,
                    device: torch.device, precision: str = "fp32",
                    scaler: torch.amp.GradScaler | None = None, max_memory_bytes: int | None = None,
                    timed_steps: int = 2, hold_gradients: bool = False, extra_bytes: int = 0
                    ) -> Callable[..., Measured]:
    """`try_step(size)` for `find_max_micro_batch`: one measured step on `batch_of(size)` (its
    peak memory; over `max_memory_bytes` or out of memory: does not fit), then `timed_steps`
    more for samples/s (the fastest; a step an fp16 scaler skipped is not timed). With a
    budget, a size the line through the two largest that fit puts past 1.5x the budget is
    refused unrun (`Measured.predicted`), unless `try_step(size, predict=False)`: the search
    runs it when it closes on it. Out-of-memory is caught here: gradients are dropped and
    the CUDA cache emptied once the exception (and the tensors its traceback holds) is gone.
    A DDP wrapper is unwrapped: the trial step runs no collective. `extra_bytes`: held beside
    the measured step (DDP's gradient buckets, about one more copy of the gradients, which a
    DDP step holds throughout). `hold_gradients`: the measured step runs as all but the first
    micro-batch of a step of several do, beside the gradients accumulated so far -- a trial
    without them read 48 MiB where two micro-batches of its size a step took 57. The steps are
    real optimizer steps (their memory is the optimizer's): the model and optimizer are the
    search's own, thrown away after -- with several ranks each steps alone, so their weights
    part (the find-batch-size command builds them for the search only)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())):
        # its forward all-gathers: a rank out of memory before it would leave the others there
        raise ValueError("the trial step runs no collective, but SyncBatchNorm gathers in "
                         "every forward: search with plain BatchNorm (train.sync_batchnorm=false)")
    cuda = device.type == "cuda"
    scalers = [scaler]  # (a new one after an out-of-memory: see try_step)

    def step(batch: dict[str, torch.Tensor], keep_grads: bool = False) -> None:
        local_step(module, optimizer, batch, loss=loss, precision=precision, scaler=scalers[0],
                   device=device, keep_grads=keep_grads)

    def held() -> list[torch.Tensor]:
        if hold_gradients:
            for p in module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        return [torch.empty(extra_bytes, dtype=torch.uint8, device=device)] if extra_bytes else []

    def measure(size: int) -> Measured:
        batch = batch_of(size)
        buckets = held()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(batch, hold_gradients)
            torch.cuda.synchronize(device)
            peak = int(torch.cuda.max_memory_allocated(device))
        else:
            before = resident_bytes(module, optimizer, batch, buckets)
            # (the held gradients are freed after, not within, the profiled step: the profiler
            # warns of a block freed that it did not see allocated)
            _, during = cpu_peak_bytes(lambda: step(batch, hold_gradients))
            peak = before + during
        del buckets
        module.zero_grad(set_to_none=True)
        if max_memory_bytes is not None and peak > max_memory_bytes:
            return Measured(False, peak, None, f"over budget ({human_bytes(peak)} > "
                            f"{human_bytes(max_memory_bytes)})")
        best, timed = math.inf, 0
        for _ in range(3 * timed_steps):  # (fp16: a step the scaler skipped -- inf gradients, no
            if timed == timed_steps:      # optimizer step, so faster -- is not timed; up to 3x)
                break
            scale = scalers[0].get_scale() if scalers[0] is not None else None
            t0 = time.perf_counter()
            step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            if scale is None or scalers[0].get_scale() >= scale:  # (a skip backs the scale off)
                best, timed = min(best, elapsed), timed + 1
        return Measured(True, peak, size / best if timed else None)

    fitted: dict[int, int] = {}  # size -> peak, of the steps that fit

    def predicted(size: int) -> float | None:
        """The peak of `size` on the line through the two largest sizes that fit (peaks grow
        linearly with the samples: activations; the rest is fixed)."""
        if len(fitted) < 2:
            return None
        (m0, p0), (m1, p1) = sorted(fitted.items())[-2:]
        return p1 + (p1 - p0) / (m1 - m0) * (size - m1)

    def try_step(size: int, predict: bool = True) -> Measured:
        guess = predicted(size) if predict and max_memory_bytes is not None else None
        if guess is not None and guess > 1.5 * max_memory_bytes:
            # not run: doubling from a size that fits would take up to twice the budget, which
            # on a CPU (default: half the memory available) can bring the kernel's OOM killer.
            # Provisional: memory may grow slower than the line (packed rows that shorter
            # samples fill); the search runs it (`predict=False`) when it closes on it.
            return Measured(False, None, None, f"over budget (predicted {human_bytes(guess)} > "
                                               f"{human_bytes(max_memory_bytes)})", predicted=True)
        try:
            seen = measure(size)
            if seen.fits and seen.peak_memory_bytes is not None:
                fitted[size] = seen.peak_memory_bytes
            return seen
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err):
                raise
        # Past the except block: the exception and the tensors its frames held are released.
        optimizer.zero_grad(set_to_none=True)
        if scalers[0] is not None:  # out of memory inside its step (the optimizer's first state,
            # say): it keeps the optimizer "unscaled" and skips unscale_ on the next step, which
            # then applies gradients still multiplied by the loss scale. A fresh one, same scale.
            old = scalers[0]
            scalers[0] = torch.amp.GradScaler(device.type, init_scale=old.get_scale(),
                                              growth_factor=old.get_growth_factor(),
                                              backoff_factor=old.get_backoff_factor(),
                                              growth_interval=old.get_growth_interval())
        _release_cuda()
        return Measured(False, None, None, "out of memory")

    return try_step


def trial_step_cost(trials: list[Trial]) -> float | None:
    """c = a / b of the step time T(m) = a + b m through the trials that fit (m / samples_per_s
    each), in samples of one worker's micro-batch: the adaptive schedule's throughput model
    (`pipeline.engine.batch_schedule.fit_step_cost`). None with fewer than two sizes.

    >>> from types import SimpleNamespace as T
    >>> trial_step_cost([T(micro_batch_size=m, fits=True, samples_per_s=m / (0.4 + m / 320))
    ...                  for m in (1, 2, 4, 8)])  # a = 0.4 s, b = 1/320 s per sample
    128.0
    """
    timed = [(x.micro_batch_size, x.micro_batch_size / x.samples_per_s) for x in trials
             if x.fits and x.samples_per_s]
    if len({m for m, _ in timed}) < 2:
        return None
    cost = fit_step_cost([m for m, _ in timed], [s for _, s in timed])
    return None if cost is None else round(cost, 3)


# -- what to configure ------------------------------------------------------------------------
def suggest_batching(max_micro_batch_size: int, global_batch_size: int, num_workers: int,
                     margin: float = 0.9, below: int | None = None,
                     accumulating: int | None = None) -> dict[str, object] | None:
    """micro batch x accumulation x workers for a global batch: the micro-batch is the largest
    divisor of the per-worker batch (global / workers) that is <= margin x the largest that
    fits (a margin for samples and memory states the search did not meet) and, with `below`,
    smaller than it (what the config requires of the micro-batch: the adaptive schedule on one
    worker, `Config.micro_batch_below`). Where that takes several micro-batches a step,
    `accumulating` (the largest that fits beside the step's gradients: a search with
    `make_trial_step(hold_gradients=True)`) bounds it instead of the largest that fits alone.
    None if nothing fits.

    >>> s = suggest_batching(100, global_batch_size=512, num_workers=2)
    >>> s["micro_batch_size"], s["accumulation_steps"], s["num_workers"]  # 256 per worker; 90 -> 64
    (64, 4, 2)
    >>> suggest_batching(1000, 512, 1, below=64)["micro_batch_size"]  # 63 -> 32 divides 512
    32
    >>> suggest_batching(100, 512, 2, accumulating=40)["micro_batch_size"]  # 36 -> 32
    32
    >>> suggest_batching(300, 512, 2, accumulating=40)["micro_batch_size"]  # one a step: 256
    256
    """
    if max_micro_batch_size < 1 or (below is not None and below <= 1):
        return None
    per_worker = global_batch_size // num_workers

    def largest(most: int) -> int:
        cap = max(1, math.floor(margin * most))
        if below is not None:
            cap = min(cap, below - 1)
        return max(d for d in range(1, min(cap, per_worker) + 1) if per_worker % d == 0)

    micro = largest(max_micro_batch_size)
    if micro < per_worker and accumulating is not None:
        if accumulating < 1:
            return None
        micro = largest(min(accumulating, max_micro_batch_size))
    return {"micro_batch_size": micro, "accumulation_steps": per_worker // micro,
            "num_workers": num_workers, "global_batch_size": micro * (per_worker // micro) * num_workers,
            "per_worker_batch_size": per_worker, "margin": margin,
            "max_micro_batch_size": max_micro_batch_size,
            "max_accumulating_micro_batch_size": accumulating}
