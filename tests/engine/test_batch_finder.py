"""The batch-size finder: the exact boundary (not a power of two), out-of-memory caught and the
search going on, one answer agreed by real gloo ranks when only one of them runs out of memory,
the CPU memory budget, the suggestion's arithmetic, and `python -m pipeline find-batch-size`."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.engine.batch_finder import (
    Measured,
    cpu_peak_bytes,
    find_max_micro_batch,
    make_trial_step,
    resident_bytes,
    suggest_batching,
    trial_step_cost,
)
from pipeline.find_batch_size import parse_size, table_lines
from tests.conftest import REPO
from tests.engine.ranks import run_ranks

CPU = torch.device("cpu")
DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
DOUBLING = [1, 2, 4, 8, 16, 32, 64, 128]


class _OOMInBackward(torch.autograd.Function):
    """Identity forward; its backward raises out-of-memory when the batch is over `limit`."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: batch {grad.shape[0]})")
        return grad, None


class OOMAbove(nn.Module):
    """A classifier that runs out of memory above `limit` samples, in forward or in backward
    (after the head's gradients are already accumulated)."""

    def __init__(self, limit: int, where: str = "forward"):
        super().__init__()
        self.limit, self.where = limit, where
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        x = batch["features"]
        if self.where == "forward" and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: batch {x.shape[0]})")
        h = self.body(x)
        if self.where == "backward":
            h = _OOMInBackward.apply(h, self.limit)
        return self.head(torch.relu(h))


def _batch_of(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"features": torch.randn(n, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}


def _trial_step(model: nn.Module, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return make_trial_step(model, opt, _batch_of, loss="cross_entropy", device=CPU,
                           timed_steps=1, **kwargs), opt


def _sizes(search) -> list[int]:
    return [t.micro_batch_size for t in search.trials]


# -- the search: doubling, then bisection to the exact boundary -------------------------------------
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_model_that_runs_out_of_memory_above_100_is_found_to_fit_exactly_100(where):
    model = OOMAbove(100, where)
    try_step, opt = _trial_step(model)
    s = find_max_micro_batch(try_step)
    assert s.max_micro_batch_size == 100 and not s.hit_limit
    assert _sizes(s) == DOUBLING + [96, 112, 104, 100, 102, 101]
    assert [t.fits for t in s.trials] == [t.micro_batch_size <= 100 for t in s.trials]
    for t in s.trials:
        if t.fits:  # a real step ran: measured and timed
            assert t.peak_memory_bytes > 0 and t.samples_per_s > 0 and t.note is None
        else:
            assert (t.note, t.peak_memory_bytes, t.samples_per_s) == ("out of memory", None, None)
    # The last trial (101) ran out of memory; no gradient of it survived (in backward, the
    # head's gradients were accumulated before the error).
    assert all(p.grad is None for p in model.parameters())
    assert not any(opt.state[p] == {} for p in model.parameters())  # real optimizer steps ran


@pytest.mark.parametrize(("limit", "answer", "sizes", "hit"), [
    (37, 37, [1, 2, 4, 8, 16, 32, 37], True),
    (1, 1, [1], True),
    (100, 100, [1, 2, 4, 8, 16, 32, 64, 100], True),
    (120, 100, [1, 2, 4, 8, 16, 32, 64, 120, 92, 106, 99, 102, 100, 101], False),
])
def test_the_limit_caps_the_search_and_a_limit_that_fits_is_the_answer(limit, answer, sizes, hit):
    s = find_max_micro_batch(_trial_step(OOMAbove(100))[0], limit=limit)
    assert (s.max_micro_batch_size, _sizes(s), s.hit_limit) == (answer, sizes, hit)


def test_a_start_above_the_boundary_bisects_down_and_nothing_fitting_gives_0():
    fits_100 = lambda n: Measured(n <= 100)  # noqa: E731
    s = find_max_micro_batch(fits_100, start=150)
    assert s.max_micro_batch_size == 100
    assert _sizes(s) == [150, 75, 112, 93, 102, 97, 99, 100, 101]
    nothing = find_max_micro_batch(lambda n: Measured(False, note="over budget"))
    assert (nothing.max_micro_batch_size, _sizes(nothing)) == (0, [1])


def test_each_trial_is_reported_as_soon_as_it_is_decided():
    """`on_trial` (the CLI's table, row by row) hears of each size before the next is tried."""
    events = []

    def try_step(n):
        events.append(("try", n))
        return Measured(n <= 10)

    s = find_max_micro_batch(try_step, on_trial=lambda t: events.append(("told", t)))
    assert events == [e for t in s.trials for e in (("try", t.micro_batch_size), ("told", t))]
    assert _sizes(s) == [1, 2, 4, 8, 16, 12, 10, 11]


def test_out_of_memory_raised_by_try_step_counts_as_not_fitting_and_other_errors_propagate():
    def oom_text(n):  # what CUDA's caching allocator raised before torch.OutOfMemoryError
        if n > 10:
            raise RuntimeError("CUDA error: out of memory")
        return True, 1, 1.0

    s = find_max_micro_batch(oom_text)
    assert s.max_micro_batch_size == 10 and s.trials[-1].note == "out of memory"

    def cpu_allocator(n):  # what PyTorch's CPU allocator raises (torch 2.13)
        if n > 12:
            torch.empty(1 << 50)  # 4 PiB: refused at once, nothing allocated
        return True, 1, 1.0

    assert find_max_micro_batch(cpu_allocator).max_micro_batch_size == 12

    def broken(n):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        find_max_micro_batch(broken)


# -- several ranks: one answer, no hang when only one rank runs out of memory -----------------------
def _finder_rank(rank: int, world: int, limits: tuple[int, ...], where: str):
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(OOMAbove(limits[rank], where))  # unwrapped inside
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try_step = make_trial_step(ddp, opt, _batch_of, loss="cross_entropy", device=CPU, timed_steps=1)
    s = find_max_micro_batch(try_step)
    return s.max_micro_batch_size, _sizes(s), [(t.fits, t.note, t.samples_per_s) for t in s.trials]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_one_rank_out_of_memory_all_ranks_agree_on_the_minimum_without_a_hang(where):
    (a0, sizes0, notes0), (a1, sizes1, notes1) = run_ranks(_finder_rank, 2, (100, 60), where)
    assert a0 == a1 == 60
    assert sizes0 == sizes1 == [1, 2, 4, 8, 16, 32, 64, 48, 56, 60, 62, 61]
    fits = [n <= 60 for n in sizes0]
    assert [f for f, _, _ in notes0] == [f for f, _, _ in notes1] == fits
    # Rank 1 ran out of memory above 60; rank 0 fitted up to 100 and stopped because rank 1 did.
    assert [n for f, n, _ in notes1 if not f] == ["out of memory"] * 3
    assert [n for f, n, _ in notes0 if not f] == ["another rank did not fit"] * 3
    # A speed only where the size fits: rank 0 timed its steps of 61, 62 and 64, but they are
    # not sizes the job can take (the table and the plot showed them)
    for notes in (notes0, notes1):
        assert [sps is not None and sps > 0 for _, _, sps in notes] == fits


def _finder_error_rank(rank: int, world: int):
    def try_step(n):
        if rank == 1 and n == 8:
            raise ValueError("a bug in rank 1's step")
        return True, 1, 1.0

    try:
        find_max_micro_batch(try_step)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.timeout(120)
def test_an_error_on_one_rank_is_raised_on_every_rank_without_a_hang():
    """A rank whose trial step fails with another error than out-of-memory still votes: it
    raises its own error, the other rank says the trial failed elsewhere (it would otherwise
    wait in the vote forever)."""
    r0, r1 = run_ranks(_finder_error_rank, 2)
    assert r1 == "ValueError: a bug in rank 1's step"
    assert r0 == "RuntimeError: micro-batch 8: the trial step failed on another rank"


def _sync_bn_rank(rank: int, world: int):
    model = nn.SyncBatchNorm(4)
    try:
        make_trial_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _batch_of,
                        loss="cross_entropy", device=CPU)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.timeout(120)
def test_a_sync_batchnorm_model_is_refused_by_the_finder_of_several_ranks():
    """SyncBatchNorm all-gathers in its forward: one rank out of memory before it would leave
    the others waiting there while it waits in the vote -- the deadlock the finder avoids."""
    assert run_ranks(_sync_bn_rank, 2) == ["the trial step runs no collective, but SyncBatchNorm "
                                           "gathers in every forward: search with plain "
                                           "BatchNorm (train.sync_batchnorm=false)"] * 2


# -- the CPU memory budget ------------------------------------------------------------------------
def _mlp_step(budget: int | None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 3))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, batch):
            return self.net(batch["features"])

    return _trial_step(Wrap(), max_memory_bytes=budget)[0]


def _mlp_search(budget: int):
    return find_max_micro_batch(_mlp_step(budget), limit=4096)


def test_a_size_far_past_the_budget_is_not_run_and_would_not_have_fit():
    """Doubling from a size that fits can take twice the budget (on a CPU whose default budget
    is half the memory available: the kernel's OOM killer). A size the line through the two
    largest that fit puts past 1.5x the budget is refused unrun -- and run on its own, each
    such size is indeed over the budget. No size the search ran went past 1.5x the budget
    (memory linear in the batch: no refused size is run later, as sub-linear memory's is)."""
    budget = 2 * 2**20
    trials = _mlp_search(budget).trials
    skipped = [t.micro_batch_size for t in trials if (t.note or "").startswith("over budget (predicted")]
    run = [t for t in trials if t.peak_memory_bytes is not None]
    assert skipped and not {t.micro_batch_size for t in run} & set(skipped)
    assert max(t.peak_memory_bytes for t in run) <= 1.5 * budget
    for size in skipped:
        assert _mlp_step(None)(size).peak_memory_bytes > budget


def test_a_size_refused_on_its_prediction_is_run_when_the_search_closes_on_it():
    """The search's side, with a try_step that plays the prediction: 128 refused unrun (as a
    line through 32 and 64 would put it past the budget) while every size up to 200 fits. The
    bisection below it fits up to 127, so it runs 128 -- one sample more than a size that
    fits -- and, as it fits, goes on above it to the exact boundary. No size runs twice."""
    def fitting_up_to(most, runs):
        def try_step(n, predict=True):
            if predict and n == 128:
                return Measured(False, note="over budget (predicted)", predicted=True)
            runs.append(n)
            return Measured(n <= most)

        return try_step

    runs = []
    s = find_max_micro_batch(fitting_up_to(200, runs))
    assert s.max_micro_batch_size == 200 and not s.hit_limit
    assert _sizes(s) == DOUBLING + [96, 112, 120, 124, 126, 127, 128,
                                    256, 192, 224, 208, 200, 204, 202, 201]
    assert sorted(runs) == sorted(set(runs)) and 128 in runs
    assert [(t.fits, t.note) for t in s.trials if t.micro_batch_size == 128] == [
        (False, "over budget (predicted)"), (True, None)]
    # where a size run below it does not fit, the refused size is never run
    runs = []
    s = find_max_micro_batch(fitting_up_to(100, runs))
    assert s.max_micro_batch_size == 100 and 128 not in runs
    assert _sizes(s) == DOUBLING + [96, 112, 104, 100, 102, 101]


def test_memory_that_grows_slower_than_the_line_is_searched_to_the_exact_boundary():
    """Packed sequences, longest first as the finder orders them: 100 documents of 512 tokens,
    then 3,000 queries of 10 packed into rows of 512 tokens. Past the documents a size's new
    samples fill packed rows already there: memory grows far slower than the line through 64
    and 128, which puts 256 past 1.5x the budget (128's peak / 0.9). 256 was refused as if
    measured and the search answered 255, while 256, 512 and 700 fit; the refusal is
    provisional now, and the search meets the boundary a search that runs every size meets."""
    from pipeline.data.padding import batch_shape

    lengths = np.array([512] * 100 + [10] * 3000)

    def batch_of(m):  # a step's memory follows its packed rows (8 feature rows each)
        rows = 8 * batch_shape(lengths[:m], packing=True, pack_tokens=512)[0]
        g = torch.Generator().manual_seed(m)
        return {"features": torch.randn(rows, 64, generator=g), "label": torch.zeros(rows, dtype=torch.long)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3))

        def forward(self, batch):
            return self.net(batch["features"])

    def trial_step(budget):
        torch.manual_seed(0)
        model = Net()
        return make_trial_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_of,
                               loss="cross_entropy", device=CPU, max_memory_bytes=budget,
                               timed_steps=0)

    probe = trial_step(None)  # no budget: runs every size it is given
    budget = int(probe(128).peak_memory_bytes / 0.9)
    s = find_max_micro_batch(trial_step(budget), limit=len(lengths), agree=lambda v: v)
    refused = [t.micro_batch_size for t in s.trials if (t.note or "").startswith("over budget (predicted")]
    assert refused[:1] == [256]
    run = [t for t in s.trials if not (t.note or "").startswith("over budget (predicted")]
    assert len({t.micro_batch_size for t in run}) == len(run)  # no size run twice
    n = s.max_micro_batch_size
    for size in (256, 512, 700):  # past the old answer (255), and each fits when run
        assert size <= n and probe(size).peak_memory_bytes <= budget
    tried = {t.micro_batch_size: t for t in run}
    assert tried[n].fits and not tried[n + 1].fits and tried[n + 1].peak_memory_bytes > budget

    def measured(m):  # every size run, fitting within the budget: the reference boundary
        peak = probe(m).peak_memory_bytes
        return Measured(peak <= budget, peak)

    assert n == find_max_micro_batch(measured, limit=len(lengths), agree=lambda v: v).max_micro_batch_size


def test_a_cpu_step_fits_only_within_the_budget_and_a_bigger_budget_gives_a_bigger_answer():
    small, big = _mlp_search(2 * 2**20), _mlp_search(8 * 2**20)
    for s, budget in ((small, 2 * 2**20), (big, 8 * 2**20)):
        # (a size the line through the two largest that fit puts past 1.5x the budget is not
        # run: its peak is not measured)
        run = [t for t in s.trials if not (t.note or "").startswith("over budget (predicted")]
        by_size = sorted(run, key=lambda t: t.micro_batch_size)
        peaks = [t.peak_memory_bytes for t in by_size]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)  # grows with the batch
        for t in run:
            assert t.fits == (t.peak_memory_bytes <= budget)
            assert (t.note or "").startswith("over budget" if not t.fits else "")
        n = s.max_micro_batch_size
        assert {n, n + 1} <= set(_sizes(s)) and not s.hit_limit  # the exact boundary was met
    # Activations: at least [n, 512] floats saved for backward (the ReLU output), so 2 MiB holds
    # fewer than 1024 samples; and four times the budget holds more than twice as many.
    assert 0 < small.max_micro_batch_size < 1024
    assert big.max_micro_batch_size > 2 * small.max_micro_batch_size


def test_a_step_the_fp16_scaler_skipped_is_not_timed():
    """fp16: a step whose gradients overflow is skipped by the GradScaler (no optimizer step:
    faster), and the finder kept the fastest of its timed steps -- the skipped one. Here the
    two timed steps overflow in no time while a real step takes 50 ms: the speed is a real
    step's (8 samples / 50 ms at most), timed on the steps after them (a CPU GradScaler
    stands in for CUDA's)."""
    import time

    class SlowUnlessOverflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.calls = nn.Linear(4, 3), 0

        def forward(self, batch):
            self.calls += 1
            out = self.head(batch["features"])
            if self.calls in (2, 3):  # the two timed steps: inf loss, the scaler skips them
                return out * float("inf")
            time.sleep(0.05)
            return out

    model = SlowUnlessOverflowing()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    try_step = make_trial_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _batch_of,
                               loss="cross_entropy", device=CPU, scaler=scaler, timed_steps=2)
    m = try_step(8)
    assert m.fits and scaler.get_scale() == 256.0  # two steps skipped (the scale halved twice)
    assert model.calls == 5 and m.samples_per_s <= 8 / 0.05


def test_out_of_memory_is_known_by_its_class_on_a_torch_without_the_top_level_name(monkeypatch):
    """`torch.OutOfMemoryError` is newer than `torch.cuda.OutOfMemoryError` (the same class
    where both exist). `is_oom` read the newer name: on a torch without it every error -- out
    of memory or not -- raised AttributeError out of the finder and the auto micro-batch."""
    from pipeline.engine.step import is_oom

    oom = torch.cuda.OutOfMemoryError("allocation refused")  # (a message that does not say so)
    monkeypatch.delattr(torch, "OutOfMemoryError")
    assert is_oom(oom)
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_the_cpu_peak_counts_tensors_alive_together_not_all_allocated():
    def step():
        kept = [torch.empty(2**20, dtype=torch.uint8) for _ in range(3)]  # 3 MiB at once
        for _ in range(10):
            torch.empty(2**20, dtype=torch.uint8)  # 10 MiB allocated, 1 MiB alive at a time
        return len(kept)

    assert cpu_peak_bytes(step) == (3, 4 * 2**20)


def test_the_cpu_peak_is_not_lowered_by_earlier_garbage_collected_during_the_step():
    """Cyclic garbage of earlier work holding a tensor (a test's, a notebook's), collected by
    Python while the step ran, freed memory the step never allocated: the peak came out lower
    than the step's own (a boundary that moved with the tests run before). The collector
    waits until the step is done (none runs inside it, however often it is due)."""
    import gc

    inside, during = [False], []

    def step():
        inside[0] = True
        _ = [[] for _ in range(200)]  # allocations that make the collector due
        inside[0] = False
        return torch.empty(4000, dtype=torch.uint8).numel()

    def seen(phase, info):
        if phase == "start":
            during.append(inside[0])

    thresholds = gc.get_threshold()
    gc.callbacks.append(seen)
    try:
        gc.set_threshold(1, 1, 1)
        assert cpu_peak_bytes(step) == (4000, 4000)
        _ = [[] for _ in range(200)]
        assert gc.isenabled() and during and not any(during)  # due after the step: it ran
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*thresholds)


# -- the suggestion ------------------------------------------------------------------------------
@pytest.mark.parametrize(("largest", "global_batch", "workers", "margin", "expect"), [
    (100, 512, 2, 0.9, (64, 4)),  # 256 per worker; 0.9 x 100 = 90 -> largest divisor 64
    (37, 96, 1, 0.9, (32, 3)),  # 33 -> 32 divides 96
    (808, 64, 1, 0.9, (64, 1)),  # the whole share fits: no accumulation
    (7, 60, 2, 0.9, (6, 5)),  # 30 per worker; 6.3 -> 6
    (1, 64, 2, 0.9, (1, 32)),  # 0.9 rounds down to 0: at least 1
    (100, 200, 1, 1.0, (100, 2)),  # no margin
])
def test_the_suggestion_is_micro_x_accumulation_x_workers_within_the_margin(
        largest, global_batch, workers, margin, expect):
    s = suggest_batching(largest, global_batch, workers, margin)
    assert (s["micro_batch_size"], s["accumulation_steps"]) == expect
    assert s["micro_batch_size"] * s["accumulation_steps"] * workers == global_batch == s["global_batch_size"]
    assert s["micro_batch_size"] <= max(1, margin * largest)
    assert suggest_batching(0, global_batch, workers, margin) is None


def test_the_suggestion_for_the_adaptive_schedule_on_one_worker_is_a_config_it_accepts():
    """The adaptive schedule on one worker measures the noise scale from its first micro-batch:
    the config wants the micro-batch below train.batch_size_min, and the suggestion honours it
    (without `below` it would be the whole 512, which the config refuses)."""
    cfg = load_config(DIGITS, ["train.batch_size_schedule=adaptive", "train.batch_size_min=64",
                               "train.global_batch_size=512", "train.micro_batch_size=16",
                               "scaling.num_workers=1"])
    assert cfg.micro_batch_below() == 64
    s = suggest_batching(1000, 512, 1, below=cfg.micro_batch_below())
    assert (s["micro_batch_size"], s["accumulation_steps"]) == (32, 16)
    assert cfg.with_overrides({"train.micro_batch_size": 32}).train.micro_batch_size == 32
    with pytest.raises(ValueError, match="below train.batch_size_min=64"):
        cfg.with_overrides({"train.micro_batch_size": suggest_batching(1000, 512, 1)["micro_batch_size"]})
    assert suggest_batching(1000, 512, 1, below=1) is None  # no micro-batch is below 1


def test_a_size_that_does_not_fit_shows_no_speed_in_the_table_nor_the_plot(tmp_path, monkeypatch):
    """A trial that does not fit has no speed (`samples_per_s` null); a file that holds one
    anyway (a rank's own timing of a size another rank could not take, as the finder wrote
    before) shows none in the table and plots none either."""
    import pipeline.find_batch_size as fbs

    trials = [{"micro_batch_size": 64, "fits": True, "peak_memory_bytes": 2**20,
               "samples_per_s": 100.0, "note": None},
              {"micro_batch_size": 128, "fits": False, "peak_memory_bytes": 2**21,
               "samples_per_s": 150.0, "note": "another rank did not fit"}]
    assert table_lines({"trials": trials})[2].split() == [
        "128", "no", "2.0", "-", "another", "rank", "did", "not", "fit"]
    figures = []
    monkeypatch.setattr(fbs, "save_figure", lambda fig, path, dpi: figures.append(fig))
    fbs.plot({"trials": trials, "max_memory_bytes": None, "max_micro_batch_size": 64,
              "model": "mlp", "device": "cpu"}, tmp_path / "find_batch_size.png")
    (speeds,) = figures[0].axes[1].lines
    assert speeds.get_xydata().tolist() == [[64.0, 100.0]]


def _default_budget_rank(rank: int, world: int, hosts: tuple[str, ...], cfg, info):
    import socket

    import pipeline.find_batch_size as fbs

    socket.gethostname = lambda: hosts[rank]  # (this rank's process only)
    shared_by = []
    fbs._default_budget = lambda workers: shared_by.append(workers) or 8 * 2**20
    r = fbs.search(cfg, info, None, device=CPU)
    return shared_by, r["budget"], r["max_memory_bytes"]


@pytest.mark.timeout(300)
def test_the_default_cpu_budget_is_shared_by_the_workers_on_the_ranks_machine(data_dir):
    """`--on-workers` without --max-memory on CPU ranks: each rank's budget is half its
    machine's available memory over the workers on that machine -- not over all the workers,
    which shrank a rank alone on its node as the cluster grew. Three gloo ranks (no Ray) on two
    machines by host name, a and a and b; in one process, the config's workers share this
    machine."""
    import pipeline.find_batch_size as fbs
    from pipeline.data.datasets import resolve

    cfg, info = resolve(load_config(DIGITS, ["model.name=mlp", "scaling.num_workers=3",
                                               "train.global_batch_size=96"]))
    ranks = run_ranks(_default_budget_rank, 3, ("a", "a", "b"), cfg, info)
    assert [r[0] for r in ranks] == [[2], [2], [1]]
    assert [r[1] for r in ranks] == [
        "half the memory available over the 2 workers on this machine (no --max-memory)"] * 2 + [
        "half the memory available (no --max-memory)"]
    assert fbs.workers_on_this_machine(3) == 3  # no process group: a local cluster runs them here


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("64kib", 65536), ("1.5GiB", 3 * 2**29),
    ("2GB", 2 * 10**9), ("10 MB", 10**7), ("1000", 1000), ("1000B", 1000), ("1TiB", 2**40),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-5MiB", "0", "0.1B", "5XB", "MiB", "5 Mi B"])
def test_parse_size_refuses_what_is_not_a_size_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"^argument error: --max-memory: .* is not a memory size"):
        parse_size(text)


# -- the command ---------------------------------------------------------------------------------
def _run(argv, capsys):
    capsys.readouterr()
    rc = cli.run(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_find_batch_size_on_digits_writes_the_interface_and_finds_the_boundary(data_dir, tmp_path, capsys):
    rc, out, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                         "--max-memory", "64MiB", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "find_batch_size.json").read_text())
    assert {"max_micro_batch_size", "device", "suggestion", "trials"} <= set(r)
    assert r["device"].startswith("cpu") and r["max_memory_bytes"] == 64 * 2**20
    assert r["device"].endswith(", 1 thread)")  # as a worker of scaling.cpus_per_worker=1 runs
    for t in r["trials"]:
        assert {"micro_batch_size", "fits", "peak_memory_bytes", "samples_per_s"} <= set(t)
        assert t["fits"] == (t["peak_memory_bytes"] <= 64 * 2**20)
        assert (t["samples_per_s"] is not None) == t["fits"]
    n = r["max_micro_batch_size"]
    fitting = {t["micro_batch_size"] for t in r["trials"] if t["fits"]}
    assert n == max(fitting) and n + 1 in {t["micro_batch_size"] for t in r["trials"]}
    s = r["suggestion"]  # digits.yaml: global batch 64; one worker
    assert (s["micro_batch_size"], s["accumulation_steps"], s["num_workers"]) == (64, 1, 1)
    assert (tmp_path / "find_batch_size.png").stat().st_size > 0
    assert f"largest micro-batch that fits: {n}" in out
    lines = out.splitlines()  # the table, row by row as the sizes were tried, printed once
    table = table_lines(r)
    assert table[0] == "  size  fits    peak MiB   samples/s  note" and len(table) == len(r["trials"]) + 1
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table and lines.count(table[0]) == 1
    # the adaptive schedule's throughput model: the line through the timed trials' step times
    timed = [(t["micro_batch_size"], t["micro_batch_size"] / t["samples_per_s"])
             for t in r["trials"] if t["fits"]]
    c = r["step_cost_per_worker"]
    assert c == trial_step_cost([SimpleNamespace(**t) for t in r["trials"]])
    b, a = np.polyfit(*zip(*sorted(timed), strict=True), 1)  # one trial per size here
    if b > 0:  # (measured times: a busy machine could make the line fall; then no c, None)
        assert c == pytest.approx(max(a, 0) / b, rel=1e-3, abs=1e-3)
    else:
        assert c is None


def test_ctrl_c_on_find_batch_size_exits_1_with_one_line_and_writes_nothing(data_dir, tmp_path):
    """Ctrl-C during the search (the sequences' sizes take seconds to minutes each): exit 1, the
    interface's code for anything but success and bad input, with one line; no result file."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "find-batch-size", "--config", DIGITS, "--set",
             "data.name=sequences", "--set", "scaling.num_workers=1", "--out", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, proc.kill)  # a child that stalls fails the test, not hangs it
    watchdog.start()
    try:
        for line in proc.stdout:  # the first size tried
            if line.split()[:2] == ["1", "yes"]:
                break
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
    finally:
        watchdog.cancel()
    err = errors.read_text()
    assert proc.returncode == 1, err[-3000:]
    assert err.splitlines() == ["[pipeline] find-batch-size interrupted"]
    assert not (tmp_path / "find_batch_size.json").exists()


def test_find_batch_size_on_sequences_steps_the_longest_sequences(data_dir, tmp_path, capsys):
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "data.name=sequences",
                       "--set", "scaling.num_workers=1", "--max-memory", "24MiB",
                       "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "find_batch_size.json").read_text())
    assert r["model"] == "seq_transformer" and "(512 tokens)" in r["samples"]
    assert 1 <= r["max_micro_batch_size"] < 32  # 512 tokens padded: MiBs per sample


@pytest.mark.parametrize("name", ["sequences", "digits"])
def test_the_finder_reads_the_largest_rows_as_the_whole_table_gives_them(data_dir, name):
    """`LargestRows` (the rows of the longest sequences, read from the Parquet file when a size
    is tried) gives the batch the whole table gives, and reads the file only when a size grows
    past the largest read (the search's bisection steps stay below it). The small columns and
    the model's facts are those resolve read for its checks, and equal the whole table's."""
    import pyarrow.dataset as pads

    from pipeline.config import load_config
    from pipeline.data.batches import SampleTable, split_train_val
    from pipeline.data.datasets import resolve, small_columns
    from pipeline.find_batch_size import LargestRows, largest_first

    cfg, info = resolve(load_config(DIGITS, [f"data.name={name}", "scaling.num_workers=1"]))
    d = cfg.data
    whole = SampleTable.from_table(pads.dataset(info.uri).to_table(),
                                   feature_column=d.feature_column,
                                   label_column=d.label_column, sequence_column=d.sequence_column,
                                   target_column=d.target_column)
    small, facts = small_columns(cfg, info)
    assert small is info.small  # what resolve read for its checks, not read again
    shipped = pickle.loads(pickle.dumps(info))  # an info from elsewhere: read again
    assert info.small is not None and shipped.small is None
    again, facts_again = small_columns(cfg, shipped)
    for a, b in ((small.labels, again.labels), (small.lengths, again.lengths)):
        assert (a is None and b is None) or np.array_equal(a, b)
    import pyarrow.compute as pc

    def top(a):
        return None if a is None else pc.max(pc.list_flatten(a)).as_py()

    assert facts == facts_again == {  # the model's facts from the same pass, as the table has them
        "input_dim": None if whole.features is None else whole.features.shape[1],
        "max_token": top(whole.tokens), "max_target": top(whole.targets),
        "max_label": None if whole.labels is None else int(whole.labels.max())}
    assert (small.lengths is None) == (name == "digits")
    assert small.lengths is None or np.array_equal(small.lengths, whole.lengths)
    train, _ = split_train_val(len(small), small.labels, d.val_fraction, d.split_seed)
    order = largest_first(small.lengths, train)
    rows = LargestRows(pads.dataset(info.uri), cfg, order)
    for size, reads in [(1, 1), (2, 2), (4, 3), (8, 4), (6, 4), (5, 4), (7, 4), (16, 5)]:
        got = rows.window(size).gather(order[:size], max_length=None)  # as training gathers
        want = whole.gather(order[:size], max_length=None)
        assert got.keys() == want.keys() and rows.reads == reads
        for key in want:
            assert np.array_equal(got[key], want[key]), (size, key)
    assert rows.table.num_rows == 16  # the largest size tried, not the dataset


def test_the_finder_steps_the_batch_the_worker_would_collate_views_included(data_dir):
    """Under a contrastive loss the finder's batch of the first rows of its order is the
    worker's collate of the same positions (same views, keyed by (seed, 0, 0), digits as 8 x 8
    images). The order is shuffled here (digits' rows are all one size, so the longest-first
    order is the split's own, sorted): the finder's rows are gathered by dataset position."""
    import pyarrow.dataset as pads

    from pipeline.config import load_config
    from pipeline.data.batches import SampleTable, split_train_val
    from pipeline.data.datasets import resolve
    from pipeline.data.feed import RankFeed
    from pipeline.find_batch_size import LargestRows, _batch_maker

    cfg, info = resolve(load_config(DIGITS, ["train.loss=nt_xent", "batching.num_views=3",
                                             "scaling.num_workers=1"]))
    d = cfg.data
    whole = SampleTable.from_table(pads.dataset(info.uri).to_table(),
                                   feature_column=d.feature_column, label_column=d.label_column)
    train, _ = split_train_val(len(whole), whole.labels, d.val_fraction, d.split_seed)
    order = np.random.default_rng(0).permutation(train)
    assert not np.array_equal(order[:12], np.sort(order[:12]))
    feed = RankFeed(cfg, whole, train, rank=0, world=1, image_shape=(8, 8))
    want = feed.collate(order[:12], (cfg.batching.seed, 0, 0), whole)
    # its rows read from the files (in one process), or the whole table (--on-workers' ranks)
    for rows_of in (LargestRows(pads.dataset(info.uri), cfg, order).window, lambda size: whole):
        got = _batch_maker(cfg, order, rows_of, CPU, "digits_cnn")(12)
        assert set(got) == set(want) and len(want["features"]) == 36  # 12 samples x 3 views
        for key in want:
            assert np.array_equal(got[key].numpy(), want[key]), key


ADAPTIVE = ["--set", "train.batch_size_schedule=adaptive", "--set", "train.batch_size_min=32",
            "--set", "train.global_batch_size=256", "--set", "scaling.num_workers=2"]


def _finder_file(tmp_path, **content):
    path = tmp_path / "find_batch_size.json"
    path.write_text(json.dumps({"device": "cpu (test)", **content}))
    return str(path)


def test_throughput_file_fills_the_step_cost_for_the_jobs_workers(data_dir, tmp_path):
    """`train.batch_size_throughput`: the finder's per-worker c times the job's workers (a
    worker steps M / W samples: T = a + b M / W), filled before the job starts, and again for
    a sweep trial's own worker count."""
    path = _finder_file(tmp_path, step_cost_per_worker=75.0)
    args, cfg, _, _ = cli.prepare(["train", "--config", DIGITS, *ADAPTIVE,
                                   "--set", f"train.batch_size_throughput={path}"])
    assert cfg.train.batch_size_step_cost == 150.0
    assert cfg.train.batch_size_throughput == path
    from pipeline.data.datasets import resolve

    assert resolve(cfg)[0].train.batch_size_step_cost == 150.0
    # a sweep's trial with other workers than its config: filled again for its workers
    trial = resolve(cfg.with_overrides({"scaling.num_workers": 4}))[0]
    assert trial.train.batch_size_step_cost == 300.0
    # the resolved config (MLflow's config.yaml) holds both, in agreement: taken back as it is
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli.prepare(["train", "--config", str(saved)])[1] == cfg


@pytest.mark.parametrize(("extra", "content", "line"), [
    ([], None, "config error: train.batch_size_throughput: no such file: "),
    ([], {"step_cost_per_worker": None}, "config error: train.batch_size_throughput: "),
    # JSON's NaN (Python reads it): the refusal blamed train.batch_size_step_cost, not the file
    ([], {"step_cost_per_worker": float("nan")}, "config error: train.batch_size_throughput: "),
    (["--set", "train.batch_size_step_cost=100"], {"step_cost_per_worker": 75.0},
     "config error: train.batch_size_step_cost and train.batch_size_throughput are both set"),
    # the file's cost for 7 workers: a resolved config.yaml given back with other workers
    # (the line blamed both keys, not the worker count)
    (["--set", "train.batch_size_step_cost=525"], {"step_cost_per_worker": 75.0},
     "config error: train.batch_size_step_cost=525 is train.batch_size_throughput's step cost "
     "for 7 worker(s) (75 per worker), not for scaling.num_workers=2: set it to null"),
])
def test_throughput_file_refusals_exit_2_with_one_line(data_dir, tmp_path, capsys, extra,
                                                      content, line):
    path = (str(tmp_path / "missing.json") if content is None
            else _finder_file(tmp_path, **content))
    rc, _, err = _run(["train", "--config", DIGITS, *ADAPTIVE, *extra,
                       "--set", f"train.batch_size_throughput={path}",
                       "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(line), err


def test_a_throughput_file_of_another_model_precision_or_device_is_refused(data_dir, tmp_path,
                                                                         capsys):
    """A step cost is its setup's own: a file measured for seq_transformer in bf16 set the
    digits_cnn fp32 run's schedule silently. Refused, naming the keys and both values; a file
    of the same setup (or one that records none of it) is taken."""
    path = _finder_file(tmp_path, step_cost_per_worker=75.0, model="seq_transformer",
                        precision="bf16", loss="cross_entropy", device="cuda:0 (NVIDIA H100)")
    rc, _, err = _run(["train", "--config", DIGITS, *ADAPTIVE,
                       "--set", f"train.batch_size_throughput={path}",
                       "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.strip() == (
        f"config error: train.batch_size_throughput={path} was measured with "
        "model.name=seq_transformer, train.precision=bf16, scaling.use_gpu=true, this run has "
        "model.name=digits_cnn, train.precision=fp32, scaling.use_gpu=false: its step cost is "
        "that setup's (measure this one: find-batch-size with this config and --set "
        "train.batch_size_throughput=null; or set train.batch_size_step_cost instead)")
    same = _finder_file(tmp_path, step_cost_per_worker=75.0, model="digits_cnn",
                        precision="fp32", loss="cross_entropy")
    cfg = cli.prepare(["train", "--config", DIGITS, *ADAPTIVE,
                       "--set", f"train.batch_size_throughput={same}"])[1]
    assert cfg.train.batch_size_step_cost == 150.0


def test_a_throughput_file_under_another_schedule_is_noted_as_unused_and_not_read_into_c(
        data_dir, tmp_path):
    """As every setting of a schedule the config leaves off (a sweep over schedules holds the
    adaptive trials' settings): said at the start, not refused (it was, for the throughput
    file alone), and no step cost is filled from it."""
    from pipeline.data.datasets import resolve

    path = _finder_file(tmp_path, step_cost_per_worker=75.0)
    cfg = load_config(DIGITS, [*[a for a in ADAPTIVE if a != "--set"],
                               "train.batch_size_schedule=warmup",
                               "train.batch_size_warmup_steps=5",
                               f"train.batch_size_throughput={path}"])
    resolved = resolve(cfg)[0]
    assert resolved.train.batch_size_step_cost is None
    assert ("train.batch_size_throughput (train.batch_size_schedule=warmup)"
            in resolved.unused_settings())


def test_a_sweep_may_not_set_the_step_cost_two_ways(data_dir, tmp_path):
    """A swept step cost beside a throughput file: the file's cost replaced it in every trial
    (three trials of the same weights, labelled 100, 1,000 and 4,000)."""
    from pipeline.data.datasets import resolve
    from pipeline.tune.space import check_trials

    path = _finder_file(tmp_path, step_cost_per_worker=10.0)
    base = [*[a for a in ADAPTIVE if a != "--set"], f"train.batch_size_throughput={path}"]
    for space, key in [('{"train.batch_size_step_cost": {"grid": [100, 1000]}}',
                        "train.batch_size_step_cost"),
                       (f'{{"train.batch_size_throughput": {{"grid": ["{path}"]}}}}',
                        "train.batch_size_throughput")]:
        sets = base if "step_cost" in space else [*[a for a in ADAPTIVE if a != "--set"],
                                                  "train.batch_size_step_cost=150"]
        cfg, info = resolve(load_config(DIGITS, [*sets, f"tune.search_space={space}"]))
        with pytest.raises(ConfigError, match=rf"tune.search_space.{key}: "
                                              r"train.batch_size_throughput gives every trial"):
            check_trials(cfg, info)


@pytest.mark.parametrize(("argv", "line"), [
    (["--max-memory", "lots"], "argument error: argument --max-memory: 'lots' is not a memory size"),
    (["--max-memory", "1KiB"], "argument error: --max-memory: not even micro_batch_size=1 fits in"),
])
def test_find_batch_size_bad_budget_exits_2_with_one_line(data_dir, tmp_path, capsys, argv, line):
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                       "--out", str(tmp_path), *argv], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(line), err


class _AlwaysOOM(nn.Module):
    def __init__(self, input_dim: int, num_outputs: int):
        super().__init__()
        self.head = nn.Linear(input_dim, num_outputs)

    def forward(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated: every batch)")


def always_oom(*, input_dim, num_outputs, **_):
    """A model builder (`model.name=import:tests.engine.test_batch_finder:always_oom`)."""
    return _AlwaysOOM(input_dim, num_outputs)


def test_an_out_of_memory_within_the_budget_is_not_blamed_on_it(data_dir, tmp_path, capsys):
    """Size 1 fails, but by running out of memory, not by passing --max-memory: the budget is
    not the culprit (exit 1 and the out-of-memory line, not exit 2 naming --max-memory)."""
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                       "--set", "model.name=import:tests.engine.test_batch_finder:always_oom",
                       "--out", str(tmp_path), "--max-memory", "4GiB"], capsys)
    assert rc == 1
    assert err.splitlines()[-1] == "out of memory at micro_batch_size=1", err


def test_find_batch_size_without_a_budget_that_fits_nothing_exits_1(data_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """Without --max-memory the budget is the machine's (half its free memory): nothing fitting
    in it is not the user's input (exit 1), and the line says which budget it was."""
    import pipeline.find_batch_size

    monkeypatch.setattr(pipeline.find_batch_size, "_default_budget", lambda workers: 1024)
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                       "--out", str(tmp_path)], capsys)
    assert rc == 1
    assert err == ("not even micro_batch_size=1 fits in 1.00 KiB, half the memory available "
                   "(no --max-memory)\n"), err


def test_a_builder_that_fails_is_bad_input_in_one_line(data_dir, tmp_path, capsys):
    """A user's builder that raises when called (its signature passes the driver's check) is
    the config's fault, the same on every try: exit 2 and one line, as training says it (a
    traceback and exit 1 before)."""
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                       "--set", "model.name=import:tests.builders:fails_when_built",
                       "--out", str(tmp_path), "--max-memory", "64MiB"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "config error: model.name=import:tests.builders:fails_when_built: TypeError: "
        "fails_when_built() cannot build a model from ['activation_checkpointing', "), err


def test_an_out_of_memory_inside_the_optimizers_step_leaves_the_loss_scale_sound():
    """fp16's GradScaler, out of memory inside its optimizer step (the optimizer's first
    state, say): it kept the optimizer marked "unscaled", so the next size's step skipped
    unscale_ and applied gradients still multiplied by the loss scale (1024 here). The next
    step equals a plain step of the same batch (a CPU GradScaler stands in for CUDA's)."""
    import copy

    from pipeline.engine.batch_finder import make_trial_step

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, batch):
            return self.head(batch["features"])

    torch.manual_seed(0)
    model = Linear()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_step, calls = optimizer.step, []

    def step_out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: the optimizer's state)")
        return plain_step(*args, **kwargs)

    optimizer.step = step_out_of_memory_once
    batch = {"features": torch.randn(8, 4), "label": torch.randint(0, 3, (8,))}
    try_step = make_trial_step(model, optimizer, lambda size: batch, loss="cross_entropy",
                               device=torch.device("cpu"),
                               scaler=torch.amp.GradScaler("cpu", init_scale=1024.0),
                               timed_steps=0)
    assert try_step(8).note == "out of memory"
    assert try_step(8).fits
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(batch), batch["label"]).backward()
    ref_opt.step()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_a_suggested_step_of_several_micro_batches_fits_the_budget_as_trained():
    """A trial step starts without gradients; a training step of several micro-batches runs all
    but its first beside the gradients it accumulated. The suggestion bounds such a micro-batch
    by a second search whose steps hold them (`hold_gradients`; one worker here: no DDP
    buckets), so the step as `train_step` takes it stays within the budget -- the micro-batch
    bounded only by the largest that fits alone went over it (57 MiB of 48)."""
    from pipeline.engine.models import build_model
    from pipeline.engine.step import train_step

    cpu, budget = torch.device("cpu"), 48 * 2**20

    def fresh():
        torch.manual_seed(0)
        model = build_model(name="mlp", input_dim=64, num_outputs=10, vocab_size=None,
                            per_token=False, activation_checkpointing=False, hidden=1024, depth=4)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def batch_of(n):
        g = torch.Generator().manual_seed(n)
        return {"features": torch.randn(n, 64, generator=g),
                "label": torch.randint(0, 10, (n,), generator=g)}

    def trained_peak(micro, accumulation):
        model, opt = fresh()
        micro_batches = [batch_of(micro) for _ in range(accumulation)]
        train_step(model, opt, micro_batches, loss="cross_entropy", measure_noise=False)  # state
        before = resident_bytes(model, opt, micro_batches)
        _, during = cpu_peak_bytes(lambda: train_step(model, opt, micro_batches,
                                                      loss="cross_entropy", measure_noise=False))
        return before + during

    def search(**held):
        model, opt = fresh()
        return find_max_micro_batch(make_trial_step(
            model, opt, batch_of, loss="cross_entropy", device=cpu, max_memory_bytes=budget,
            timed_steps=0, **held), agree=lambda v: v).max_micro_batch_size

    alone, accumulating = search(), search(hold_gradients=True)
    assert 1 <= accumulating < alone
    unbounded = suggest_batching(alone, 1024, 1, 0.9)
    bounded = suggest_batching(alone, 1024, 1, 0.9, accumulating=accumulating)
    assert bounded["accumulation_steps"] > 1 and bounded["micro_batch_size"] <= 0.9 * accumulating
    assert trained_peak(bounded["micro_batch_size"], bounded["accumulation_steps"]) <= budget
    assert trained_peak(unbounded["micro_batch_size"], unbounded["accumulation_steps"]) > budget


def test_find_batch_size_searches_a_step_of_several_micro_batches_apart(data_dir, tmp_path,
                                                                       capsys):
    """A global batch the largest micro-batch alone cannot take in one step: the second search,
    its steps holding the gradients, bounds the suggestion, and both tables are in the output
    and the JSON."""
    budget = 32 * 2**20
    rc, out, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                         "--set", "train.global_batch_size=1024", "--set",
                         "train.micro_batch_size=null", "--max-memory", "32MiB",
                         "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "find_batch_size.json").read_text())
    held, alone = r["max_accumulating_micro_batch_size"], r["max_micro_batch_size"]
    assert 1 <= held <= alone < 1024 and r["accumulating_trials"]
    assert r["held_bytes"]["gradients"] > 0 and r["held_bytes"]["ddp_buckets"] == 0
    for t in r["accumulating_trials"]:
        assert t["fits"] == (t["peak_memory_bytes"] is not None
                             and t["peak_memory_bytes"] <= budget)
    s = r["suggestion"]
    assert s["accumulation_steps"] > 1 and s["micro_batch_size"] <= 0.9 * held
    assert s["max_accumulating_micro_batch_size"] == held
    assert f"largest that fits as the later micro-batches of a step of several: {held}" in out
    assert out.count("  size  fits    peak MiB   samples/s  note") == 2


@pytest.mark.parametrize("note", ["over budget (5.0 MiB > 4.0 MiB)", "out of memory (CUDA)"])
def test_nothing_fitting_beside_the_gradients_is_a_one_line_exit(data_dir, tmp_path, capsys,
                                                                 monkeypatch, note):
    """The first search found sizes that fit alone, the second (a step of several micro-batches,
    its gradients held) none: no suggestion, and a line saying why -- exit 2 for the user's
    --max-memory when size 1 failed on it (it was 0, with "suggestion": null and no word); a
    GPU's own out-of-memory within the budget is no bad input (exit 1). The search itself is
    played by a result of that shape (the window between the two peaks at size 1 is a few
    KiB)."""
    import pipeline.find_batch_size as fbs

    def found(cfg, info, out, max_memory, progress=False, on_workers=False, address=None):
        return {"max_micro_batch_size": 3, "max_accumulating_micro_batch_size": 0,
                "suggestion": None, "trials": [],
                "accumulating_trials": [{"micro_batch_size": 1, "fits": False, "note": note}],
                "max_memory_bytes": max_memory, "budget": "--max-memory", "hit_limit": False,
                "step_cost_per_worker": None}

    monkeypatch.setattr(fbs, "find_batch_size", found)
    rc, _, err = _run(["find-batch-size", "--config", DIGITS, "--set", "scaling.num_workers=1",
                       "--set", "train.global_batch_size=1024", "--set",
                       "train.micro_batch_size=null", "--max-memory", "16MiB",
                       "--out", str(tmp_path)], capsys)
    budget = note.startswith("over budget")
    assert rc == (2 if budget else 1)
    assert err == (f"{'argument error: --max-memory: ' if budget else ''}not even "
                   "micro_batch_size=1 fits beside the "
                   "gradients a step of several micro-batches holds in 16.0 MiB, --max-memory "
                   "(train.global_batch_size=1024 needs accumulation here)\n"), err


def test_a_workers_search_over_its_table_reads_no_file(data_dir, tmp_path):
    """`--on-workers`: a rank searches over the table the object store gave it, with the
    model's facts the info carries -- never the Parquet files, which may be on the driver's
    node only (its small columns are not sent with the info either) -- and finds what the
    search over the files finds."""
    import dataclasses

    import pyarrow.dataset as pads

    from pipeline.config import load_config
    from pipeline.data.batches import SampleTable
    from pipeline.data.datasets import resolve
    from pipeline.find_batch_size import search

    cfg, info = resolve(load_config(DIGITS, ["model.name=mlp", "scaling.num_workers=1"]))
    d = cfg.data
    table = SampleTable.from_table(pads.dataset(info.uri).to_table(),
                                   feature_column=d.feature_column, label_column=d.label_column)
    elsewhere = dataclasses.replace(info, uri=str(tmp_path / "on-the-driver-only.parquet"),
                                    small=None)
    on_worker = search(cfg, elsewhere, 2 * 2**20, device=CPU, table=table)
    here = search(cfg, info, 2 * 2**20, device=CPU)
    assert on_worker["max_micro_batch_size"] == here["max_micro_batch_size"] > 0
    assert [t["peak_memory_bytes"] for t in on_worker["trials"]] == \
        [t["peak_memory_bytes"] for t in here["trials"]]


def test_a_size_refused_again_when_asked_to_run_ends_the_search_there():
    """A try_step that refuses a size on its prediction even when asked to run it (a wrapper
    that drops `predict`) is taken as a failure there: the search ends (it asked for ever)."""
    from pipeline.engine.batch_finder import Measured, find_max_micro_batch

    asked: list[tuple[int, bool]] = []

    def stubborn(size: int, predict: bool = True) -> Measured:
        asked.append((size, predict))
        if size <= 8:
            return Measured(True, None, None)
        return Measured(False, None, None, "over budget (predicted)", predicted=True)

    s = find_max_micro_batch(stubborn)
    assert s.max_micro_batch_size == 8 and asked[-1] == (9, False)
    assert len(asked) == len(set(asked)) < 12
