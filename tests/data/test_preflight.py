"""The checks before the cluster read the data a row group at a time, in the dataset's row
order, and plan from lengths without holding the tokens (bench/driver_memory.py measures the
memory this saves)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.data.datasets import _scan_columns, _stream, make_sequences, resolve


def _two_files(tmp_path, rows: int = 40_000):
    """A dataset folder of two Parquet files with several row groups each."""
    table = make_sequences(rows)
    folder = tmp_path / "data"
    folder.mkdir()
    half = rows // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet", row_group_size=7_000)
    pq.write_table(table.slice(half), folder / "part-1.parquet", row_group_size=7_000)
    return folder, table


def test_streamed_batches_are_small_and_in_the_datasets_row_order(tmp_path):
    folder, table = _two_files(tmp_path)
    ds = pads.dataset(str(folder), format="parquet")
    batches = list(_stream(ds, ["tokens", "label"]))
    assert max(b.num_rows for b in batches) <= 16_384  # a batch at a time, never a whole file
    assert batches[0].schema.names == ["tokens", "label"]
    streamed = pa.Table.from_batches(batches)
    assert streamed.column("label").equals(ds.to_table(columns=["label"]).column("label"))
    assert streamed.column("tokens").equals(table.column("tokens"))


def test_the_checks_pass_counts_the_lengths_and_keeps_the_small_columns(tmp_path):
    """One pass over the data: the sequence lengths counted while the tokens are checked, and
    the labels, are what the whole table holds (`resolve` keeps them in its DatasetInfo)."""
    folder, table = _two_files(tmp_path)
    cfg, info = resolve(load_config(None, [
        f"data.path={folder}", "data.sequence_column=tokens", "data.target_column=targets",
        "data.label_column=label", "train.loss=token_cross_entropy"]))
    want = pc.list_value_length(table.column("tokens").combine_chunks()).to_numpy()
    np.testing.assert_array_equal(info.small.lengths, want)
    np.testing.assert_array_equal(info.small.labels, table.column("label").to_numpy())
    assert info.facts["max_token"] == pc.max(pc.list_flatten(table.column("tokens"))).as_py()
    pq.write_table(pa.table({"tokens": pa.array([], pa.list_(pa.int64()))}),
                   tmp_path / "empty.parquet")
    empty = _scan_columns(pads.dataset(str(tmp_path / "empty.parquet")), cfg.with_overrides(
        {"data.label_column": None, "data.target_column": None}))
    assert empty.small.lengths.shape == (0,)


def test_a_length_bucketed_folder_resolves(tmp_path):
    """A length-bucketed job on a two-file folder passes the checks (lengths for the first
    epoch's plan come from the streamed column)."""
    folder, _ = _two_files(tmp_path, rows=4_000)
    cfg = load_config(None, [f"data.path={folder}", "data.sequence_column=tokens",
                             "data.target_column=targets", "data.label_column=label",
                             "train.loss=token_cross_entropy", "batching.strategy=length_bucket"])
    cfg, info = resolve(cfg)
    assert info.num_rows == 4_000 and cfg.model.name == "seq_transformer"
