"""The checks before the cluster read the data a row group at a time, in the dataset's row
order, and plan from lengths without holding the tokens (bench/driver_memory.py measures the
memory this saves)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
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


def test_a_batch_larger_than_the_training_split_is_refused_only_when_epoch_1_has_none(tmp_path):
    """`balanced` oversampling 32 training rows to 256 samples an epoch, and a token budget
    over 40 sequences, have batches of 64 (drop_last left on); a random order has none, and
    says why; a warmup schedule has unit batches but never a step of 64."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, 50)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    path = tmp_path / "small.parquet"
    pq.write_table(pa.table({
        "x": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(50 * 4)), 4),
        "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(rng.integers(0, 9, offs[-1]))),
        "label": pa.array(np.arange(50) % 2)}), path)
    common = [f"data.path={path}", "data.label_column=label", "data.val_fraction=0.2",
              "train.global_batch_size=64", "train.micro_batch_size=null"]
    vectors = [*common, "data.feature_column=x"]
    resolve(load_config(None, [*vectors, "batching.strategy=balanced",
                               "batching.options.epoch_samples=256"]))
    resolve(load_config(None, [*common, "data.sequence_column=tokens",
                               "batching.strategy=length_bucket",
                               "batching.options.max_tokens=200"]))
    import pytest

    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"makes no global batch from a pool of 40 of 40 training rows "
                                          r"with train.global_batch_size=64 \(batching.drop_last"):
        resolve(load_config(None, vectors))
    # a batch-size schedule plans unit batches (epoch 1 has some) but would never reach 64
    with pytest.raises(ConfigError, match="train.global_batch_size=64 is larger than the 40 "
                                          "training rows"):
        resolve(load_config(None, [*vectors, "train.batch_size_schedule=warmup",
                                   "train.batch_size_min=8", "train.micro_batch_size=8",
                                   "train.batch_size_warmup_steps=2"]))


def test_the_files_of_a_folder_must_agree_on_each_named_column(tmp_path):
    """The dataset's schema is its first file's: a second file without the label column read
    as null labels ("50 null labels"), and one with int32 labels or float64 features passed
    the checks and failed on the cluster when the blocks were joined. A column nothing names
    may differ."""
    def table(label=None, width=None, other=None, label_column=True):
        t = {"features": pa.array([[0.5, 1.0]] * 20, pa.list_(width or pa.float32())),
             "other": pa.array(["1"] * 20).cast(other or pa.string())}
        if label_column:
            t["label"] = pa.array([0, 1] * 10, label or pa.int64())
        return pa.table(t)

    def resolved(second, first=None):
        folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        pq.write_table(table() if first is None else first, folder / "0.parquet")
        pq.write_table(second, folder / "1.parquet")
        pq.write_table(table(), folder / "2.parquet")
        return resolve(load_config(None, [f"data.path={folder}", "data.feature_column=features",
                                          "data.label_column=label",
                                          "train.global_batch_size=8"]))

    _, info = resolved(table(other=pa.int64()))
    assert info.num_rows == 60
    _, info = resolved(table(label=pa.int32()).slice(0, 0))  # empty: Ray reads no block of it
    assert info.num_rows == 40
    _, info = resolved(table(), first=table(label=pa.int32()).slice(0, 0))  # nor of a first one
    assert info.num_rows == 40
    for second, said in [
            (table(label_column=False), "1.parquet has no column 'label' (data.label_column;"),
            (table(label=pa.int32()), "data.label_column='label' is int32 in "),
            (table(width=pa.float64()), "data.feature_column='features' is list<element: double>"),
            # (a Spark file's `not null`: the blocks' join failed on it as on a type)
            (table().cast(table().schema.set(2, pa.field("label", pa.int64(), nullable=False))),
             "data.label_column='label' is int64 not null in ")]:
        with pytest.raises(ConfigError, match="the files of data.path must agree") as err:
            resolved(second)
        assert said in str(err.value)
    # An empty first file of another schema (Ray Data reads no block of it) is not the one
    # the checks read the columns from: it lacked the label column, or held it as strings,
    # and a good dataset was refused ("not a column", "a string column") -- or, lacking the
    # features, the checks' read ended in a traceback (IndexError, exit 1)
    features = pa.array([], pa.list_(pa.float32()))
    for empty in (pa.table({"features": features}),
                  pa.table({"features": features, "label": pa.array([], pa.string())}),
                  pa.table({"label": pa.array([], pa.int64())})):
        _, info = resolved(table(), first=empty)
        assert info.num_rows == 40
    # and a folder without a Parquet file is said as such
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="holds no Parquet file"):
        resolve(load_config(None, [f"data.path={tmp_path / 'none'}"]))


def test_a_builder_behind_a_registrys_decorator_is_taken(tmp_path):
    """`inspect.signature` shows a functools.wraps wrapper as the function it wraps, which
    names fewer arguments than the workers pass: the wrapper's own signature takes them all,
    so the builder is not refused."""
    cfg, _ = resolve(load_config(None, ["model.name=import:tests.builders:registered_mlp",
                                        "model.kwargs.hidden=8"]))
    assert cfg.model.name == "import:tests.builders:registered_mlp"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("scheme", "command"), [("s3", "train"), ("gs", "train"), ("s3", "tune")])
def test_a_store_that_cannot_be_reached_exits_1_in_one_line_and_soon(scheme, command, tmp_path,
                                                                      capsys, monkeypatch):
    """No network (here: a store on a closed port) is not bad input (exit 2 said the data was
    not Parquet), and the checks do not wait on Arrow's GCS client's 15 minutes of retries.
    A sweep's checks of a swept data.path end the same way (a traceback before)."""
    import json
    import time

    from pipeline import cli
    from pipeline.data import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "GCS_RETRY_S", 2.0)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")  # (S3's client asks no metadata service for any)
    options = {"s3": "&region=us-east-1", "gs": ""}[scheme]
    uri = f"{scheme}://bucket/d?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http{options}"
    started = time.monotonic()
    given = (["--set", f"data.path={uri}"] if command == "train" else
             ["--set", "tune.search_space=" + json.dumps({"data.path": {"grid": [uri]}})])
    assert cli.run([command, *given, "--out", str(tmp_path / "o")]) == 1
    assert time.monotonic() - started < 60
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"data error: data.path {scheme}://bucket/d"), lines
    assert "could not be reached" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no store


def test_options_that_plan_more_than_memory_holds_are_one_line(tmp_path):
    """`balanced` with epoch_samples of 2**31: planning the epoch on the driver ran out of
    memory in a traceback; now one line (in a process limited to 3 GiB of address space)."""
    import subprocess
    import sys

    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
            "from pipeline.config import load_config, ConfigError\n"
            "from pipeline.data.datasets import resolve\n"
            "try:\n"
            "    resolve(load_config(None, ['batching.strategy=balanced', "
            "'batching.options.epoch_samples=2147483640', 'train.global_batch_size=10', "
            "'train.micro_batch_size=null', 'scaling.num_workers=1']))\n"
            "except ConfigError as err:\n"
            "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.stdout.strip() == (
        "config error: batching.strategy=balanced: planning its epochs ran out of memory on "
        "the driver (batching.options={'epoch_samples': 2147483640}, 1,438 training rows)"
    ), out.stderr[-2000:]


def test_a_node_without_the_embedded_file_writes_the_same_one(tmp_path):
    """The embedded dataset's file is written on the driver's machine alone; a node that
    reads it again (the streaming mode's re-read of a lost node's blocks) writes its own from
    the same deterministic builder: the same rows and bytes. Other data is never written."""
    from pipeline.data.datasets import embedded_path, ensure_embedded

    driver = embedded_path("digits", str(tmp_path / "driver"))
    node = tmp_path / "node" / driver.name
    ensure_embedded(str(node))
    assert node.read_bytes() == driver.read_bytes()
    ensure_embedded(str(tmp_path / "mine.parquet"))  # (the user's data: not ours to write)
    assert not (tmp_path / "mine.parquet").exists()


def test_a_damaged_embedded_file_is_written_again_and_a_paths_secret_is_masked(tmp_path):
    """A cache file cut short (a crash before the fsync'd rename existed, say) was read as
    "data.path ... is not readable Parquet" -- a data.path never given -- and never rebuilt;
    it is written again. A data.path's credential is masked in the refusal itself (a sweep or
    a notebook shows the exception's text, not the CLI's masked line)."""
    from pipeline.data.datasets import embedded_path

    good = embedded_path("digits", str(tmp_path)).read_bytes()
    embedded_path("digits", str(tmp_path)).write_bytes(good[: len(good) // 2])
    cfg, info = resolve(load_config(None, ["data.name=digits", f"data.cache_dir={tmp_path}"]))
    assert info.num_rows == 1797 and embedded_path("digits", str(tmp_path)).read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v1.parquet"]  # no temporary left
    with pytest.raises(ConfigError) as err:
        resolve(load_config(None, ["data.path=file:///nowhere/d.parquet?secret_key=hunter22"]))
    assert "hunter22" not in str(err.value) and "secret_key=***" in str(err.value)


def test_a_wide_feature_columns_streamed_batches_hold_about_32_mib(tmp_path):
    """16,384 rows of 4,096 float32 features are 256 MiB: a streamed batch is sized from the
    footer instead (about 32 MiB), so the checks hold about that of a wide column -- 1 GiB
    at its peak for 312 MiB of features before (measured with pyarrow's memory pool)."""
    from pipeline.data.datasets import STREAM_BATCH_BYTES

    rows, width = 5_000, 4_096
    values = pa.array(np.random.default_rng(0).random(rows * width, dtype=np.float32))
    x = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * width), values)
    pq.write_table(pa.table({"x": x, "y": np.zeros(rows, np.int64)}), tmp_path / "w.parquet",
                   row_group_size=rows)  # one row group
    batches = list(_stream(pads.dataset(str(tmp_path / "w.parquet"), format="parquet"), ["x"]))
    assert sum(b.num_rows for b in batches) == rows and len(batches) > 2
    assert max(b.nbytes for b in batches) <= 1.1 * STREAM_BATCH_BYTES
