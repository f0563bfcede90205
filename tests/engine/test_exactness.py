"""Exactness of the engine where the batch split could leak into the update (issue 9):
BatchNorm under activation checkpointing and micro-batching, contrastive loss across
micro-batches and ranks, non-finite steps, and forward randomness per rank.

Each test has a counter-check showing the naive path differs, so it can fail."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from pipeline.data.batches import SampleTable, split_train_val
from pipeline.data.datasets import make_digits
from pipeline.data.plan import SampleMeta, plan_epoch, rank_slice
from pipeline.data.views import make_views
from pipeline.engine.batchnorm import ghost_batch_norm
from pipeline.engine.contrastive import nt_xent
from pipeline.engine.loop import LoopState, NonFiniteError, assert_finite_weights, train_epoch
from pipeline.engine.models import build_model
from pipeline.engine.step import train_step
from tests.engine.ranks import run_ranks


def digits_cnn(ckpt: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None,
                       activation_checkpointing=ckpt)


def states_equal(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------- 1. checkpointing and BN


def _digits_epoch(ckpt: bool, micro: int = 32) -> dict:
    st = SampleTable.from_table(make_digits(), feature_column="features", label_column="label")
    train, _ = split_train_val(len(st), st.labels, 0.2, 0)
    plan = plan_epoch("random", SampleMeta(ids=train), seed=0, epoch=0, global_batch_size=64)
    model = digits_cnn(ckpt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(batch: np.ndarray):
        def micro_batches(size: int) -> list[dict]:
            return [{k: torch.from_numpy(v) for k, v in st.gather(batch[i : i + size]).items()}
                    for i in range(0, len(batch), size)]
        return micro_batches

    state = LoopState(micro_batch_size=micro)
    train_epoch(model, opt, (step(b) for b in plan.batches), state, lr_fn=lambda s: 0.05,
                loss="cross_entropy", seed=0)
    assert state.step == len(plan.batches)
    return {**model.state_dict(), "steps": torch.tensor(state.step)}


def test_checkpointing_one_digits_epoch_same_weights_and_buffers():
    plain, ckpt = _digits_epoch(False), _digits_epoch(True)
    # once per micro-batch (64 = 2 x 32) and step, as without checkpointing
    assert int(ckpt["blocks.0.1.num_batches_tracked"]) == 2 * int(plain["steps"])
    states_equal(plain, ckpt, atol=0)  # bit-identical on CPU: the recompute is the same forward


@pytest.mark.parametrize("frozen", [True, False])
def test_the_models_checkpointed_blocks_count_batchnorm_once(frozen, monkeypatch):
    """Through the model's own checkpointed path: BatchNorm counts a step once, and without
    the freeze its recompute would count it twice (the guard is on that path)."""
    import contextlib

    import pipeline.engine.models as models

    if not frozen:
        monkeypatch.setattr(models, "running_stats_frozen", lambda m: contextlib.nullcontext())
    model = digits_cnn(ckpt=True)
    _step(model, [_dense_batch()])
    assert int(model.blocks[0][1].num_batches_tracked) == (1 if frozen else 2)


def test_plain_torch_checkpoint_would_count_batchnorm_twice():
    """Counter-check: torch's checkpoint alone re-runs BatchNorm in train mode in backward."""
    model = digits_cnn()
    x = torch.randn(16, 1, 8, 8)
    out = checkpoint(model.blocks[0], x, use_reentrant=False)
    out.sum().backward()
    assert int(model.blocks[0][1].num_batches_tracked) == 2


# ----------------------------------------------------------------- 2. ghost batch norm


def _dense_batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(n, 64, generator=g), "label": torch.randint(0, 10, (n,), generator=g)}


def _split(batch: dict, size: int) -> list[dict]:
    n = batch["label"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _step(model, micro_batches) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_step(model, opt, micro_batches, loss="cross_entropy")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_micro_batching_is_ghost_batch_norm():
    batch = _dense_batch()
    micro = _step(digits_cnn(), _split(batch, 8))
    ghost_model = digits_cnn()
    with ghost_batch_norm(ghost_model, 8):
        ghost = _step(ghost_model, [batch])
    states_equal(ghost, micro, atol=1e-6)  # weights, running stats and counters
    whole = _step(digits_cnn(), [batch])  # counter-check: not the whole-batch update
    diff = max((whole[k] - micro[k]).abs().max().item() for k in whole if whole[k].is_floating_point())
    assert diff > 1e-3


def _ghost_ddp_rank(rank: int, world: int, micro: int) -> dict:
    model = DDP(digits_cnn())
    mine = {k: v[rank_slice(np.arange(32), rank, world)] for k, v in _dense_batch().items()}
    _step(model, _split(mine, micro))
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_ghost_batch_norm_without_running_statistics_normalises_by_the_batch_in_eval():
    """A BatchNorm built with track_running_stats=False has no running statistics: PyTorch
    normalises by the batch's in eval mode too, and so does the ghost-batch helper (it raised
    'running_mean must be defined in evaluation mode')."""
    bn = torch.nn.BatchNorm1d(2, track_running_stats=False).eval()
    x = torch.arange(8.0).reshape(4, 2)
    with ghost_batch_norm(bn, 2):
        ghost = bn(x)
    halves = torch.cat([bn(x[:2]), bn(x[2:])])
    torch.testing.assert_close(ghost, halves)


def test_ranks_without_syncbn_are_ghost_batches_too():
    """2 ranks x micro 8: the weights of a ghost-8 whole-batch step. (Running statistics are
    rank 0's: DDP broadcasts rank 0's buffers at every forward.)"""
    ghost_model = digits_cnn()
    with ghost_batch_norm(ghost_model, 8):
        ghost = _step(ghost_model, [_dense_batch()])
    got = run_ranks(_ghost_ddp_rank, 2, 8)[0]
    weights = [k for k in ghost if "running" not in k and "num_batches" not in k]
    states_equal({k: ghost[k] for k in weights}, {k: got[k] for k in weights}, atol=1e-6)
    # the running statistics: a ghost-8 step on rank 0's 16 samples alone
    mine = {k: v[rank_slice(np.arange(32), 0, 2)] for k, v in _dense_batch().items()}
    alone = digits_cnn()
    with ghost_batch_norm(alone, 8):
        alone_state = _step(alone, [mine])
    stats = [k for k in ghost if k not in weights]
    assert stats and any("running_mean" in k for k in stats)
    states_equal({k: alone_state[k] for k in stats}, {k: got[k] for k in stats}, atol=1e-6)
    whole = [k for k in stats if ghost[k].is_floating_point()]  # (not the whole batch's)
    assert max((ghost[k] - got[k]).abs().max().item() for k in whole) > 1e-3


# ----------------------------------------------------------------- 3. contrastive


N_SAMPLES, VIEWS = 16, 2


def _contrastive_data() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(N_SAMPLES, 10)).astype(np.float32)


def _views(samples: np.ndarray) -> dict[str, torch.Tensor]:
    """Keyed views of these sample ids; view_to_sample = the sample id (unique globally)."""
    nb = make_views({"features": _contrastive_data()[samples]}, num_views=VIEWS, key=(0, 0),
                    sample_keys=samples)
    return {"features": torch.from_numpy(nb["features"]),
            "view_to_sample": torch.from_numpy(samples[nb["view_to_sample"]]),
            "view_index": torch.from_numpy(nb["view_index"])}


def _embedder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", input_dim=10, num_outputs=8, vocab_size=None, hidden=16)


def _reference_contrastive() -> dict:
    """The global batch in one piece, the loss written out plainly (no gradient caching)."""
    model = _embedder()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = _views(np.arange(N_SAMPLES))
    nt_xent(model(b), b["view_to_sample"], temperature=0.5).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _contrastive_rank(rank: int, world: int, micro: int) -> dict:
    model = _embedder()
    if world > 1:
        model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mine = rank_slice(np.arange(N_SAMPLES), rank, world)
    res = train_step(model, opt, [_views(mine[i : i + micro]) for i in range(0, len(mine), micro)],
                     loss="nt_xent")
    m = model.module if world > 1 else model
    return {"state": {k: v.detach().clone() for k, v in m.state_dict().items()}, "loss": res.loss,
            "samples": res.local_samples, "mine": len(mine)}


def test_contrastive_auto_micro_batch_on_one_worker_shrinks_and_keeps_the_update():
    """`micro_batch_size: auto` with NT-Xent on one worker: an out-of-memory in the gradient
    cached step (views of more than 4 samples, here) shrinks the micro-batch and retries the
    step, whose update is still the global batch's."""

    class OOMAbove4(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _embedder()

        def forward(self, batch):
            if batch["features"].shape[0] > 4 * VIEWS:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(batch)

    model = OOMAbove4()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = LoopState(micro_batch_size=N_SAMPLES)
    samples = np.arange(N_SAMPLES)
    steps = [lambda size: [_views(samples[i : i + size]) for i in range(0, N_SAMPLES, size)]]
    train_epoch(model, opt, steps, state, lr_fn=lambda s: 0.5, loss="nt_xent", auto_micro=True)
    assert state.micro_batch_size == 4  # 16 -> 8 -> 4
    states_equal(_reference_contrastive(), model.inner.state_dict(), atol=1e-6)


@pytest.mark.parametrize(("world", "micro"), [(1, 16), (1, 4), (2, 8), (2, 2)])
def test_contrastive_update_is_the_global_batch_update(world, micro):
    ref = _reference_contrastive()
    before = _embedder().state_dict()
    got = (run_ranks(_contrastive_rank, world, micro)[0] if world > 1
           else _contrastive_rank(0, 1, micro))
    b = _views(np.arange(N_SAMPLES))
    expected_loss = nt_xent(_embedder()(b), b["view_to_sample"], temperature=0.5).item()
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert got["samples"] == got["mine"] == N_SAMPLES // world  # samples, not their views
    for k, v in ref.items():
        update = (v - before[k]).abs().max().item()
        assert update > 0
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-6 * update + 1e-7, msg=k)


def test_per_micro_batch_contrastive_loss_differs():
    """Counter-check: NT-Xent inside each micro-batch (negatives only there) is another loss."""
    model = _embedder()
    whole = _views(np.arange(N_SAMPLES))
    full = nt_xent(model(whole), whole["view_to_sample"]).item()
    parts = [_views(np.arange(i, i + 8)) for i in (0, 8)]
    split = np.mean([nt_xent(model(p), p["view_to_sample"]).item() for p in parts])
    assert abs(split - full) / full > 0.05


# ----------------------------------------------------------------- 5. non-finite steps


def test_nonfinite_step_is_skipped_and_weights_stay():
    model = _embedder()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"features": torch.full((4, 10), math.inf), "label": torch.zeros(4, dtype=torch.int64)}
    res = train_step(model, opt, [bad], loss="cross_entropy")
    assert res.nonfinite and res.skipped
    states_equal(before, model.state_dict(), atol=0)


def _loop(policy: str, limit: int, bad_steps: set[int], n: int = 5):
    model = build_model("mlp", input_dim=10, num_outputs=3, vocab_size=None, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        x = torch.randn(8, 10, generator=g) * (math.nan if i in bad_steps else 1.0)
        batches.append({"features": x, "label": torch.randint(0, 3, (8,), generator=g)})
    state = LoopState(micro_batch_size=8, epoch=2)
    train_epoch(model, opt, [(lambda size, b=b: [b]) for b in batches], state,
                lr_fn=lambda s: 0.1, loss="cross_entropy", nonfinite=policy, nonfinite_limit=limit)
    return state, model


def test_nonfinite_stop_names_epoch_and_step():
    with pytest.raises(NonFiniteError, match=r"epoch 3, step 2 .*, lr=0.1\); the update.*nonfinite=stop"):
        _loop("stop", 0, {1})
    state, _ = _loop("stop", 1, {1})  # one tolerated
    assert state.nonfinite_steps == 1 and state.step == 5


def test_nonfinite_skip_counts_and_goes_on():
    state, model = _loop("skip", 0, {0, 3})
    assert (state.nonfinite_steps, state.skipped_steps, state.step) == (2, 2, 5)
    assert_finite_weights(model, "after the epoch")  # no exception


class _InfGradientOn(torch.nn.Module):
    """The model, but a batch whose first feature is `mark` gets a finite loss and an infinite
    gradient: sqrt(y - y) adds 0 to the logits, and its derivative at 0 is inf."""

    def __init__(self, model: torch.nn.Module, mark: float) -> None:
        super().__init__()
        self.model, self.mark = model, mark

    def forward(self, batch):
        out = self.model(batch)
        if batch["features"][0, 0].item() == self.mark:
            out = out + torch.sqrt(out - out.detach())
        return out


@pytest.mark.parametrize(("scaled", "bad"), [(False, "nan_input"), (True, "nan_input"),
                                             (False, "inf_gradient")],
                         ids=["fp32", "grad_scaler", "fp32_finite_loss_inf_gradient"])
def test_a_skipped_step_leaves_batchnorm_statistics_and_the_epochs_means_alone(scaled, bad):
    """train.nonfinite=skip on a BatchNorm model: the NaN batch's forward moved the running
    statistics to NaN, which the epoch end's finite-weights check would then refuse (a skip
    that stops the job); they are put back with the update skipped. The epoch's train_loss,
    accuracy and grad_norm are those of the finite steps: the same as an epoch without the
    bad batch, which also trains to the same weights. With a gradient scaler (fp16) the NaN
    loss is a non-finite step too (no loss scale cures it), the scale kept: the same holds.
    And for a step whose loss is finite but whose gradient is not (fp32): its loss is not in
    the epoch's means either (it was, 30.4 against 1.37 in a review's run)."""
    def run(with_bad: bool):
        torch.manual_seed(0)
        model = build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None)
        if bad == "inf_gradient":
            model = _InfGradientOn(model, mark=1234.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        batches = [{"features": torch.randn(8, 64, generator=g),
                    "label": torch.randint(0, 10, (8,), generator=g)} for _ in range(3)]
        if with_bad and bad == "nan_input":
            batches.insert(2, {"features": torch.full((8, 64), math.nan),
                               "label": torch.zeros(8, dtype=torch.int64)})
        elif with_bad:  # a batch of its own, its loss unlike the others'
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(9)) * 30
            x[0, 0] = 1234.0
            batches.insert(2, {"features": x, "label": torch.zeros(8, dtype=torch.int64)})
        state = LoopState(micro_batch_size=8)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
        out = train_epoch(model, opt, [(lambda size, b=b: [b]) for b in batches], state,
                          lr_fn=lambda s: 0.1, loss="cross_entropy", nonfinite="skip",
                          scaler=scaler)
        return out, state, model

    out, state, model = run(True)
    assert state.nonfinite_steps == state.skipped_steps == 1 and out["steps"] == 4.0
    assert_finite_weights(model, "at the end of epoch 1")  # buffers included: no exception
    ref, _, ref_model = run(False)
    for key in ("train_loss", "train_accuracy", "grad_norm"):
        assert math.isfinite(out[key]) and out[key] == pytest.approx(ref[key], rel=1e-12), key
    states_equal(ref_model.state_dict(), model.state_dict(), atol=0)


def test_nonfinite_weights_are_never_checkpointed():
    model = _embedder()
    with torch.no_grad():
        model.head.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="head.weight"):
        assert_finite_weights(model, "at epoch 1")


def test_the_epoch_end_writes_finite_weights_and_never_others():
    """The worker's end of epoch (`pipeline.worker._report`, which writes the checkpoint and
    reports it) checks the weights first: finite ones are written and reported, an infinite
    one stops it before anything is written or reported."""
    import types

    from pipeline.worker import _report

    class Session:
        rank, world = 0, 1

        def __init__(self):
            self.reported = []

        def report(self, metrics, checkpoint_dir):  # the folder is gone after the call
            self.reported.append(sorted(p.name for p in Path(checkpoint_dir).iterdir()))

    def epoch_end(model):
        session = Session()
        state = LoopState(step=3, micro_batch_size=4, units=3, samples=12)
        sched = types.SimpleNamespace(state_dict=lambda: {})
        _report({"train_loss": 1.0}, model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                state, {}, None, session, sched)
        return session.reported

    model = _embedder()
    assert epoch_end(model) == [["meta.json", "state.pt"]]
    with torch.no_grad():
        model.head.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="head.weight.*at the end of epoch 1"):
        epoch_end(model)


def _epoch_end_rank(rank: int, world: int) -> str:
    """The epoch's end (`_report`) on a rank whose BatchNorm running mean is its own: rank 1's
    alone is infinite (its last batch's statistics, since DDP's last broadcast)."""
    import types

    from pipeline.worker import _report

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    if rank == 1:
        model[1].running_mean[0] = math.inf
    session = types.SimpleNamespace(rank=rank, report=lambda metrics, checkpoint_dir: None)
    try:
        _report({"epoch": 1.0}, model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                LoopState(step=3), {}, None, session, types.SimpleNamespace(state_dict=dict))
    except NonFiniteError as err:
        return str(err)
    return "reported"


def test_a_non_finite_buffer_on_one_rank_stops_every_rank_at_the_epochs_end():
    """Every rank stops at the same point (not rank 1 alone, leaving rank 0 waiting in the next
    epoch's collectives), and none writes a checkpoint."""
    r0, r1 = run_ranks(_epoch_end_rank, 2)
    assert "'1.running_mean'" in r1 and "at the end of epoch 1" in r1
    assert r0 == ("non-finite weights or buffers on 1 other rank(s) at the end of epoch 1; no "
                  "checkpoint written")


# ----------------------------------------------------------------- 6. randomness per rank


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(10, 3)
        self.drop = torch.nn.Dropout(0.5)
        self.masks: list[torch.Tensor] = []

    def forward(self, batch):
        h = self.drop(torch.ones(batch["features"].shape[0], 10))
        self.masks.append(h == 0)
        return self.lin(batch["features"] * h)


def _dropout_rank(rank: int, world: int, seed: int = 7, start: int = 0) -> dict:
    """Three steps of seeded dropout (`train.seed` = `seed`), or the steps from `start` on, as
    a resume at that step trains them."""
    torch.manual_seed(0)  # the worker seeds once before building: identical initial weights
    net = DropoutNet()
    init = {k: v.clone() for k, v in net.state_dict().items() if k != "masks"}
    model = DDP(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [{"features": torch.randn(4, 10, generator=g), "label": torch.randint(0, 3, (4,), generator=g)}
               for _ in range(3)]
    steps = [(lambda size, b=b: [b]) for b in batches][start:]
    train_epoch(model, opt, steps, LoopState(micro_batch_size=4, step=start), lr_fn=lambda s: 0.1,
                loss="cross_entropy", seed=seed, rank=rank)
    return {"init": init, "masks": [m.clone() for m in net.masks],
            "final": {k: v.clone() for k, v in net.state_dict().items()}}


def test_dropout_masks_differ_across_ranks_and_reproduce():
    r0, r1 = run_ranks(_dropout_rank, 2)
    states_equal(r0["init"], r1["init"], atol=0)  # same initial weights
    assert all(not torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True))
    assert not torch.equal(r0["masks"][0], r0["masks"][1])  # new masks every step
    again = _dropout_rank(0, 1)  # same (seed, rank, step): same masks
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], again["masks"], strict=True))
    states_equal(r0["final"], r1["final"], atol=0)  # DDP keeps replicas equal
    # a resume at step 2 draws step 3's masks again; another train.seed draws others
    assert torch.equal(_dropout_rank(0, 1, start=2)["masks"][0], r0["masks"][2])
    other = _dropout_rank(0, 1, seed=8)["masks"]
    assert all(not torch.equal(a, b) for a, b in zip(r0["masks"], other, strict=True))
