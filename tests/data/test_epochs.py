"""The batches a job trains on (shared by the worker and inspect-batches), on odd data:
a prime number of rows, a class with 3 samples, lengths 1..2,000; 1, 2 and 3 workers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.data.batches import SampleTable, micro_slices, split_train_val
from pipeline.data.datasets import make_digits, make_sequences
from pipeline.data.epochs import epoch_batches, steps_per_epoch
from pipeline.data.plan import rank_slice

N = 1009  # prime


def odd_table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(3, 4), rng.integers(0, 4, N - 3)])  # class 4: 3 samples
    lengths = np.clip(np.round(rng.lognormal(4, 1.2, N)), 1, 2000).astype(np.int64)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(rng.integers(0, 50, offs[-1]))),
        "label": pa.array(labels),
        "hardness": pa.array(rng.random(N)),
    })


def odd_setup(strategy: str, world: int, **extra):
    cfg = load_config(None, [f"batching.strategy={strategy}", f"scaling.num_workers={world}",
                             "train.global_batch_size=60", "train.micro_batch_size=null",
                             "data.feature_column=null", "data.sequence_column=tokens",
                             "batching.difficulty_column=hardness", "data.val_fraction=0.1",
                             *[f"{k}={v}" for k, v in extra.items()]])
    st = SampleTable.from_table(odd_table(), feature_column=None, label_column="label",
                                sequence_column="tokens", difficulty_column="hardness")
    train, _ = split_train_val(len(st), st.labels, 0.1, 0)
    return cfg, st, train


STRATEGIES = ["random", "sequential", "stratified", "length_bucket", "curriculum", "hard_mining",
              "balanced", "contrastive"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_global_batches_do_not_depend_on_worker_count(strategy):
    """Worlds 1, 2 and 3 (60 = 20 x 3): the same global batches in the same order, and the
    ranks' slices put back together give each global batch exactly."""
    ref = None
    for world in (1, 2, 3):
        cfg, st, train = odd_setup(strategy, world)
        for epoch in (0, 3):
            eb = epoch_batches(cfg, st, train, epoch, world)
            got = [b.tolist() for b in eb.batches]
            if world == 1:
                ref = ref or {}
                ref[epoch] = got
            assert got == ref[epoch]
            for b in eb.batches:
                parts = [rank_slice(b, r, world) for r in range(world)]
                assert np.array_equal(np.concatenate(parts), b)
                assert all(len(p) >= 1 for p in parts)


@pytest.mark.parametrize("strategy", ["random", "sequential", "stratified", "length_bucket"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sample_once_per_epoch_and_drops_counted(strategy, world):
    cfg, st, train = odd_setup(strategy, world)
    for epoch in (0, 1):
        eb = epoch_batches(cfg, st, train, epoch, world)
        per_rank = [np.concatenate([rank_slice(b, r, world) for b in eb.batches])
                    for r in range(world)]
        drawn = np.concatenate(per_rank)
        assert len(np.unique(drawn)) == len(drawn)  # no duplicates, ranks never share a sample
        assert len(drawn) + eb.dropped == len(train)  # everything drawn or counted as dropped
        assert set(drawn) <= set(train.tolist())


def test_no_drop_last_draws_everything():
    cfg, st, train = odd_setup("random", 3, **{"batching.drop_last": False})
    eb = epoch_batches(cfg, st, train, 0, 3)
    drawn = np.concatenate(eb.batches)
    assert sorted(drawn.tolist()) == sorted(train.tolist()) and eb.dropped == 0


@pytest.mark.parametrize(("world", "batch"), [(2, 6), (3, 906)])  # 907 rows: a tail of 1
def test_a_tail_smaller_than_the_workers_is_trained_as_on_one_worker(world, batch):
    """A last batch with fewer samples than workers is trained (some ranks take an empty
    share), so the batches -- and the step count the LR schedule is laid over -- are those of
    one worker; it was dropped, and the schedule shortened, on more workers than its samples."""
    cfg, st, train = odd_setup("random", world, **{"batching.drop_last": False,
                                                   "train.global_batch_size": batch})
    eb = epoch_batches(cfg, st, train, 0, world)
    one = epoch_batches(cfg, st, train, 0, 1)
    assert len(train) == 907 and len(eb.batches[-1]) == 1
    assert [b.tolist() for b in eb.batches] == [b.tolist() for b in one.batches]
    assert eb.dropped == 0 and sum(len(b) for b in eb.batches) == len(train)
    assert [len(rank_slice(eb.batches[-1], r, world)) for r in range(world)] == [1] + [0] * (world - 1)
    assert steps_per_epoch(cfg, st, train, world) == steps_per_epoch(cfg, st, train, 1)


def test_stratified_batches_keep_class_shares_within_one():
    cfg, st, train = odd_setup("stratified", 2)
    share = np.bincount(st.labels[train]) / len(train)
    for b in epoch_batches(cfg, st, train, 0, 2).batches:
        counts = np.bincount(st.labels[b], minlength=len(share))
        assert np.all(np.abs(counts - share * len(b)) <= 1.0 + 1e-9)


def test_curriculum_difficulty_from_length_scoring_pass():
    cfg, st, train = odd_setup("curriculum", 1, **{"batching.difficulty_column": "null",
                                                  "batching.options.difficulty": "length",
                                                  "batching.options.c0": 0.2})
    st.difficulty = None
    eb = epoch_batches(cfg, st, train, 0, 1)
    drawn = np.concatenate(eb.batches)
    # The first epoch's pool is the shortest 20% of the training pool.
    cutoff = np.sort(st.lengths[train])[int(np.ceil(0.2 * len(train))) - 1]
    assert st.lengths[drawn].max() <= cutoff


def test_padded_micro_batches_from_arrow():
    st = SampleTable.from_table(odd_table(), feature_column=None, label_column="label",
                                sequence_column="tokens")
    pos = np.array([5, 17, 2, 999])
    b = st.gather(pos, max_length=300, pad_multiple_of=8)
    L = b["input_ids"].shape[1]
    assert L % 8 == 0 and L <= 304
    assert np.array_equal(b["attention_mask"].sum(1), np.minimum(st.lengths[pos], 300))
    assert [len(m) for m in micro_slices(pos, 3)] == [3, 1]


def test_embedded_datasets_are_deterministic_and_shaped():
    from sklearn.datasets import load_digits

    a, b = make_digits(), make_digits()
    assert a.equals(b) and a.num_rows == len(load_digits().target)
    seq = make_sequences()
    lengths = seq.column("length").to_numpy()
    assert lengths.min() >= 8 and lengths.max() <= 512 and np.median(lengths) < 100
    assert seq.equals(make_sequences())


@pytest.mark.parametrize("schedule", [{}, {"train.batch_size_schedule": "warmup",
                                            "train.batch_size_min": 30,
                                            "train.batch_size_warmup_steps": 10}])
def test_inspect_draws_the_steps_train_max_steps_lets_training_take(schedule):
    """`train.max_steps` ends training after that many optimizer steps (mid-epoch here: 15
    steps an epoch at batch 60); inspect-batches' rows end there too, under a warmup schedule
    counting its grouped steps, not its unit batches."""
    from pipeline.inspect import feed_rows

    cfg, st, _ = odd_setup("random", 2, **{"train.epochs": 3, **schedule})
    everything = feed_rows(cfg, st, 0).to_pandas()
    capped = feed_rows(cfg.with_overrides({"train.max_steps": 20}), st, 0).to_pandas()
    steps = capped.groupby(["epoch", "batch"]).ngroups
    assert steps == 20 and everything.groupby(["epoch", "batch"]).ngroups > 20
    assert capped.equals(everything.iloc[: len(capped)])  # the same rows, up to the cap


def test_a_token_budget_counts_the_slots_the_collate_makes():
    """`max_tokens` bounds samples x the batch's longest *as collated*: truncated to
    `max_length` (a 2,000-token sample truncated to 300 is planned as 300, not given a batch
    of its own) and padded to `pad_multiple_of` (10 samples of 10 tokens padded to 16 are 160
    slots, not 100)."""
    cfg, st, train = odd_setup("length_bucket", 1, **{
        "batching.options": '{"max_tokens": 2048}', "batching.max_length": 300,
        "batching.pad_multiple_of": 16})
    for epoch in (0, 1):
        batches = epoch_batches(cfg, st, train, epoch, 1).batches
        for batch in batches:
            longest = int(np.minimum(st.lengths[batch], 300).max())
            assert len(batch) * (-(-longest // 16) * 16) <= 2048, (len(batch), longest)
        # the truncated longest (304 slots) share batches: at most the mega-batches' tails alone
        assert sum(len(b) == 1 for b in batches) <= -(-len(train) // (50 * 60))


def test_inspect_rows_carry_the_collated_shape_and_the_curriculum_difficulty():
    """What `batches.parquet` says of a micro-batch is what training collates: `padded_length`
    is the width of its token rows and `micro_slots` their size, packed (rows of several
    samples) as padded; `difficulty` is what a curriculum orders by, also when a scoring pass
    (the truncated lengths) gives it rather than a column."""
    from pipeline.data.epochs import truncated_lengths
    from pipeline.data.feed import collate
    from pipeline.inspect import feed_rows

    for packing in ("false", "true"):
        cfg, st, _ = odd_setup("length_bucket", 2, **{
            "batching.packing": packing, "batching.pack_tokens": 1024, "batching.max_length": 300,
            "batching.pad_multiple_of": 8, "train.micro_batch_size": 10, "train.epochs": 1})
        rows = feed_rows(cfg, st, 1).to_pandas()
        for _, m in rows.groupby(["batch", "micro"]):
            mask = collate(cfg, m["position"].to_numpy(), (0,), st, None)["attention_mask"]
            assert (m["padded_length"] == mask.shape[1]).all()
            assert (m["micro_slots"] == mask.size).all()
        if packing == "true":  # several samples share a row: the width is not slots / samples
            assert (rows["micro_slots"] < rows.groupby(["batch", "micro"])["position"]
                    .transform("size") * rows["padded_length"]).any()
    cfg, st, _ = odd_setup("curriculum", 1, **{"batching.options.difficulty": "length",
                                               "batching.difficulty_column": "null",
                                               "batching.max_length": 300, "train.epochs": 2})
    st.difficulty = None  # no column: the scoring pass orders the pool
    rows = feed_rows(cfg, st, 0).to_pandas()
    expected = truncated_lengths(cfg, st.lengths[rows["position"].to_numpy()])
    assert np.array_equal(rows["difficulty"].to_numpy(), expected.astype(np.float64))


def test_inspect_measures_class_shares_against_the_training_split():
    from pipeline.inspect import training_split_shares

    cfg = load_config(None, ["data.val_fraction=0.3"])
    labels = np.array([0] * 10 + [1] * 90)
    num_train, share = training_split_shares(cfg, labels, len(labels))
    train, _ = split_train_val(100, labels, 0.3, cfg.data.split_seed)
    assert num_train == len(train) == 70
    assert share.to_dict() == {0: np.mean(labels[train] == 0), 1: np.mean(labels[train] == 1)}
    assert share.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", [{}, {"train.batch_size_schedule": "warmup",
                                           "train.batch_size_min": 20,
                                           "train.batch_size_warmup_steps": 5}])
def test_epochs_past_max_steps_are_not_counted(schedule):
    """`train.epochs` a million, bounded by `train.max_steps`: only the epochs the run reaches
    are counted (it took minutes, on the driver and on every worker), and the LR schedule is
    the one of counting them all: it ends at max_steps (steps of 1 to 3 unit batches here)."""
    from pipeline.data.epochs import lr_schedule

    few, _, _ = odd_setup("random", 1, **{"train.epochs": 3, **schedule})
    cfg, st, train = odd_setup("random", 1, **{"train.epochs": 1_000_000, "train.max_steps": 20,
                                               **schedule})
    counted = steps_per_epoch(cfg, st, train, 1)
    per_epoch = steps_per_epoch(few, st, train, 1)[0]  # (random: the same count every epoch)
    assert len(counted) == -(-20 * (60 // cfg.plan_batch_size()) // per_epoch) < 10
    capped = lr_schedule(few.with_overrides({"train.max_steps": 20}), [per_epoch] * 3)
    assert lr_schedule(cfg, counted) == capped


@pytest.mark.parametrize("extra", [0, 1])
def test_counting_the_epochs_max_steps_reaches_refuses_what_counting_all_refuses(extra):
    """At the boundary: max_steps exactly two epochs' steps, a warmup of two epochs (the LR
    only ramps: refused) -- and one step more (accepted). Counting only the epochs the run
    reaches gives the same answer as counting all ten."""
    from pipeline.data.epochs import lr_schedule

    cfg, st, train = odd_setup("random", 1, **{"train.epochs": 10, "train.warmup_epochs": 2,
                                               "train.lr_scaling": "linear",
                                               "train.base_batch_size": 16})  # (a ramp)
    per_epoch = steps_per_epoch(cfg, st, train, 1)[0]
    cfg = cfg.with_overrides({"train.max_steps": 2 * per_epoch + extra})

    def outcome(steps):
        try:
            return lr_schedule(cfg, steps)
        except ValueError as err:
            return str(err)

    counted = steps_per_epoch(cfg, st, train, 1)
    assert len(counted) < 10 and outcome(counted) == outcome([per_epoch] * 10)
    assert isinstance(outcome(counted), str) == (extra == 0)
