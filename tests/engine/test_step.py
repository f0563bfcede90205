"""Engine steps without Ray: exact normalisation across micro-steps and ranks.

The reference is one step on the whole global batch in one piece (one process, one micro-batch).
Ranks are real processes joined by torch.distributed (gloo) with the model wrapped in DDP.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.data.padding import collate_sequences
from pipeline.data.plan import rank_slice
from pipeline.engine.loop import LoopState, NonFiniteError, train_epoch
from pipeline.engine.models import build_model
from pipeline.engine.step import evaluate, loss_sum, per_sample_loss, samples_in, to_torch, train_step
from tests.engine.ranks import run_ranks

G = 32


def make_dense(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"features": rng.normal(size=(G, 10)).astype(np.float32),
            "label": rng.integers(0, 3, size=G).astype(np.int64)}


def make_tokens(seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of very different lengths (2..60), so micro-batches hold unequal token counts."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([np.full(G // 2, 2), rng.integers(30, 61, G // 2)]).astype(np.int64)
    rng.shuffle(lengths)
    total = int(lengths.sum())
    return {"tokens_values": rng.integers(0, 16, total).astype(np.int64), "tokens_lengths": lengths,
            "targets_values": rng.integers(0, 4, total).astype(np.int64),
            "label": rng.integers(0, 3, G).astype(np.int64)}


def model_for(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        return build_model("mlp", input_dim=10, num_outputs=3, vocab_size=None, hidden=16)
    return build_model("seq_transformer", input_dim=None, num_outputs=4, vocab_size=16,
                       per_token=True, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)


def micro_batches(kind: str, idx: np.ndarray, micro: int, seed: int = 0, empty: bool = False
                  ) -> list[dict]:
    data = make_dense(seed) if kind == "dense" else make_tokens(seed)
    out = []
    for start in ([0] if empty else range(0, len(idx), micro)):
        part = idx[start : start + micro]
        if kind == "dense":
            out.append({k: torch.from_numpy(v[part]) for k, v in data.items()})
        else:
            offs = np.concatenate([[0], np.cumsum(data["tokens_lengths"])])
            vals = np.concatenate([data["tokens_values"][:0],
                                   *[data["tokens_values"][offs[i] : offs[i + 1]] for i in part]])
            tgts = np.concatenate([data["targets_values"][:0],
                                   *[data["targets_values"][offs[i] : offs[i + 1]] for i in part]])
            b = collate_sequences({"tokens_values": vals, "tokens_lengths": data["tokens_lengths"][part],
                                   "targets_values": tgts, "label": data["label"][part]})
            out.append({k: torch.from_numpy(v) for k, v in b.items()})
    return out


LOSS = {"dense": "cross_entropy", "tokens": "token_cross_entropy"}


def one_step(kind: str, rank: int, world: int, micro: int, ckpt: bool = False, n: int = G) -> dict:
    """One step on the global batch of samples 0..n-1, this rank's share of it in micro-batches
    (an empty share as one empty micro-batch, as `micro_slices` gives it)."""
    model = model_for(kind)
    model.activation_checkpointing = ckpt
    if world > 1:
        model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mine = rank_slice(np.arange(n), rank, world)
    train_step(model, opt, micro_batches(kind, mine, micro) or micro_batches(kind, mine, 1, empty=True),
               loss=LOSS[kind])
    m = model.module if world > 1 else model
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _ddp_step(rank: int, world: int, kind: str, micro: int, n: int = G) -> dict:
    return one_step(kind, rank, world, micro, n=n)


def run_ddp(kind: str, world: int, micro: int, n: int = G) -> dict:
    states = run_ranks(_ddp_step, world, kind, micro, n)
    for s in states[1:]:  # DDP keeps every rank's replica identical
        for k, v in s.items():
            assert torch.equal(v, states[0][k]), k
    return states[0]


def assert_same_update(ref: dict, got: dict, before: dict) -> None:
    """Equal within 1e-6 of the update's size, plus one fp32 spacing of the weights (the
    stored weights themselves are rounded to fp32 after the update)."""
    for k in ref:
        if not ref[k].is_floating_point():
            assert torch.equal(got[k], ref[k])
            continue
        update = (ref[k] - before[k]).abs().max().item()
        assert update > 0 or "running" in k
        spacing = torch.finfo(torch.float32).eps * ref[k].abs().max().item()
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6 * update + spacing)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_accumulation_and_ranks_equal_one_big_batch(kind):
    """(workers, micro, accumulation) = (1, 32, 1) == (1, 8, 4) == (2, 8, 2) == (2, 4, 4)."""
    before = model_for(kind).state_dict()
    ref = one_step(kind, 0, 1, micro=G)
    assert_same_update(ref, one_step(kind, 0, 1, micro=8), before)
    assert_same_update(ref, run_ddp(kind, world=2, micro=8), before)
    assert_same_update(ref, run_ddp(kind, world=2, micro=4), before)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_a_global_batch_smaller_than_the_ranks_trains_as_on_one_rank(kind):
    """A last global batch of 1 sample (drop_last=false) on 2 ranks: rank 1's share is empty
    (one empty micro-batch); the step is the 1-sample step of one rank -- the batch is trained,
    not dropped for lack of a sample on every rank (which made the batches, and the LR
    schedule's length, depend on the worker count)."""
    before = model_for(kind).state_dict()
    assert_same_update(one_step(kind, 0, 1, micro=8, n=1), run_ddp(kind, world=2, micro=8, n=1),
                       before)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
@pytest.mark.parametrize("world, n", [(2, 21), (3, 20)])
def test_a_short_last_window_on_uneven_shares_equals_it_in_one_piece(kind, world, n):
    """A short last global batch (21 or 20 samples, not 32) on 2 or 3 ranks: uneven shares
    (11 + 10; 7 + 7 + 6), each in micro-batches of up to 4 (the last of each share short):
    the step is the one-piece step of the n samples, for a dense and a token-level loss."""
    before = model_for(kind).state_dict()
    assert_same_update(one_step(kind, 0, 1, micro=n, n=n), run_ddp(kind, world=world, micro=4, n=n),
                       before)


def test_mean_of_means_differs_for_token_loss():
    """The test above can fail: averaging per-micro-batch token means gives another update."""
    ref = one_step("tokens", 0, 1, micro=G)
    model = model_for("tokens")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mbs = micro_batches("tokens", np.arange(G), 8)
    for mb in mbs:  # the 2024 accumulation bug: mean per micro-batch, then / accumulation
        out = model(mb)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), mb["token_targets"].flatten(),
                                                 ignore_index=-100)
        (loss / len(mbs)).backward()
    opt.step()
    diff = max((model.state_dict()[k] - ref[k]).abs().max().item() for k in ref)
    assert diff > 1e-4


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_activation_checkpointing_same_update(kind):
    before = model_for(kind).state_dict()
    assert_same_update(one_step(kind, 0, 1, micro=8), one_step(kind, 0, 1, 8, ckpt=True), before)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_activation_checkpointing_recomputes_the_blocks_in_backward(kind):
    """The test above would pass were the switch ignored (the same code twice): with it, each
    block's forward runs a second time in backward, per micro-batch (4 here); without, once."""
    runs = {}
    for ckpt in (False, True):
        model = model_for(kind)
        model.activation_checkpointing = ckpt
        calls = [0]
        for block in model.layers:  # (a forward hook is not called in the recompute)
            def counted(*args, forward=block.forward, calls=calls, **kwargs):
                calls[0] += 1
                return forward(*args, **kwargs)
            block.forward = counted
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_step(model, opt, micro_batches(kind, np.arange(G), 8), loss=LOSS[kind])
        runs[ckpt] = calls[0]
    blocks = len(model_for(kind).layers)
    assert runs == {False: 4 * blocks, True: 8 * blocks}


def _all_reduces_per_step(rank: int, world: int, micro: int) -> tuple[int, int]:
    """(gradient all-reduces, DDP's buckets) in one step of 32 samples on `world` ranks."""
    import torch.distributed as dist

    model = DDP(model_for("dense"))
    calls: list[int] = []

    def counted(_state, bucket):
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, counted)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mine = rank_slice(np.arange(G), rank, world)
    train_step(model, opt, micro_batches("dense", mine, micro), loss="cross_entropy")
    return len(calls), len(set(calls))


def test_gradients_are_all_reduced_on_the_last_micro_step_only():
    """Accumulation runs the micro-steps before the last under DDP's no_sync: 4 micro-steps
    a rank all-reduce each bucket once, as one micro-step does (syncing every micro-step would
    give the same update to rounding, so the equivalence tests cannot see it)."""
    (n4, buckets4), _ = run_ranks(_all_reduces_per_step, 2, 4)
    (n1, buckets1), _ = run_ranks(_all_reduces_per_step, 2, 16)
    assert buckets4 == buckets1 and n4 == n1 == buckets1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gradient_clipping_scales_the_update_to_the_clip_norm(precision):
    """A clip at a quarter of the gradient's norm: the update is the unclipped one times 1/4,
    and the step reports the norm before clipping. Under fp16 the gradients are unscaled
    before the clip: clipped while scaled (x 2^10) the update would be 1,024 times smaller."""
    def update(clip: float | None):
        model = model_for("dense")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "fp16" else None
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = train_step(model, opt, micro_batches("dense", np.arange(G), 8), loss="cross_entropy",
                         precision=precision, scaler=scaler, grad_clip=clip)
        assert not res.skipped
        return res.grad_norm, {k: v - before[k] for k, v in model.state_dict().items()}

    norm, free = update(None)
    clipped_norm, clipped = update(norm / 4)
    assert clipped_norm == pytest.approx(norm, rel=1e-6)
    total = math.sqrt(sum(float((d / 0.5).square().sum()) for d in clipped.values()))
    assert total == pytest.approx(norm / 4, rel=1e-4)  # the update's gradient: the clip norm
    for k, d in free.items():
        torch.testing.assert_close(clipped[k], d / 4, rtol=1e-4, atol=1e-7)


def test_short_last_window_is_exact():
    """A last global batch of 20 (not 32) split 8+8+4 equals 20 in one piece."""
    model_a, model_b = model_for("dense"), model_for("dense")
    idx = np.arange(20)
    for model, micro in ((model_a, 20), (model_b, 8)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_step(model, opt, micro_batches("dense", idx, micro), loss="cross_entropy")
    for k, v in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[k], v, rtol=0, atol=1e-6)


def test_bf16_autocast_trains_like_fp32():
    """bf16 autocast on CPU: the loss of each of 15 steps within bf16's unit roundoff (2^-8,
    relative) of fp32's (0.19% at most here), and it learns."""
    curves = {}
    for precision in ("fp32", "bf16"):
        model = model_for("dense")
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        mbs = micro_batches("dense", np.arange(G), 16)
        curves[precision] = [train_step(model, opt, mbs, loss="cross_entropy",
                                        precision=precision).loss for _ in range(15)]
    assert curves["bf16"][-1] < 0.6 * curves["bf16"][0]
    assert curves["bf16"] != curves["fp32"]  # autocast really ran in bf16
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=2**-8)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
@pytest.mark.parametrize("precision, roundoff", [("fp16", 2.0**-10), ("bf16", 2.0**-7)])
def test_a_low_precision_step_in_micro_batches_is_the_fp32_step_to_its_rounding(
        kind, precision, roundoff):
    """One step of 32 samples in 4 micro-batches under fp16 (with its scaler) or bf16
    autocast against the fp32 step in one piece: every weight's update within twice the
    precision's unit roundoff (2^-11 fp16, 2^-8 bf16) of the largest update (measured here:
    fp16 3.3e-4-4.0e-4 of it, bf16 1.6e-3-2.8e-3; one tensor alone may be further off,
    rounded at its own smaller scale). The weights, their gradients and the optimizer's
    state stay fp32 (master weights): autocast rounds the forward's matmuls only."""
    def update(prec: str, micro: int):
        model = model_for(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if prec == "fp16" else None
        res = train_step(model, opt, micro_batches(kind, np.arange(G), micro), loss=LOSS[kind],
                         precision=prec, scaler=scaler)
        assert not res.skipped
        kept = [p.dtype for p in model.parameters()] + [p.grad.dtype for p in model.parameters()
                                                         if p.grad is not None]
        kept += [s["momentum_buffer"].dtype for s in opt.state.values()]
        assert set(kept) == {torch.float32}
        return {k: v - before[k] for k, v in model.state_dict().items() if v.is_floating_point()}

    ref, got = update("fp32", G), update(precision, 8)
    scale = max(v.abs().max().item() for v in ref.values())
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert 0 < worst <= roundoff * scale  # (0: autocast really ran in the lower precision)


class OOMAbove(torch.nn.Module):
    """Raises CUDA-style out-of-memory for micro-batches above a size."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, batch):
        if batch["features"].shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(batch)


def test_auto_micro_batch_halves_on_oom_and_keeps_update():
    ref = one_step("dense", 0, 1, micro=G)
    model = OOMAbove(model_for("dense"), limit=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = LoopState(micro_batch_size=G)
    steps = [lambda size: micro_batches("dense", np.arange(G), size)]
    train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="cross_entropy", auto_micro=True)
    assert state.micro_batch_size == 4  # 32 -> 16 -> 8 -> 4
    for k, v in ref.items():
        torch.testing.assert_close(model.inner.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):
        state = LoopState(micro_batch_size=G)
        train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="cross_entropy")


class _OOMInBackward(torch.autograd.Function):
    """Identity forward; its backward raises out-of-memory above `limit` rows."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in backward)")
        return grad, None


class OOMOnOneRank(torch.nn.Module):
    """The dense model behind a BatchNorm (buffers to keep equal), out of memory above `limit`
    rows in forward or backward; `limit=None`: never."""

    def __init__(self, limit: int | None, where: str):
        super().__init__()
        self.inner, self.limit, self.where = model_for("dense"), limit, where
        self.norm = torch.nn.BatchNorm1d(10, affine=False)

    def forward(self, batch):
        x = self.norm(batch["features"])
        if self.limit is not None and self.where == "forward" and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        out = self.inner({"features": x})
        if self.limit is not None and self.where == "backward":
            out = _OOMInBackward.apply(out, self.limit)
        return out


def _auto_micro_rank(rank: int, world: int, where: str, limit: int | None, agree: bool):
    collate_oom = where == "collate"  # building the micro-batches runs out of memory
    model = DDP(OOMOnOneRank(None if collate_oom or rank != 1 else limit, where),
                forward_sync_buffers=not agree)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    state = LoopState(micro_batch_size=G // world)
    events: list[str] = []

    def build(size: int, seed: int) -> list:
        if collate_oom and rank == 1 and size > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, copying the batch)")
        return micro_batches("dense", rank_slice(np.arange(G), rank, world), size, seed=seed)

    steps = [lambda size, seed=seed: build(size, seed) for seed in range(3)]
    train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="cross_entropy",
                auto_micro=agree, on_event=events.append)
    return state.micro_batch_size, events, {k: v.detach().clone()
                                            for k, v in model.module.state_dict().items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["forward", "backward", "collate"])
def test_auto_micro_batch_out_of_memory_on_one_rank_shrinks_every_rank_together(where):
    """micro_batch_size=auto on 2 ranks, rank 1 out of memory above 5 rows (in forward, in
    backward, or building its micro-batches: the collate, the copy to the device): no hang, both ranks
    shrink 16 -> 8 -> 4 at the first step and keep 4, the replicas stay identical (buffers:
    rank 0's), and the weights equal a run of the same 3 steps without any out-of-memory."""
    (m0, ev0, w0), (m1, ev1, w1) = run_ranks(_auto_micro_rank, 2, where, 5, True)
    assert m0 == m1 == 4
    assert ev0 == ev1 == [
        "out of memory at step 1 (out of memory on 1 of 2 rank(s)): micro_batch_size 16 -> 8 on "
        "every rank (the step is retried)",
        "out of memory at step 1 (out of memory on 1 of 2 rank(s)): micro_batch_size 8 -> 4 on "
        "every rank (the step is retried)"]
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # The same 3 steps with DDP's own synchronisation and micro-batches of 4 from the start.
    (_, ev, ref), _ = run_ranks(_ref_rank, 2, where)
    assert ev == []
    for k in ref:
        torch.testing.assert_close(w0[k], ref[k], rtol=0, atol=1e-6)


def _ref_rank(rank: int, world: int, where: str):
    model = DDP(OOMOnOneRank(None, where))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    state = LoopState(micro_batch_size=4)
    steps = [lambda size, seed=seed: micro_batches("dense", rank_slice(np.arange(G), rank, world),
                                                   size, seed=seed) for seed in range(3)]
    events: list[str] = []
    train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="cross_entropy",
                on_event=events.append)
    return state.micro_batch_size, events, {k: v.detach().clone()
                                            for k, v in model.module.state_dict().items()}


class _OOMInOptimizerStep(torch.optim.SGD):
    """SGD whose first step updates the parameters and then runs out of memory (as Adam
    allocating its state on the first step can, or a fused step)."""

    calls = 0

    def step(self, closure=None):
        super().step(closure)
        type(self).calls += 1
        if type(self).calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the optimizer's step)")


def test_auto_micro_batch_does_not_retry_an_out_of_memory_after_the_update_began():
    """Only an out-of-memory in forward or backward is retried with a smaller micro-batch: one
    in the optimizer's step came after parameters changed, and a retry would apply the update
    twice. It is raised, with the update applied once."""
    model = model_for("dense")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _OOMInOptimizerStep(model.parameters(), lr=0.5)
    state = LoopState(micro_batch_size=G)
    steps = [lambda size: micro_batches("dense", np.arange(G), size)]
    with pytest.raises(torch.OutOfMemoryError, match="optimizer's step"):
        train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="cross_entropy",
                    auto_micro=True)
    assert _OOMInOptimizerStep.calls == 1 and state.micro_batch_size == G
    ref = one_step("dense", 0, 1, micro=G)  # one plain step from the same initial weights
    for k, v in ref.items():
        assert not torch.equal(model.state_dict()[k], before[k]), k
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)


class _FailsOnRank(torch.nn.Module):
    def __init__(self, fails: bool):
        super().__init__()
        self.inner, self.fails = model_for("dense"), fails

    def forward(self, batch):
        if self.fails:
            raise ValueError("a bug in rank 1's forward")
        return self.inner(batch)


def test_max_steps_stops_before_pulling_the_next_step():
    """train.max_steps ends the epoch right after the step that reaches it: the next step is
    not pulled (in the streaming mode pulling it fetches its rows, and an adaptive schedule
    decides its size), and the steps' generator sees no more of the epoch."""
    pulled: list[int] = []

    def steps():
        for i in range(6):
            pulled.append(i)
            yield lambda size: micro_batches("dense", np.arange(G), size)

    model = model_for("dense")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = LoopState(micro_batch_size=G)
    out = train_epoch(model, opt, steps(), state, lr_fn=lambda s: 0.5, loss="cross_entropy",
                      max_steps=2)
    assert state.step == 2 and out["steps"] == 2.0 and pulled == [0, 1]
    # a second call with the budget spent trains nothing and pulls nothing (the worker also
    # checks max_steps before it starts an epoch)
    pulled.clear()
    train_epoch(model, opt, steps(), state, lr_fn=lambda s: 0.5, loss="cross_entropy", max_steps=2)
    assert state.step == 2 and pulled == []


@pytest.mark.parametrize("case", ["mlp", "digits_cnn", "nt_xent", "padded", "packed",
                                  "per_token", "per_token_packed"])
def test_an_empty_validation_share_evaluates_to_nothing(case):
    """A rank's share of a validation split smaller than the ranks is empty: it still runs its
    forward pass (a DDP model's first forward after training broadcasts buffers to every rank)
    on the empty batch the feed collates, which every model and loss takes: 0 rows counted."""
    from pipeline.config import load_config
    from pipeline.data.batches import SampleTable
    from pipeline.data.datasets import make_digits, make_sequences
    from pipeline.data.feed import collate, image_shape

    digits = case in ("mlp", "digits_cnn", "nt_xent")
    sets = {"mlp": ["model.name=mlp"], "digits_cnn": ["model.name=digits_cnn"],
            "nt_xent": ["model.name=digits_cnn", "train.loss=nt_xent",
                        "batching.strategy=contrastive"],
            "padded": [], "packed": ["batching.packing=true"],
            "per_token": ["train.loss=token_cross_entropy"],
            "per_token_packed": ["train.loss=token_cross_entropy", "batching.packing=true"]}[case]
    if not digits:
        sets = ["data.name=sequences", "model.name=seq_transformer", *sets]
    cfg = load_config(None, sets)
    table = make_digits() if digits else make_sequences(n=64)
    st = (SampleTable.from_table(table, feature_column="features", label_column="label")
          if digits else
          SampleTable.from_table(table, feature_column=None, label_column="label",
                                 sequence_column="tokens", target_column="targets"))
    per_token = cfg.train.loss == "token_cross_entropy"
    model = build_model(cfg.model.name, input_dim=64 if digits else None,
                        num_outputs=32 if case == "nt_xent" else 10,  # an embedding (nt_xent)
                        vocab_size=None if digits else 64, per_token=per_token)
    shape = image_shape(cfg.model.name)
    batches = [to_torch(collate(cfg, part, (0, 0, 1), st, shape), torch.device("cpu"))
               for part in (np.zeros(0, np.int64), np.arange(4))]
    empty = evaluate(model, iter(batches[:1]), loss=cfg.train.loss)
    assert empty == {"val_loss": 0.0, "val_accuracy": 0.0}  # 0 / max(0, 1): nothing counted
    both = evaluate(model, iter(batches), loss=cfg.train.loss)
    alone = evaluate(model, iter(batches[1:]), loss=cfg.train.loss)
    assert both == pytest.approx(alone)  # the empty batch adds nothing


def test_a_global_batch_without_a_target_token_is_a_skipped_step():
    """Token-level loss over a global batch whose targets are all ignored (samples with no
    real target; truncation can make them): no loss element, so a zero loss and no update --
    not a ZeroDivisionError that Ray Train would retry as if transient, and not an optimizer
    step on a zero gradient, which AdamW's moments and weight decay would still move."""
    from pipeline.data.padding import IGNORE_INDEX

    model = build_model("seq_transformer", input_dim=None, num_outputs=4, vocab_size=16,
                        per_token=True, d_model=16, nhead=2, num_layers=1, dim_feedforward=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.int64),
             "attention_mask": torch.ones(2, 5, dtype=torch.bool),
             "token_targets": torch.full((2, 5), IGNORE_INDEX, dtype=torch.int64)}
    real = {**batch, "token_targets": torch.ones(2, 5, dtype=torch.int64)}
    assert not train_step(model, opt, [real], loss="token_cross_entropy").skipped  # moments
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    res = train_step(model, opt, [batch], loss="token_cross_entropy")
    assert (res.loss, res.count, res.correct, res.nonfinite, res.skipped) == \
        (0.0, 0.0, 0.0, False, True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(v, moments[k]) for k, v in opt.state_dict()["state"][0].items())
    # fp16: skipped too, the scale kept (no overflow to back off from), and the scaler's step
    # ended (the next one steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    res = train_step(model, opt, [batch], loss="token_cross_entropy", precision="fp16",
                     scaler=scaler)
    assert res.skipped and not res.nonfinite and scaler.get_scale() == 2.0**10
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not train_step(model, opt, [real], loss="token_cross_entropy", precision="fp16",
                          scaler=scaler).skipped
    # In an epoch of planned steps (a batch-size schedule's), with the noise scale measured
    # (two micro-batches a step): the step says nothing of the tokens per sample (which the
    # noise scale in samples and the adaptive schedule divide by), and the epoch's loss is its
    # steps'.
    from pipeline.engine.loop import PlannedStep
    from pipeline.engine.noise import NoiseScale

    state = LoopState(micro_batch_size=2, noise=NoiseScale())
    steps = [PlannedStep(lambda size, b=b: [b, b], lr=0.5, batch_size=4)
             for b in (real, real, batch)]
    norms: list[float] = []
    out = train_epoch(model, opt, steps, state, loss="token_cross_entropy",
                      on_step=lambda _, record: norms.append(record["grad_norm"]))
    assert state.noise.steps == 2 and out["steps"] == 3.0
    assert state.elements_per_sample == state.noise.per_sample == 5.0
    assert math.isfinite(out["train_loss"]) and out["train_loss"] > 0
    assert state.skipped_steps == 1 and state.nonfinite_steps == 0
    assert norms[2] == 0.0 and norms[0] > 0  # the epoch's mean: over the steps with a gradient
    assert out["grad_norm"] == pytest.approx((norms[0] + norms[1]) / 2, rel=1e-12)


def _error_rank(rank: int, world: int):
    model = DDP(_FailsOnRank(rank == 1), forward_sync_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = [lambda size: micro_batches("dense", rank_slice(np.arange(G), rank, world), size)]
    try:
        train_epoch(model, opt, steps, LoopState(micro_batch_size=G // world), lr_fn=lambda s: 0.5,
                    loss="cross_entropy", auto_micro=True)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.timeout(120)
def test_auto_micro_batch_an_error_on_one_rank_is_raised_on_every_rank_without_a_hang():
    """In the auto micro-batch mode a rank whose forward fails with another error than
    out-of-memory still joins the ranks' vote (rank 0 would otherwise wait in it forever): the
    failing rank raises its own error and the other says the step failed elsewhere."""
    r0, r1 = run_ranks(_error_rank, 2)
    assert r1 == "ValueError: a bug in rank 1's forward"
    assert r0 == "RuntimeError: the step failed on 1 other rank(s) of 2"


def test_evaluate_uses_running_stats():
    """BatchNorm at evaluation normalises with its running statistics, not the batch's: the
    same sample scores the same whatever its batch, and evaluation leaves the statistics as
    they were. The statistics are set far from a fresh layer's (mean 0, variance 1), so a
    forward that skipped BatchNorm, or used the batch's statistics, scores otherwise."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 4 + 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 64)
    y = torch.randint(0, 10, (16,))
    one = evaluate(model, iter([{"features": x[:1], "label": y[:1]}]), loss="cross_entropy")
    for k, v in model.state_dict().items():  # statistics neither updated nor counted
        assert torch.equal(v, before[k]), k
    assert not model.training  # (evaluate leaves the model in eval mode)
    with torch.no_grad():
        in_batch = model({"features": x})[:1]
        model.train()
        batch_stats = model({"features": x})[:1]  # the batch's own statistics
        model.eval()
        for bn in bns:
            bn.forward = torch.nn.Identity().forward  # no BatchNorm at all
        no_bn = model({"features": x})[:1]
    f = torch.nn.functional.cross_entropy
    assert abs(one["val_loss"] - f(in_batch, y[:1]).item()) < 1e-5
    assert abs(one["val_loss"] - f(batch_stats, y[:1]).item()) > 1e-2
    assert abs(one["val_loss"] - f(no_bn, y[:1]).item()) > 1e-2


def test_fp16_scaler_path_counts_skipped_steps():
    """The fp16 path (autocast + GradScaler, unscale before clipping) on CPU: a step whose
    gradients overflow is skipped (weights unchanged, scale halved) and reported as skipped."""
    model = model_for("dense")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    mbs = micro_batches("dense", np.arange(G), 16)
    ok = train_step(model, opt, mbs, loss="cross_entropy", precision="fp16", scaler=scaler,
                    grad_clip=1.0)
    assert not ok.skipped and ok.grad_norm > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a finite loss whose scaled gradients overflow fp16: the scaler's to skip and back off
    scaler.update(2.0**60)
    res = train_step(model, opt, mbs, loss="cross_entropy", precision="fp16", scaler=scaler)
    assert res.skipped and not res.nonfinite and math.isfinite(res.loss)
    assert scaler.get_scale() == 2.0**59
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fp16_a_nonfinite_loss_is_a_nonfinite_step_and_keeps_the_loss_scale():
    """Under fp16 a NaN loss is not a gradient overflow the scaler could cure by a smaller
    scale (the loss is unscaled): the step is non-finite (so `train.nonfinite: stop` stops on
    it, where it used to pass as a scaler skip for ever), skipped, and the scale kept."""
    model = model_for("dense")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    mbs = micro_batches("dense", np.arange(G), 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan = [{**mb, "features": mb["features"] * math.nan} for mb in mbs]
    for _ in range(2):
        res = train_step(model, opt, nan, loss="cross_entropy", precision="fp16", scaler=scaler)
        assert res.nonfinite and res.skipped and scaler.get_scale() == 2.0**10
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ok = train_step(model, opt, mbs, loss="cross_entropy", precision="fp16", scaler=scaler)
    assert not ok.skipped and not ok.nonfinite  # the scaler's state was ended: it steps again
    # the run of clean steps that grows the scale starts again after it, as after a skip:
    # clean, NaN, clean with growth every 2 clean steps keeps the scale
    grows = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for batch in (mbs, nan, mbs):
        train_step(model, opt, batch, loss="cross_entropy", precision="fp16", scaler=grows)
    assert grows.get_scale() == 2.0**10
    state = LoopState(micro_batch_size=16)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        train_epoch(model, opt, [lambda size: nan], state, lr_fn=lambda s: 0.1,
                    loss="cross_entropy", scaler=scaler, nonfinite="stop")


def test_per_sample_loss_is_each_samples_own_loss():
    """Hard-example mining's score: a sample's loss alone (its tokens' mean for per-token
    targets, padding and ignored tokens left out); NT-Xent has none and says so."""
    g = torch.Generator().manual_seed(0)
    out, label = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    per = per_sample_loss(out, {"label": label}, "cross_entropy")
    for i in range(5):
        alone, _ = loss_sum(out[i : i + 1], {"label": label[i : i + 1]}, "cross_entropy")
        assert per[i].item() == pytest.approx(alone.item(), rel=1e-6)
    out = torch.randn(3, 4, 6, generator=g)
    targets = torch.tensor([[1, 2, -100, -100], [0, 0, 0, 5], [3, -100, -100, -100]])
    per = per_sample_loss(out, {"token_targets": targets}, "token_cross_entropy")
    for i, real in enumerate((2, 4, 1)):
        alone, _ = loss_sum(out[i : i + 1], {"token_targets": targets[i : i + 1]},
                            "token_cross_entropy")
        assert per[i].item() == pytest.approx(alone.item() / real, rel=1e-6)
    with pytest.raises(ValueError, match="nt_xent"):
        per_sample_loss(torch.randn(4, 8), {"view_to_sample": torch.tensor([0, 1, 0, 1])},
                        "nt_xent")


def test_samples_in_counts_samples_not_rows():
    """Contrastive rows are views of fewer samples; a packed row holds several samples."""
    assert samples_in({"features": torch.zeros(6, 2), "label": torch.zeros(6)}) == 6
    views = {"sample_id": torch.tensor([7, 9, 7, 7, 9, 7]), "features": torch.zeros(6, 2),
             "view_to_sample": torch.tensor([0, 1, 0, 0, 1, 0]),  # sample 7 drawn twice
             "view_index": torch.tensor([0, 0, 0, 1, 1, 1])}
    assert samples_in(views) == 3
    packed = {"sample_id": torch.tensor([3, 1, 2, 8, 5]), "input_ids": torch.zeros(2, 16)}
    assert samples_in(packed) == 5
    assert samples_in(views, views, packed) == 3 + 3 + 5  # a step's micro-batches together
    assert samples_in() == 0


def _contrastive_val_rank(rank: int, world: int, micro: int, whole: bool = False
                          ) -> dict[str, float]:
    """NT-Xent validation as the worker takes it (`contrastive_val_batches`), on a DDP
    digits_cnn (BatchNorm buffers) of the same weights on every rank; `whole`: one NT-Xent
    over the 700 rows instead."""
    from pipeline.config import load_config
    from pipeline.data.batches import SampleTable
    from pipeline.data.datasets import make_digits
    from pipeline.data.feed import collate
    from pipeline.engine.step import contrastive_val_batches

    cfg = load_config(None, ["train.loss=nt_xent", "model.name=digits_cnn"])
    st = SampleTable.from_table(make_digits(), feature_column="features", label_column="label")
    torch.manual_seed(0)
    net = build_model("digits_cnn", input_dim=64, num_outputs=16, vocab_size=None)
    model = DDP(net) if world > 1 else net
    batches = ([[np.arange(700)]] if whole
               else contrastive_val_batches(np.arange(700), rank, world, micro))
    return evaluate(model, iter([[to_torch(collate(cfg, p, (0, 0, 1), st, (8, 8)),
                                           torch.device("cpu")) for p in batch]
                                 for batch in batches]), loss="nt_xent")


def test_contrastive_validation_is_the_same_on_any_worker_count_and_micro_batch():
    """NT-Xent's value depends on its batch: validation takes fixed batches of 256 samples
    (700 rows: 256, 256, 188), so 1 worker in micro-batches of 64 and 2 workers in
    micro-batches of 16 (one of them with an empty batch slot) give the same loss and
    retrieval accuracy; one NT-Xent over all 700 rows (more negatives) gives another."""
    from pipeline.engine.step import CONTRASTIVE_VAL_SAMPLES

    assert CONTRASTIVE_VAL_SAMPLES == 256
    one = _contrastive_val_rank(0, 1, 64)
    r0, r1 = run_ranks(_contrastive_val_rank, 2, 16)
    assert r0 == r1
    assert r0["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert r0["val_accuracy"] == pytest.approx(one["val_accuracy"], rel=1e-6)
    whole = _contrastive_val_rank(0, 1, 700, whole=True)
    assert abs(whole["val_loss"] - one["val_loss"]) > 0.01 * one["val_loss"]


class _BadRows(ValueError):
    """Stands for the worker's ConfigError: bad input met on a rank."""


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                       torch.nn.Linear(8, 3))

    def forward(self, batch):
        return self.seq(batch["features"])


def _one_rank_fails_rank(rank: int, world: int, where: str) -> tuple:
    """Rank 1 fails at step 3 (taking its rows, or building its micro-batches) or in its
    second validation batch; what each rank raised, and at which step."""
    torch.manual_seed(0)
    model = DDP(_BatchNormNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    batches = [{"features": torch.randn(4, 4, generator=g),
                "label": torch.randint(0, 3, (4,), generator=g)} for _ in range(5)]
    error = _BadRows("row 7 changed") if where != "other" else RuntimeError("disk gone")

    def steps():
        for i, b in enumerate(batches):
            if rank == 1 and i == 2 and where == "rows":
                raise error
            if rank == 1 and i == 2 and where in ("collate", "other"):
                def failing(size):
                    raise error
                yield failing
                continue
            yield lambda size, b=b: [b]

    def validation():
        for i, b in enumerate(batches):
            if rank == 1 and i == 1:
                raise error
            yield b

    state = LoopState(micro_batch_size=4)
    try:
        train_epoch(model, optimizer, steps(), state, lr_fn=lambda s: 0.1, loss="cross_entropy",
                    input_errors=(_BadRows,))
        evaluate(model, validation(), loss="cross_entropy", input_errors=(_BadRows,))
    except (_BadRows, RuntimeError) as err:
        from pipeline.engine.step import PeerError

        if isinstance(err, PeerError):
            return "peer", err.input_error, state.step
        return "own", str(err), state.step
    return "went on", None, state.step


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "step", "input_error"), [
    ("rows", 2, True), ("collate", 2, True), ("other", 2, False), ("eval", 5, True)])
def test_a_rank_failing_before_its_step_fails_every_rank_there(where, step, input_error):
    """A rank whose rows of a step fail (fetched, found changed since the checks), whose
    micro-batches cannot be built, or whose validation batch fails, raises its error and
    every other rank `PeerError` at the same collective -- none waits in a later one (the
    other rank would otherwise hang in the step's all-reduce or DDP's buffer broadcast); bad
    input stays bad input on every rank."""
    r0, r1 = run_ranks(_one_rank_fails_rank, 2, where)
    message = "disk gone" if where == "other" else "row 7 changed"
    assert r1 == ("own", message, step)
    assert r0 == ("peer", input_error, step)


def test_the_gradient_norm_is_the_same_where_torch_has_no_get_total_norm(monkeypatch):
    """torch < 2.6 has no `get_total_norm`: the step's norm comes from clipping at infinity,
    the same value (a step's `grad_norm` when `train.grad_clip` is unset)."""
    from pipeline.engine.step import _total_norm

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    params = list(model.parameters())
    want = float(torch.cat([p.grad.flatten() for p in params]).norm())
    assert float(_total_norm(params)) == pytest.approx(want, rel=1e-6)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    assert float(_total_norm(params)) == pytest.approx(want, rel=1e-6)


def _contrastive_step(rank: int, world: int, samples: int) -> dict:
    """One NT-Xent step (an MLP embedding 10 -> 8, two views per sample) over the global batch
    of samples 0..samples-1, this rank's share of the samples (both views each) as one
    micro-batch: an empty share is one empty micro-batch."""
    data = make_dense(1)
    torch.manual_seed(0)
    model = build_model("mlp", input_dim=10, num_outputs=8, vocab_size=None, hidden=16)
    if world > 1:
        model = DDP(model)
    mine = rank_slice(np.arange(samples), rank, world)
    rows = np.repeat(mine, 2)  # views 2s and 2s+1 of sample s: its features, and a shifted copy
    feats = data["features"][rows] + np.tile([0.0, 0.1], len(mine))[:, None].astype(np.float32)
    mb = {"features": torch.from_numpy(feats), "view_to_sample": torch.from_numpy(rows)}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_step(model, opt, [mb], loss="nt_xent")
    m = model.module if world > 1 else model
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(("world", "samples"), [(2, 4), (3, 2)])
def test_contrastive_step_on_several_ranks_equals_one_rank_even_with_an_empty_share(world, samples):
    """NT-Xent by gradient caching over the ranks' gathered embeddings: several ranks give the
    one rank's update on the same global batch -- 4 samples on 2 ranks (2 each), and a last
    batch of 2 samples on 3 ranks (rank 2's share empty, which must still take part in DDP's
    gradient all-reduce; 1 sample alone would have no negative: a zero loss)."""
    torch.manual_seed(0)
    before = build_model("mlp", input_dim=10, num_outputs=8, vocab_size=None, hidden=16).state_dict()
    states = run_ranks(_contrastive_step, world, samples)
    for other in states[1:]:
        for k, v in other.items():
            assert torch.equal(v, states[0][k]), k
    assert_same_update(_contrastive_step(0, 1, samples), states[0], before)
