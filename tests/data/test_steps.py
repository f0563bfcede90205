"""Step counts of the LR schedule (issue 9, items 4 and 7): counted from the plans, for every
strategy, on the embedded datasets; never an epoch with no step."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.config import load_config
from pipeline.data.batches import SampleTable, split_train_val
from pipeline.data.datasets import make_digits, make_sequences
from pipeline.data.epochs import epoch_batches, schedule_steps, steps_per_epoch
from pipeline.data.pacing import competence
from pipeline.engine.schedule import lr_at, scale_lr

EPOCHS = 6
DIGITS = make_digits()
# A real difficulty for digits: the ink of the image (sum of the 64 pixels).
DIGITS = DIGITS.append_column(
    "ink", pc.list_value_length(DIGITS.column("features")).cast(pa.float64()))
DIGITS = DIGITS.set_column(DIGITS.schema.get_field_index("ink"), "ink", pa.array(
    DIGITS.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 64).sum(1)))
SEQUENCES = make_sequences()

# strategy -> (dataset, overrides). Token budget (max_tokens=1024) makes batches of 1..many
# samples, so the keep filter (every rank needs one sample) drops some on 3 workers.
CASES = {
    "random": ("digits", ["batching.drop_last=false"]),
    "sequential": ("digits", []),
    "stratified": ("digits", ["batching.drop_last=false"]),
    "balanced": ("digits", ["batching.options.epoch_samples=1000"]),
    "curriculum": ("sequences", ["batching.options.difficulty=length",
                                 "batching.options.pacing=root"]),
    "hard_mining": ("digits", ["batching.drop_last=false"]),
    "length_bucket": ("sequences", ["batching.options.max_tokens=1024",
                                    "batching.options.bucket_size_multiplier=4"]),
    "contrastive": ("digits", ["train.loss=nt_xent", "model.name=mlp"]),
}


def setup(strategy: str, world: int, *extra: str):
    name, overrides = CASES[strategy]
    seq = name == "sequences"
    cfg = load_config(None, [
        f"data.name={name}", f"batching.strategy={strategy}", f"scaling.num_workers={world}",
        "train.global_batch_size=60", "train.base_batch_size=30", "train.micro_batch_size=null",
        f"train.epochs={EPOCHS}",
        *(["data.sequence_column=tokens", "model.name=seq_transformer"] if seq else
          ["data.feature_column=features"]),
        *overrides, *extra])
    table = SEQUENCES if seq else DIGITS
    st = SampleTable.from_table(table, feature_column=None, label_column="label",
                                sequence_column="tokens" if seq else None,
                                difficulty_column="ink" if cfg.batching.difficulty_column else None)
    train, _ = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    return cfg, st, train


def real_steps(cfg, st, train, world, losses=None) -> list[int]:
    return [len(epoch_batches(cfg, st, train, e, world, losses).batches) for e in range(EPOCHS)]


@pytest.mark.parametrize("strategy", list(CASES))
@pytest.mark.parametrize("world", [1, 3])
def test_counted_steps_are_the_planned_batches(strategy, world):
    cfg, st, train = setup(strategy, world)
    counted = steps_per_epoch(cfg, st, train, world)
    assert counted == real_steps(cfg, st, train, world)
    if strategy == "hard_mining":  # the losses change the samples drawn, never their number
        rng = np.random.default_rng(0)
        for losses in (rng.gamma(2.0, 1.0, len(st)), np.r_[np.full(len(st) - 1, np.nan), 9.0]):
            assert counted == real_steps(cfg, st, train, world, losses)
    if strategy == "length_bucket" and world == 3:  # the keep filter is counted too
        plans = [epoch_batches(cfg, st, train, e, 1).plan for e in range(EPOCHS)]
        assert any(min(len(b) for b in p.batches) < 3 for p in plans)


@pytest.mark.parametrize("strategy", list(CASES))
@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedule_ends_with_the_run_and_warmup_where_configured(strategy, schedule):
    """`lr_at`: progress = (step - warmup) / (total - 1 - warmup), so the last step trained
    (index total - 1) is the schedule's end, and the one before it is not."""
    cfg, st, train = setup(strategy, 1, "train.warmup_epochs=1.5", f"train.schedule={schedule}")
    t = cfg.train
    steps = steps_per_epoch(cfg, st, train, 1)
    total, warmup = schedule_steps(steps, t.warmup_epochs, t.max_steps)
    assert total == sum(steps) and warmup == steps[0] + math.floor(steps[1] / 2 + 0.5)
    peak = scale_lr(t.base_lr, t.base_batch_size, t.global_batch_size, t.lr_scaling)

    def lr(s: int) -> float:
        return lr_at(s, base_lr=t.base_lr, peak_lr=peak, warmup_steps=warmup, total_steps=total,
                     schedule=schedule)

    end = 0.0 if schedule == "cosine" else peak * 0.01
    assert abs(lr(total - 1) - end) <= 1e-12
    assert lr(warmup - 1) < peak and lr(warmup) == pytest.approx(peak, abs=1e-15)
    if schedule == "cosine":
        before = peak * 0.5 * (1 + math.cos(math.pi * (total - 2 - warmup) / (total - 1 - warmup)))
        assert lr(total - 2) == pytest.approx(before, rel=1e-12) and before > 0


def test_max_steps_caps_the_schedule():
    cfg, st, train = setup("curriculum", 2, "train.max_steps=30", "train.warmup_epochs=1")
    steps = steps_per_epoch(cfg, st, train, 2)
    assert sum(steps) > 30
    assert schedule_steps(steps, 1.0, 30) == (30, steps[0])


def test_root_curriculum_on_digits_counts_the_issue_numbers():
    """The issue's run: digits, 10 epochs, global batch 64, root pacing from c0 = 0.1 over
    5 epochs. The counts follow from the competence alone; the old formula assumed
    10 x (train // 64) steps and its cosine stopped well above 0."""
    cfg = load_config(None, ["data.feature_column=features", "batching.strategy=curriculum",
                             "batching.difficulty_column=ink", "train.epochs=10",
                             "train.schedule=cosine", "batching.options.c0=0.1"])
    st = SampleTable.from_table(DIGITS, feature_column=None, label_column="label",
                                difficulty_column="ink")
    train, _ = split_train_val(len(st), st.labels, 0.2, 0)
    n, g = len(train), 64
    want = [max(g, min(n, math.ceil(competence(e / 5, "root", c0=0.1) * n - 1e-9 * n))) // g
            for e in range(10)]
    got = steps_per_epoch(cfg, st, train, 2)
    assert got == want == [len(epoch_batches(cfg, st, train, e, 2).batches) for e in range(10)]
    old_total = 10 * (n // g)
    assert sum(got) < old_total
    t = cfg.train
    peak = scale_lr(t.base_lr, t.base_batch_size, g, t.lr_scaling)
    stale = lr_at(sum(got) - 1, base_lr=t.base_lr, peak_lr=peak, warmup_steps=0,
                  total_steps=old_total, schedule="cosine")
    assert stale > 0.05 * peak  # what today's worker does at its last step


# --------------------------------------------------------------------------- item 7


def test_curriculum_pool_holds_one_global_batch_and_says_so():
    """Pool of ceil(0.05 x 1438) = 72 < global batch 128: today an epoch with no step; now the
    pool is raised to 128 (one step) and the plan carries a note for the log."""
    cfg = load_config(None, ["data.feature_column=features", "batching.strategy=curriculum",
                             "batching.difficulty_column=ink", "train.global_batch_size=128",
                             "train.base_batch_size=128", "batching.options.c0=0.05",
                             "batching.options.pacing=linear", "train.epochs=4"])
    st = SampleTable.from_table(DIGITS, feature_column=None, label_column="label",
                                difficulty_column="ink")
    train, _ = split_train_val(len(st), st.labels, 0.2, 0)
    eb = epoch_batches(cfg, st, train, 0, 2)
    paced = math.ceil(0.05 * len(train))
    assert paced < 128 and eb.plan.pool_size == 128 and len(eb.batches) == 1
    assert f"from {paced} to 128" in eb.plan.note
    assert epoch_batches(cfg, st, train, 3, 2).plan.note == ""  # pool past one batch: silent
    assert steps_per_epoch(cfg, st, train, 2)[0] == 1


@pytest.mark.parametrize(("strategy", "overrides", "why"), [
    ("random", ["train.global_batch_size=1500", "train.base_batch_size=1500",
                "batching.drop_last=true"], "batching.drop_last=True"),  # more than the pool
    # < one batch of 60 (it named drop_last, which balanced ignores)
    ("balanced", ["batching.options.epoch_samples=50"],
     "batching.options.epoch_samples=50 draws fewer"),
])
def test_an_epoch_with_no_step_is_refused_with_the_numbers(strategy, overrides, why):
    cfg, st, train = setup(strategy, 1, *overrides)
    n, g = len(train), cfg.train.global_batch_size
    assert len(epoch_batches(cfg, st, train, 0, 1).batches) == 0  # what the driver would run
    with pytest.raises(ValueError, match=rf"epoch 1 of {EPOCHS} would train no step: .* pool of "
                                         rf"{n} of {n} training rows .*global_batch_size={g} "
                                         rf"\({why}\)"):
        steps_per_epoch(cfg, st, train, 1)


def test_plan_seeds_are_32_bit_as_numpy_splits_larger_ones():
    """numpy's SeedSequence([seed, epoch]) reads a seed of 2^32 or more as two words, so
    (2^32 + 5, epoch 0) and (5, epoch 1) drew the same plans: such seeds are refused."""
    from pipeline.config import ConfigError, load_config
    from pipeline.data.plan import epoch_rng

    assert np.array_equal(epoch_rng(2**32 + 5, 0).integers(1 << 30, size=3),
                          epoch_rng(5, 1).integers(1 << 30, size=3))
    load_config(None, [f"batching.seed={2**32 - 1}"])
    with pytest.raises(ConfigError, match="batching.seed"):
        load_config(None, [f"batching.seed={2**32}"])


def test_curriculum_pool_is_the_ceiling_of_its_share_on_huge_datasets():
    """ceil(c n), floating-point noise aside: 0.3 of 10 is 3 (0.3 * 10 is 3.0000000000000004),
    and half of 10^9 + 7 is 500,000,004 (a tolerance of 1e-9 n made it 500,000,003)."""
    from pipeline.data.strategies import curriculum_pool_size

    assert curriculum_pool_size(10, 0, pacing="linear", c0=0.3) == 3
    assert curriculum_pool_size(10**9 + 7, 0, pacing="linear", c0=0.5) == 500_000_004
    assert curriculum_pool_size(3 * 10**9, 0, pacing="linear", c0=1 / 3) == 10**9
