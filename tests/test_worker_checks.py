"""The workers' checkpoint round trip, and their check of the rows they received against the
model the driver's checks sized (`pipeline.worker.data_outside_model`): data changed between
the checks and the ingest is refused in one line instead of failing in the model (an IndexError
Ray Train would retry)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.batches import SampleTable
from pipeline.engine.batch_schedule import BatchSchedule
from pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from pipeline.engine.loop import LoopState
from pipeline.engine.noise import NoiseScale
from pipeline.worker import _report, _restore, data_outside_model, model_spec

FACTS = {"input_dim": None, "max_token": 9, "max_target": 3, "max_label": 2}


def _sequences(tokens, targets):
    table = pa.table({"tokens": tokens, "targets": targets, "label": [0] * len(tokens)})
    return SampleTable.from_table(table, feature_column=None, label_column="label",
                                  sequence_column="tokens", target_column="targets")


@pytest.mark.parametrize(("tokens", "targets", "loss", "want"), [
    ([[1, 9], [0]], [[3, 0], [1]], "token_cross_entropy", None),  # what the checks saw
    ([[1, 10], [0]], [[3, 0], [1]], "token_cross_entropy",
     "token id 10, the model's vocabulary has 10"),
    ([[1, 9], [0]], [[4, 0], [1]], "token_cross_entropy",
     "target token 4, the model has 4 outputs"),
    ([[1, 9], [0]], [[4, 0], [1]], "cross_entropy", None),  # targets unused by this loss
    # negative ids: the embedding's IndexError on the worker, which Ray Train retried
    ([[1, -2], [0]], [[3, 0], [1]], "cross_entropy", "token id -2, token ids are >= 0"),
    ([[1, 9], [0]], [[3, -100], [-3]], "token_cross_entropy",
     "target token -3, targets are >= 0 (or -100, ignored)"),
    ([[1, 9], [0]], [[3, -100], [1]], "token_cross_entropy", None),  # -100: ignored
    # the same 3 values, shifted between rows: padding them put targets under the wrong tokens
    ([[1, 9], [0]], [[3], [1, 0]], "token_cross_entropy",
     "row 0 of the rows received: data.target_column='targets' holds 1 target(s) for 2 "
     "token(s) (one per token)"),
    ([[1, 9], [0]], [[3], [1, 0]], "cross_entropy", None),  # targets unused by this loss
])
def test_sequences_outside_the_model_are_named(tokens, targets, loss, want):
    cfg = load_config(None, ["data.name=sequences", f"train.loss={loss}", "model.name=seq_transformer",
                             "data.target_column=targets"])
    spec = model_spec(cfg, FACTS)
    assert data_outside_model(cfg, spec, _sequences(tokens, targets)) == want


def test_gather_refuses_targets_not_aligned_with_their_tokens():
    st = _sequences([[1, 9], [0]], [[3], [1, 0]])
    with pytest.raises(ValueError, match="targets_lengths differ"):
        st.gather(np.arange(2))


def test_features_of_another_width_and_labels_beyond_the_outputs():
    cfg = load_config(None, ["model.name=mlp", "data.feature_column=x"])
    spec = model_spec(cfg, {**FACTS, "input_dim": 4, "max_token": None})
    table = pa.table({"x": list(np.zeros((3, 5), np.float32)), "y": [0, 1, 2]})
    st = SampleTable.from_table(table, feature_column="x", label_column="y")
    assert data_outside_model(cfg, spec, st) == "5 features, the model takes 4"
    table = pa.table({"x": list(np.zeros((3, 4), np.float32)), "y": [0, 1, 3]})
    st = SampleTable.from_table(table, feature_column="x", label_column="y")
    assert data_outside_model(cfg, spec, st) == "label 3, the model has 3 outputs"


class _KeepCheckpoint:
    """A one-rank session whose report keeps a copy of the checkpoint folder."""

    rank, world = 0, 1

    def __init__(self, folder):
        self.folder = folder

    def report(self, metrics, checkpoint_dir):
        shutil.copytree(checkpoint_dir, self.folder)


@pytest.mark.parametrize(("saved", "world_was", "world", "want"), [
    (16, 4, 2, 32),  # no out-of-memory on 4 workers (their share, 64 / 4): 2 workers' share
    (8, 4, 2, 8),  # an out-of-memory halved it on 4 workers: kept on 2
    (32, 2, 4, 16),  # no out-of-memory on 2: 4 workers' share
    (8, 2, 4, 8),  # halved twice on 2: kept, within 4 workers' share
])
def test_an_auto_micro_batch_resumed_on_other_workers_keeps_only_a_shrink(tmp_path, saved,
                                                                          world_was, world, want):
    """`micro_batch_size: auto` of a global batch of 64 resumed on another worker count: a
    size an out-of-memory left is kept (at most the new share); the old share, which no
    out-of-memory shrank, is not (on fewer workers it kept an accumulation, and its cost, that
    no memory limit asked for)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = BatchSchedule(kind="constant", unit=64, max_units=1)
    save_checkpoint(tmp_path / "ckpt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5,
        "epoch": 0, "micro_batch_size": saved,
        "batch_schedule": {**sched.state_dict(), "world": world_was}})
    state = LoopState(micro_batch_size=64 // world)
    _restore(load_checkpoint(tmp_path / "ckpt"), model, optimizer, None, sched, state,
             auto_micro=True, per_worker=64 // world, world=world)
    assert state.micro_batch_size == want


def test_a_checkpoint_restores_every_counter_the_training_goes_on_with(tmp_path):
    """What `_report` writes, `_restore` puts back: every field of the loop's state (but the
    per-step history, and the epoch, which moves on to the next). Among them the loss
    elements per sample, with which the adaptive schedule's first decision after a resume
    reads the noise scale (tokens) in samples -- before it was saved, a resume read 51,200
    tokens as 51,200 samples."""
    torch.manual_seed(0)
    model, sched = torch.nn.Linear(3, 2), BatchSchedule(kind="adaptive", unit=32, max_units=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = NoiseScale()
    noise.update(sq_small=3.0, b_small=8, sq_big=2.0, b_big=32)
    state = LoopState(step=7, epoch=2, micro_batch_size=8, samples=1234, units=21, batch_size=128,
                      elements_per_sample=256.5, skipped_steps=2, nonfinite_steps=1, noise=noise)
    sched.units, sched.step_cost, sched.measured, sched.decisions = 4, 12.5, True, 3
    _report({"epoch": 3.0}, model, optimizer, None, state, {"name": "mlp"}, None,
            _KeepCheckpoint(tmp_path / "ckpt"), sched)
    back = LoopState(micro_batch_size=32, noise=NoiseScale())
    sched_back = BatchSchedule(kind="adaptive", unit=32, max_units=16)
    _restore(load_checkpoint(tmp_path / "ckpt"), torch.nn.Linear(3, 2),
             torch.optim.SGD(model.parameters(), lr=0.1), None, sched_back, back,
             auto_micro=True, per_worker=32)
    for f in dataclasses.fields(LoopState):
        if f.name == "noise":
            assert back.noise.state_dict() == state.noise.state_dict()
        elif f.name == "epoch":
            assert back.epoch == state.epoch + 1
        elif f.name != "history":
            assert getattr(back, f.name) == getattr(state, f.name), f.name
    assert sched_back == sched


@pytest.mark.parametrize(("world", "kept"), [(1, True), (2, False)])
def test_a_resume_on_another_worker_count_fits_no_step_times_of_the_old_one(tmp_path, world, kept):
    """The adaptive schedule's step times are the checkpoint's worker count's (here 1): a
    resume on 2 workers starts its timings afresh (their steps take other times) and scales
    the measured c with the workers (a worker steps M / W samples: c = W x its own, as the
    finder's file is read); on 1 worker it goes on with both. A c not yet fitted keeps the
    timings (with the explored size's alone it could never fit one); a configured c is this
    run's config's (the throughput file's for its workers), not the checkpoint's."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def resumed(step_cost, measured, configured=None):
        sched = BatchSchedule(kind="adaptive", unit=32, max_units=8, cold=False)
        for batch in [32] * 6 + [128] * 6:
            sched.observe(batch, 0.01 + 1e-4 * batch)
        sched.step_cost, sched.measured = step_cost, measured
        folder = tmp_path / f"ckpt-{step_cost}-{measured}"
        _report({"epoch": 1.0}, model, optimizer, None, LoopState(step=12), {"name": "mlp"},
                None, _KeepCheckpoint(folder), sched)
        back = BatchSchedule(kind="adaptive", unit=32, max_units=8, step_cost=configured)
        _restore(load_checkpoint(folder), model, optimizer, None, back, LoopState(), world=world)
        return sched, back

    sched, back = resumed(100.0, True)
    assert back.measured and back.units == sched.units and len(sched.timings) == 12
    assert (back.step_cost, back.timings) == ((100.0, sched.timings) if kept else (200.0, []))
    sched, back = resumed(None, False)  # explored, not fitted yet: the timings are all there is
    assert back.step_cost is None and back.timings == sched.timings
    sched, back = resumed(80.0, False, configured=80.0 * world)  # the file's, per worker 80
    assert back.step_cost == 80.0 * world and not back.measured


def test_an_epoch_that_ended_at_a_step_just_validated_takes_that_pass():
    """train.eval_every=6 over epochs ending at steps 12 and 20: passes at 6 and 12 within
    epoch 1, whose end takes step 12's (the same weights) -- not a third pass; epoch 2's end,
    at step 20 (after 18's), runs its own. No validation rows: no pass at all."""
    from pipeline.worker import Validation

    ran = []

    def run(epoch):
        ran.append(epoch)
        return {"val_accuracy": 0.5 + len(ran) / 100}

    v = Validation(run, every=6, rows=10)
    steps = [v.at_step(0, s) for s in range(1, 13)]
    assert [s for s in steps if s] == [{"val_accuracy": 0.51}, {"val_accuracy": 0.52}]
    assert v.at_epoch_end(0, 12) == {"val_accuracy": 0.52} and ran == [0, 0]
    steps = [v.at_step(1, s) for s in range(13, 21)]
    assert v.at_epoch_end(1, 20) == {"val_accuracy": 0.54} and ran == [0, 0, 1, 1]
    none = Validation(run, every=6, rows=0)
    assert none.at_step(0, 6) == {} == none.at_epoch_end(0, 6) and len(ran) == 4
    every_epoch = Validation(run, every=None, rows=10)  # (eval_every unset: the epoch's end)
    assert every_epoch.at_step(0, 6) == {} and every_epoch.at_epoch_end(0, 6) and len(ran) == 5


@pytest.mark.parametrize(("auto", "per_worker", "want"), [(False, 32, 32), (True, 32, 8),
                                                          (True, 4, 4)])
def test_a_resume_keeps_the_micro_batch_an_out_of_memory_left_only_under_auto(
        tmp_path, auto, per_worker, want):
    """A checkpoint written at micro-batch 8 (an `auto` run shrunk to it, or a fixed 8 on
    other workers): a fixed or `null` micro-batch is this run's config (here 32); `auto` goes
    on at 8, but never above this run's share (a resume on more workers: 4 each)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _report({"epoch": 1.0}, model, optimizer, None, LoopState(step=3, micro_batch_size=8),
            {"name": "mlp"}, None, _KeepCheckpoint(tmp_path / "ckpt"),
            BatchSchedule(kind="constant", unit=32, max_units=1))
    back = LoopState(micro_batch_size=32)
    _restore(load_checkpoint(tmp_path / "ckpt"), model, optimizer, None,
             BatchSchedule(kind="constant", unit=32, max_units=1), back, auto_micro=auto,
             per_worker=per_worker)
    assert back.micro_batch_size == want and back.step == 3


def _input_error_rank(rank: int, world: int) -> str:
    from pipeline.config import ConfigError
    from pipeline.worker import agreed_input_error

    mine = ConfigError("data error: x.parquet: changed since the checks: label 7") if rank == 1 else None
    try:
        agreed_input_error(mine, torch.device("cpu"))
    except ConfigError as err:
        return str(err)
    return "went on"


def _model_build_rank(rank: int, world: int) -> str:
    import pipeline.worker as worker
    from pipeline.config import ConfigError

    class DDPSession(worker.Session):
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.rank, self.world = rank, world

        def prepare_model(self, model, ddp_kwargs):
            return torch.nn.parallel.DistributedDataParallel(model, **(ddp_kwargs or {}))

    if rank == 1:  # (its node's image lacks a module the model imports)
        def build_model(**_):
            raise ModuleNotFoundError("No module named 'flash_attn'")
        worker.build_model = build_model
    cfg = load_config(None, ["scaling.num_workers=2"])
    spec = {"name": "mlp", "input_dim": 4, "num_outputs": 3, "vocab_size": None}
    try:
        worker._prepare_model(cfg, spec, DDPSession())
    except ConfigError as err:
        return str(err)
    return "went on"


@pytest.mark.timeout(120)
def test_a_model_that_one_rank_cannot_build_stops_every_rank():
    """A rank whose build fails stops with its error, and the other with one naming it (it
    went on into DDP's first broadcast and waited there for the timeout, 30 minutes)."""
    from tests.engine.ranks import run_ranks

    r0, r1 = run_ranks(_model_build_rank, 2)
    assert r1 == ("config error: model.name=auto: ModuleNotFoundError: No module named "
                  "'flash_attn'")
    assert r0 == ("config error: 1 other rank(s) of 2 could not build model.name=auto; their "
                  "error is in that worker's log")


@pytest.mark.timeout(120)
def test_bad_rows_on_one_rank_stop_every_rank():
    """Each rank checks its own rows; one that finds them changed since the checks stops, and
    so does every other (alone, it would leave them waiting in DDP's first broadcast)."""
    from tests.engine.ranks import run_ranks

    r0, r1 = run_ranks(_input_error_rank, 2)
    assert r1 == "data error: x.parquet: changed since the checks: label 7"
    assert r0.startswith("data error: 1 other rank(s) of 2 met bad input (their rows changed "
                         "since the checks)")


def _restored_at(rank: int, world: int, steps: list[int]) -> str | None:
    from pipeline.worker import agree_on_restored

    try:
        agree_on_restored(steps[rank], epoch=steps[rank] // 10, device=torch.device("cpu"))
    except RuntimeError as err:
        return str(err)
    return None


def test_ranks_that_restored_different_checkpoints_all_stop():
    """Each rank loads its own copy of the checkpoint, and one whose copy fails to load falls
    back to an older one alone: ranks at different steps would run different collectives and
    hang. Every rank stops at the check (two real gloo ranks); the same point passes."""
    from tests.engine.ranks import run_ranks

    assert run_ranks(_restored_at, 2, [20, 20]) == [None, None]
    said = run_ranks(_restored_at, 2, [20, 10])
    assert said[0] == ("the ranks restored different checkpoints: steps 10 to 20, after epoch "
                       "1 to 2 (this rank: step 20); none trains from a point the others do not "
                       "share")
    assert said[1] is not None and said[1].endswith("(this rank: step 10); none trains from a "
                                                    "point the others do not share")


def _planned(rank: int, world: int, plans: list[list[list[int]]]) -> str | None:
    from pipeline.worker import agree_on_plan

    try:
        agree_on_plan([np.array(b) for b in plans[rank]], epoch=2, device=torch.device("cpu"))
    except ConfigError as err:
        return str(err)
    return None


def test_ranks_that_planned_different_batches_all_stop():
    """Every rank plans the epoch itself; ranks whose libraries plan differently would each
    train their slice of another plan. Two real gloo ranks: the same plan passes; a plan that
    differs in one position, or only in where a batch ends, stops both."""
    from tests.engine.ranks import run_ranks

    same = [[0, 1, 2], [3, 4, 5]]
    assert run_ranks(_planned, 2, [same, same]) == [None, None]
    for other in ([[0, 1, 2], [3, 5, 4]], [[0, 1], [2, 3, 4, 5]]):
        said = run_ranks(_planned, 2, [same, other])
        assert said[0] == said[1] is not None and said[0].startswith(
            "environment error: the ranks planned different batches for epoch 3 from the same "
            "data and seed"), said


def test_hard_mining_scores_each_sample_in_the_same_chunk_on_any_worker_count():
    """The pool is scored in chunks of the micro-batch (8: not a divisor of a rank's share of
    the 248 samples on 2 or 3 workers) cut in pool order and dealt to the ranks in turn: the
    vector the all-reduce gives (here the ranks' vectors summed) is bit for bit the one-worker
    vector, so the next epoch's rank-based draws are too -- also where a sample's loss moves
    with the batch it is in at rounding level (as kernels chosen by shape on a GPU: here a
    model adding 1e-6 of its batch's mean). Each rank's contiguous share, cut into
    micro-batches, put samples in other batches on another worker count."""
    import pyarrow.compute as pc

    from pipeline.data.batches import split_train_val
    from pipeline.data.datasets import make_sequences
    from pipeline.data.feed import RankFeed
    from pipeline.engine.models import SeqTransformer
    from pipeline.worker import _score_pool

    class BatchRounding(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            out = self.model(batch)
            return out + 1e-6 * out.mean(0, keepdim=True)

    cfg = load_config(None, ["data.name=sequences", "batching.strategy=hard_mining",
                             "train.micro_batch_size=8"])
    table = make_sequences(310)
    st = SampleTable.from_table(table, feature_column=None, label_column="label",
                                sequence_column="tokens", target_column="targets")
    train, _ = split_train_val(len(st), st.labels, 0.2, 0)
    torch.manual_seed(0)
    model = BatchRounding(SeqTransformer(
        vocab_size=pc.max(pc.list_flatten(table["tokens"])).as_py() + 1,
        num_outputs=int(st.labels.max()) + 1))
    cpu = torch.device("cpu")

    def scored(world: int) -> np.ndarray:
        return sum(_score_pool(model, RankFeed(cfg, st, train, rank, world), len(st), 8, cfg, cpu)
                   for rank in range(world))

    one = scored(1)
    assert (one[train] > 0).all() and (np.delete(one, train) == 0).all()
    for world in (2, 3):
        assert np.array_equal(scored(world), one), world


def _schedule_rank(rank: int, world: int) -> tuple[list, float, float]:
    from pipeline.engine.step import all_reduce_sum
    from pipeline.worker import agreed_schedule_state

    def agree(values):
        return [v / world for v in all_reduce_sum(values, torch.device("cpu"))]

    def timed() -> BatchSchedule:
        sched = BatchSchedule(kind="adaptive", unit=32, max_units=8)
        slow = 1.0 + 2.0 * rank  # each rank its own step times
        for step, batch in enumerate([32] * 6 + [128] * 6):
            sched.observe(batch, slow * (0.01 + 0.0004 * batch) * (1 + 0.01 * (step % 3)))
        return sched

    uninterrupted = timed()
    state = agreed_schedule_state(timed(), world, torch.device("cpu"))
    restored = BatchSchedule(kind="adaptive", unit=32, max_units=8)
    restored.load_state_dict(state)
    uninterrupted._fit(agree)
    restored._fit(agree)
    return state["timings"], uninterrupted.step_cost, restored.step_cost


@pytest.mark.timeout(120)
def test_a_restored_schedule_fits_the_step_cost_the_run_it_continues_fitted():
    """The checkpoint keeps the ranks' mean step times: every rank restores them, and the fit
    after the restart is the uninterrupted run's, to the bit (with rank 0's own times, as
    before: another c, and other k's)."""
    from tests.engine.ranks import run_ranks

    (t0, before0, after0), (t1, before1, after1) = run_ranks(_schedule_rank, 2)
    assert t0 == t1  # one state, whichever rank's is written
    assert before0 == before1 == after0 == after1 and before0 is not None
    # mean of 1x and 3x, of step 1 (step 0, the process's first, is not timed)
    assert t0[0][1] == pytest.approx(2.0 * (0.01 + 0.0004 * 32) * 1.01) and len(t0) == 11


def test_a_restart_checkpoint_copy_that_fails_leaves_nothing_in_tmp(monkeypatch, tmp_path):
    """Each restart copies its checkpoint to a temporary folder, removed once read; a copy that
    fails (a full disk) raises and leaves no partial folder behind (one per restart before).
    Ray Train's checkpoint is played by a stand-in whose copy fails half-way."""
    import tempfile
    from pathlib import Path

    import pipeline.worker as worker

    class HalfCopied:
        def to_directory(self, path: str) -> str:
            (Path(path) / "state.pt").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(worker.ray.train, "get_checkpoint", lambda: HalfCopied())
    session = object.__new__(worker.RayTrainSession)  # (its __init__ asks Ray Train's context)
    with pytest.raises(OSError, match="No space left"):
        session.restart_checkpoint()
    assert list(tmp_path.iterdir()) == []


def _fatal_rank(rank: int, world: int, fatal_file: str) -> None:
    import pipeline.worker as worker
    from pipeline.config import ConfigError

    class Reporting(worker.Session):
        device = torch.device("cpu")

        def report(self, metrics, checkpoint_dir):
            torch.distributed.barrier()  # (Ray Train's report is one)

    def train(loop_config, session):  # rank 2's streamed rows changed since the checks
        mine = ConfigError("data error: d.parquet: changed since the checks: label 7") \
            if rank == 2 else None
        worker.agreed_input_error(mine, torch.device("cpu"))

    worker._train = train
    session = Reporting()
    session.rank, session.world = rank, world
    worker.train_func({"fatal_file": fatal_file}, session)


@pytest.mark.timeout(120)
def test_the_line_of_the_rank_that_met_bad_input_is_the_jobs(tmp_path):
    """Rank 0 knows only that another rank met bad input; that rank writes its own line
    beside fatal.json and the driver's error is that line (exit 2 naming the culprit), not
    "1 other rank(s) of 3 met bad input"."""
    import json

    from pipeline.config import ConfigError
    from pipeline.launch import raise_fatal
    from tests.engine.ranks import run_ranks

    fatal = tmp_path / "fatal.json"
    run_ranks(_fatal_rank, 3, str(fatal))
    assert json.loads(fatal.read_text())["peer"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fatal.json", "fatal.rank2.json"]
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal)
    assert str(err.value) == "data error: d.parquet: changed since the checks: label 7"
    told = {0: json.loads(fatal.read_text()),  # as the ranks tell the driver (their files may
            2: json.loads((tmp_path / "fatal.rank2.json").read_text())}  # be on other nodes)
    (tmp_path / "fatal.rank2.json").unlink()  # (on another node's disk): as told, else rank 0's
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal, None, told)
    assert str(err.value) == "data error: d.parquet: changed since the checks: label 7"
    fatal.unlink()
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal, None, told)
    assert str(err.value) == "data error: d.parquet: changed since the checks: label 7"
    told.pop(2)
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal, None, told)
    assert str(err.value) == ("data error: 1 other rank(s) of 3 met bad input (their rows "
                              "changed since the checks); their error is in that worker's log")
    fatal.write_text(json.dumps(told[0]))
    with pytest.raises(ConfigError) as err:
        raise_fatal(fatal)
    assert str(err.value) == ("data error: 1 other rank(s) of 3 met bad input (their rows "
                              "changed since the checks); their error is in that worker's log")
