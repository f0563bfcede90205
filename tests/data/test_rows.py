"""The streaming mode's rows (`pipeline/data/rows.py`), without Ray: a rank that holds only the
small columns and fetches the rows of its coming steps collates exactly the arrays a rank
holding the whole table collates, fetches each of its rows once per epoch and no other rank's,
and holds at most three chunks at a time (the one in use and two asked for ahead)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.data.batches import SampleTable, micro_slices, split_train_val
from pipeline.data.datasets import make_digits, make_sequences
from pipeline.data.feed import RankFeed
from pipeline.data.rows import LargeColumns, StreamedRows, TableFetch, scatter_rows, take_rows

SEQUENCES = make_sequences(n=600)
DIGITS = make_digits()


class CountingFetch(TableFetch):
    """A local table's rows, counting what is asked for, what is used (its result taken) and
    how much is in flight."""

    def __init__(self, table):
        super().__init__(table)
        self.asked: list[np.ndarray] = []
        self.used: list[np.ndarray] = []
        self.in_flight = self.most_in_flight = 0

    def submit(self, positions):
        self.asked.append(positions)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return positions, super().submit(positions)

    def result(self, handle):
        positions, rows = handle
        self.used.append(positions)
        self.in_flight -= 1
        return super().result(rows)


def _tables(kind: str):
    if kind == "sequences":
        table, cols = SEQUENCES, LargeColumns(None, "tokens", "targets")
        full = SampleTable.from_table(table, feature_column=None, label_column="label",
                                      sequence_column="tokens", target_column="targets")
    else:
        table, cols = DIGITS, LargeColumns("features", None, None)
        full = SampleTable.from_table(table, feature_column="features", label_column="label")
    small = dataclasses.replace(full, features=None, tokens=None, targets=None)
    return table, cols, full, small


WARMUP = ["model.name=seq_transformer", "train.global_batch_size=32",
          "train.batch_size_schedule=warmup", "train.batch_size_min=8",
          "train.batch_size_warmup_steps=6", "train.micro_batch_size=8"]
def ramp(i: int) -> int:
    return min(4, 1 + i // 2)


CASES = {  # name -> (dataset, overrides, units per step: a function of the epoch's step index,
    # what the feed is told of them in advance: all of them, as a constant or warmup schedule
    # tells it, or nothing, or a wrong forecast)
    "packed, length-bucketed": ("sequences", [
        "batching.strategy=length_bucket", "batching.packing=true", "model.name=seq_transformer",
        "train.global_batch_size=32", "train.micro_batch_size=8"], lambda i: 1, None),
    "padded, warmup from 8 to 32": ("sequences", WARMUP, ramp, ramp),
    "padded, sizes not known in advance": ("sequences", WARMUP, ramp, None),  # (adaptive)
    "padded, a forecast that misses": ("sequences", WARMUP, ramp, lambda i: 1),
    "contrastive digits": ("digits", ["batching.strategy=contrastive", "train.loss=nt_xent",
                                       "train.global_batch_size=64", "model.name=mlp"],
                           lambda i: 1, None),
}
MISSED = ("padded, sizes not known in advance", "padded, a forecast that misses")


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_rows_collate_what_the_whole_table_collates(case, world):
    kind, sets, units, forecast = CASES[case]
    cfg = load_config(None, [f"data.name={kind}", *sets])
    table, cols, full, small = _tables(kind)
    train, val = split_train_val(len(full), full.labels, 0.2, 0)
    micro = 8
    for rank in range(world):
        whole = RankFeed(cfg, full, train, rank, world)
        fetch = CountingFetch(table)
        streamed = StreamedRows(small, fetch, cols, rank, world, chunk_rows=40)
        feed = RankFeed(cfg, small, train, rank, world, streamed=streamed)
        for epoch in range(2):
            a, b = iter(range(10**6)), iter(range(10**6))  # the step index, for `units`
            _, want_steps = whole.epoch(epoch, lambda a=a: units(next(a)))
            _, got_steps = feed.epoch(epoch, lambda b=b: units(next(b)), guess=forecast)
            asked_before, used_before = len(fetch.asked), len(fetch.used)
            mine, windows = [], []
            for want, got in zip(want_steps, got_steps, strict=True):
                assert np.array_equal(want.mine, got.mine)
                mine.append(got.mine)
                if not windows or got.rows is not windows[-1]:
                    windows.append(got.rows)
                # the feed holds the rows of the chunk in use only: those before are released
                assert [w.rows is None for w in windows] == [True] * (len(windows) - 1) + [False]
                for a, b in zip(want.micro(micro), got.micro(micro), strict=True):
                    x = whole.collate(a, (0, epoch, 0), want.rows)
                    y = feed.collate(b, (0, epoch, 0), got.rows)
                    assert x.keys() == y.keys()
                    for key in x:
                        assert np.array_equal(x[key], y[key]), key
            assert all(w.rows is None for w in windows)  # the epoch over: none held
            # The chunks used hold each row of the rank's steps once, and no other row; at
            # most the current chunk and the two next are in flight or held.
            used = np.concatenate(fetch.used[used_before:])
            mine = np.concatenate(mine)
            assert len(mine) == len(np.unique(mine))
            dropped = len(fetch.asked) - len(fetch.used)  # never used, all epochs so far
            if case not in MISSED:
                assert len(used) == len(mine) and set(used) == set(mine)
                assert dropped == 0  # every chunk asked for was used: several, one by one
                assert len(fetch.asked) - asked_before == len(fetch.used) - used_before > 1
                assert fetch.most_in_flight <= 3
                continue
            # Where the steps change size unforecast or mis-forecast (k 1 -> 2 -> 3 -> 4, three
            # changes an epoch), the chunk in use was fetched for steps of another size: the
            # rest of it
            # (less than a chunk: 40 rows here, and one step's share of 32) is fetched again
            # in the next, and the two chunks asked for ahead are dropped unused.
            changes = 3
            assert set(used) >= set(mine)
            assert 0 < len(used) - len(mine) <= changes * (40 + 32 // world)
            assert 0 < dropped <= 2 * changes * (epoch + 1)
            assert fetch.most_in_flight <= 3 + dropped
        # validation parts: the same arrays, fetched in chunks
        parts = micro_slices(val[rank::world], micro)
        seen = []
        for (p, rows), q in zip(feed.over(parts), parts, strict=True):
            if not seen or rows is not seen[-1]:
                seen.append(rows)
            assert all(w.rows is None for w in seen[:-1]) and rows.rows is not None
            assert np.array_equal(p, q)
            x = whole.collate(q, (0, 0, 1), full)
            y = feed.collate(p, (0, 0, 1), rows)
            for key in x:
                assert np.array_equal(x[key], y[key]), key


def test_take_rows_takes_chunk_by_chunk_what_arrow_takes():
    """The servers' take (per chunk, to avoid Arrow's joining a block's chunks per call) equals
    Arrow's own on columns of many chunks: sorted and unsorted rows, repeats, none, and the
    column types the large columns have (floats, fixed-size and variable lists)."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        lens = rng.integers(1, 6, rng.integers(1, 5))
        values = np.arange(int(lens.sum()))
        kinds = [pa.array(values), pa.FixedSizeListArray.from_arrays(
            pa.array(np.repeat(values, 2)), 2), pa.array([[v] * (v % 3) for v in values])]
        bounds = np.cumsum(lens)[:-1]
        for whole in kinds:
            col = pa.chunked_array([whole.slice(a, b - a) for a, b in
                                    zip([0, *bounds], [*bounds, len(whole)], strict=True)])
            rows = rng.integers(0, len(whole), rng.integers(0, 8))
            if trial % 2:
                rows = np.sort(rows)
            got = take_rows(col, rows)
            assert got.type == col.type
            assert got.combine_chunks().equals(
                col.take(pa.array(rows, pa.int64())).combine_chunks()), (lens, rows)
            if trial % 2:  # sorted: one part per chunk holding some of the rows, none joined
                assert got.num_chunks == len(np.unique(np.searchsorted(
                    np.cumsum(lens), rows, side="right")))


def test_scatter_rows_puts_each_nodes_rows_where_they_belong():
    """A chunk joined from the nodes' answers (numbers and fixed-size lists by numpy, the rest
    by Arrow) has exactly the rows of the table they were taken from, in order, types kept."""
    rng = np.random.default_rng(1)
    for trial in range(100):
        n = int(rng.integers(1, 30))
        values = rng.normal(size=(n, 3)).astype(np.float32)
        kinds = [pa.array(np.arange(n)), pa.array(values[:, 0]),
                 pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 3),
                 pa.array([[i] * (i % 3) for i in range(n)]),
                 pa.array([None if i % 4 == 0 else float(i) for i in range(n)])]  # nulls
        node = rng.integers(0, 3, n)  # which node holds each row
        where = [np.flatnonzero(node == k) for k in range(3) if (node == k).any()]
        for whole in kinds:
            pieces = [pa.chunked_array([whole.take(pa.array(w[: len(w) // 3])),
                                        whole.take(pa.array(w[len(w) // 3: len(w) // 2])),
                                        whole.take(pa.array(w[len(w) // 2:]))]) for w in where]
            got = scatter_rows(pieces, where, n)
            assert got.type == whole.type and got.equals(whole), (trial, whole.type)


def test_a_rank_with_no_validation_rows_gathers_an_empty_batch_in_either_mode():
    """Fewer validation rows than ranks: a rank's share is empty, and it still runs its
    (empty) forward pass -- a DDP model's first forward after training broadcasts buffers, so
    every rank must take it. Features written as plain lists (list<double>: what pandas
    writes) have no width to read off zero rows: the streamed window takes it from the
    dataset's facts (`LargeColumns.feature_width`), so both modes collate the same arrays."""
    x = pa.array([[float(i), 1.0] for i in range(6)], type=pa.list_(pa.float64()))
    table = pa.table({"x": x, "y": pa.array([0, 1, 0, 1, 0, 1])})
    cfg = load_config(None, ["data.name=digits", "model.name=mlp", "train.global_batch_size=2"])
    full = SampleTable.from_table(table, feature_column="x", label_column="y")
    small = dataclasses.replace(full, features=None)
    val, world = np.array([1, 4]), 3
    for rank in range(world):
        parts = micro_slices(val[rank::world], 4)  # rank 2: [empty]
        whole = RankFeed(cfg, full, np.arange(6), rank, world)
        streamed = StreamedRows(small, TableFetch(table.select(["x"])),
                                LargeColumns("x", None, None, feature_width=2), rank, world)
        feed = RankFeed(cfg, small, np.arange(6), rank, world, streamed=streamed)
        want = [whole.collate(p, (0, 0, 1), rows) for p, rows in whole.over(parts)]
        got = [feed.collate(p, (0, 0, 1), rows) for p, rows in feed.over(parts)]
        assert len(want) == len(got) == 1
        assert want[0].keys() == got[0].keys()
        for key in want[0]:
            assert np.array_equal(want[0][key], got[0][key]), key
        assert got[0]["features"].shape == ((1, 2) if rank < 2 else (0, 2))


def test_every_chunk_a_streamed_rank_fetches_is_checked_before_it_is_trained():
    """The worker's check (`data_outside_model`: a token id the model's vocabulary lacks, the
    data changed since the driver's checks) sees every chunk's rows as they arrive: the first
    chunk holding row 150 -- whose token was changed -- raises, before any of its steps."""
    from pipeline.worker import data_outside_model

    table, cols, full, small = _tables("sequences")
    tokens = table.column("tokens").to_pylist()
    tokens[150] = [999] * len(tokens[150])
    changed = table.set_column(table.schema.get_field_index("tokens"), "tokens",
                               pa.array(tokens, type=table.schema.field("tokens").type))
    cfg = load_config(None, ["data.name=sequences", "model.name=seq_transformer",
                             "train.loss=token_cross_entropy"])
    streamed = StreamedRows(small, TableFetch(changed.select(cols.names())), cols, 0, 1,
                            chunk_rows=64)
    seen: list[np.ndarray] = []

    def check(rows):
        seen.append(rows.ids)
        if (outside := data_outside_model(cfg, {"num_outputs": 1000, "vocab_size": 64}, rows)):
            raise ValueError(outside)

    streamed.check = check
    batches = [np.arange(i, i + 32) for i in range(0, 256, 32)]
    trained = []
    with pytest.raises(ValueError, match="token id 999, the model's vocabulary has 64"):
        for batch, _, _ in streamed.steps(batches, [(b, 1) for b in batches]):
            trained.append(int(batch[0]))
    assert trained == [0, 32, 64, 96]  # the chunk of rows 128-191 never trained
    assert len(seen) == 3 and 150 in seen[-1]


def test_token_lists_past_int32_offsets_are_combined_as_large_lists(monkeypatch):
    """A token column of more values than int32 offsets hold, over several blocks: Arrow
    refuses to combine it as list<> ("offset overflow"), which failed every rank of an
    object-store job as a data error; it becomes a large_list and gathers the same batches
    (the limit is lowered here: 2**31 tokens would not fit a test)."""
    import pipeline.data.batches as batches

    table = make_sequences(60, seed=0)
    blocks = pa.concat_tables([table.slice(0, 25), table.slice(25, 35)])  # two chunks
    kwargs = dict(feature_column=None, label_column="label", sequence_column="tokens",
                  target_column="targets")
    ref = SampleTable.from_table(blocks, **kwargs)
    assert pa.types.is_list(ref.tokens.type)
    monkeypatch.setattr(batches, "LIST_OFFSETS_MAX", 100)  # < the column's tokens
    big = SampleTable.from_table(blocks, **kwargs)
    assert pa.types.is_large_list(big.tokens.type) and pa.types.is_large_list(big.targets.type)
    pos = np.array([3, 40, 7, 59, 25])
    a, b = ref.gather(pos), big.gather(pos)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
