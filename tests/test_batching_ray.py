"""Batch composition through Ray: inspect-batches on 1 and 3 workers (in-process, on the
session's cluster), bad data rejected before Ray (in-process, no cluster), and the curriculum /
hard-mining / contrastive / length-bucketed strategies training end to end through Ray Train,
logged to the real MLflow server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data.datasets import resolve
from tests.conftest import REPO, cli_in_process
from tests.data.test_epochs import odd_table
from tests.test_refusals import refused

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def odd_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd") / "odd.parquet"
    pq.write_table(odd_table(), path)
    return path


def global_batches(parquet) -> dict[tuple[int, int], list[int]]:
    df = pd.read_parquet(parquet)
    df["row"] = np.arange(len(df))
    df = df.sort_values(["epoch", "batch", "rank", "micro", "row"])
    return {k: g["sample_id"].tolist() for k, g in df.groupby(["epoch", "batch"])}


@pytest.mark.ray
def test_inspect_batches_same_global_batches_on_1_and_3_workers(ray_client, odd_parquet,
                                                                 tmp_path, capsys, monkeypatch):
    common = ["--set", f"data.path={odd_parquet}", "--set", "data.feature_column=null",
              "--set", "data.sequence_column=tokens", "--set", "model.name=seq_transformer",
              "--set", "batching.strategy=length_bucket", "--set", "train.epochs=2",
              "--set", "train.global_batch_size=48", "--set", "train.micro_batch_size=8",
              "--set", "batching.pad_multiple_of=8", "--set", "data.val_fraction=0.1"]
    seen = {}
    for world in (1, 3):
        rc, stdout, stderr = cli_in_process(
            ["inspect-batches", *common, "--set", f"scaling.num_workers={world}",
             "--out", str(tmp_path / f"w{world}")], capsys, monkeypatch)
        assert rc == 0, stderr[-2000:]
        assert f"on {world} worker{'s' if world > 1 else ''}: " in stdout
        assert "padding_efficiency" in stdout
        seen[world] = global_batches(tmp_path / f"w{world}" / "batches.parquet")
        summary = json.loads((tmp_path / f"w{world}" / "summary.json").read_text())
        for ep in summary["epochs"]:
            assert ep["duplicates"] == 0
            assert ep["padding_efficiency"] >= 0.85  # length-bucketed
        assert (tmp_path / f"w{world}" / "batches.png").stat().st_size > 10_000
    assert seen[1] == seen[3]
    df = pd.read_parquet(tmp_path / "w3" / "batches.parquet")
    assert sorted(df["rank"].unique()) == [0, 1, 2]
    assert {"epoch", "rank", "batch", "sample_id", "label", "length", "difficulty",
            "weight"} <= set(df.columns)


def write(path, table):
    pq.write_table(table, path)
    return str(path)


@pytest.mark.ray
def test_bad_data_met_in_the_inspect_tasks_ends_in_their_one_line(ray_client, tmp_path):
    """A data error the driver's check did not see (skipped here, as when the file changes
    after it) ends `inspect_batches` with the Ray task's one-line ConfigError, not the
    traceback Ray wraps it in."""
    import ray

    from pipeline.config import ConfigError
    from pipeline.data.datasets import DatasetInfo
    from pipeline.inspect import inspect_batches

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    labels[7] = -1
    path = write(tmp_path / "bad.parquet",
                 pa.table({"x": list(rng.normal(size=(200, 4)).astype("float32")), "y": labels}))
    cfg = load_config(None, [f"data.path={path}", "data.feature_column=x", "data.label_column=y",
                             "model.name=mlp", "train.global_batch_size=32"])
    with pytest.raises(ConfigError, match=r"negative label \(-1\)") as err:
        inspect_batches(cfg, DatasetInfo(uri=path, num_rows=200, columns=("x", "y")),
                        tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not isinstance(err.value, ray.exceptions.RayTaskError)


@pytest.mark.ray
def test_the_streaming_modes_actors_end_with_the_call_that_ingested(ray_client, tmp_path,
                                                                    monkeypatch):
    """A job, sweep or inspection run from Python (a notebook) that ingested in the streaming
    mode ends its block servers and keeper when it returns: each held a share of the dataset
    for the life of the Python process."""
    from ray.util.state import list_actors

    import pipeline.launch
    from pipeline.inspect import inspect_batches

    during: list[int] = []
    ingest = pipeline.launch.ingest

    def counting(*args, **kwargs):  # (the streaming mode's actors exist once it ingested)
        blocks = ingest(*args, **kwargs)
        during.append(alive())
        return blocks

    monkeypatch.setattr(pipeline.launch, "ingest", counting)

    def alive() -> int:
        return sum(len(list_actors(filters=[("class_name", "=", name), ("state", "=", "ALIVE")],
                                   limit=10_000))
                   for name in ("BlockServer", "BlockKeeper"))

    before = alive()
    cfg, info = resolve(load_config(DIGITS, ["data.mode=streaming", "train.epochs=1"]))
    inspect_batches(cfg, info, tmp_path / "out")
    assert during and during[0] > before  # (the test sees the actors it waits to see go)
    import time

    deadline = time.monotonic() + 20  # a killed actor is reported dead shortly after
    while alive() != before:
        assert time.monotonic() < deadline, f"{alive()} streaming actor(s) left, {before} before"
        time.sleep(0.5)


@pytest.mark.ray
def test_ingest_takes_only_the_columns_the_job_names(ray_client, tmp_path):
    """A column nothing in the config names stays in the file: not in the object store."""
    import ray
    import ray.data

    from pipeline.blocks import ingest

    rng = np.random.default_rng(0)
    path = write(tmp_path / "extra.parquet", pa.table({
        "x": list(rng.normal(size=(200, 4)).astype("float32")), "y": rng.integers(0, 3, 200),
        "raw": [f"raw text {i}" for i in range(200)]}))
    cfg, info = resolve(load_config(None, [f"data.path={path}", "data.feature_column=x",
                                           "data.label_column=y", "model.name=mlp"]))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, ctx.use_datasource_v2 = False, True  # Ray's defaults
    before = (False, True)
    held = ingest(info, cfg)
    tables = ray.get(held.refs)
    assert {tuple(t.column_names) for t in tables} == {("x", "y")}
    assert sum(t.num_rows for t in tables) == 200
    # the driver's own Ray Data settings (a notebook's reads) are as they were
    assert (ctx.execution_options.preserve_order, ctx.use_datasource_v2) == before


@pytest.mark.ray
def test_ray_reads_the_files_the_driver_checked(ray_client, tmp_path):
    """A folder of `a.pq`, `b.parquet` and `sub/_c.parquet`: the driver's checks (pyarrow's
    discovery) read a.pq and b.parquet; Ray's own listing read b.parquet and sub/_c.parquet --
    other rows than those checked (and than the keeper reads again for a lost node). The
    ingest reads the driver's files, in its order."""
    import ray

    from pipeline.blocks import ingest

    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for name, start in (("a.pq", 0), ("b.parquet", 50), ("sub/_c.parquet", 100)):
        x = np.arange(start, start + 50, dtype=np.float32)
        pq.write_table(pa.table({"x": list(np.stack([x, x], 1)), "y": (np.arange(50) % 2)}),
                       folder / name)
    cfg, info = resolve(load_config(None, [f"data.path={folder}", "data.feature_column=x",
                                           "data.label_column=y", "model.name=mlp"]))
    assert info.num_rows == 100
    got = pa.concat_tables(ray.get(ingest(info, cfg).refs))
    assert [v[0] for v in got.column("x").to_pylist()] == list(range(100))


@pytest.mark.ray
def test_ranks_in_the_object_store_mode_map_one_copy_of_the_data(ray_client, tmp_path):
    """The blocks Ray Data reads are joined into one table at ingest: every rank's features
    are views of the same object-store buffer, not a copy per rank (each rank joined several
    blocks into arrays of its own); the rows are the file's, in its order."""
    import ray

    from pipeline.blocks import Blocks, ingest, load_rows, one_block

    rng = np.random.default_rng(0)
    n, path = 600, tmp_path / "three_files"
    path.mkdir()
    x = rng.normal(size=(n, 4)).astype(np.float32)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                      "y": np.arange(n) % 3})
    for i in range(3):  # (a file is read by one task: one block or more each)
        pq.write_table(table.slice(200 * i, 200), path / f"part-{i}.parquet")
    cfg, info = resolve(load_config(None, [f"data.path={path}", "data.feature_column=x",
                                           "data.label_column=y", "model.name=mlp",
                                           "data.mode=object_store"]))
    assert len(ingest(info, cfg).refs) == 1
    # Several blocks (as Ray Data gives a larger dataset) joined into one:
    blocks = Blocks("object_store", one_block([ray.put(table.slice(200 * i, 200)) for i in range(3)]))
    assert len(blocks.refs) == 1
    one, _, _ = load_rows(cfg, blocks, 0, 2)
    two, _, _ = load_rows(cfg, blocks, 1, 2)
    assert np.shares_memory(one.features, two.features)
    assert np.array_equal(one.features, x) and np.array_equal(one.labels, np.arange(n) % 3)
    assert pa.concat_tables(ray.get(blocks.refs)).column("x").num_chunks == 1
    # Features of float64 (pandas writes list<double>) in one block of several chunks: cast to
    # float32 and joined once at ingest, not by every rank (each held a float32 copy of its own)
    x64 = rng.normal(size=(n, 4))
    t64 = pa.Table.from_batches([pa.record_batch({"x": pa.array(x64[i:i + 200].tolist()),
                                                  "y": np.arange(i, i + 200) % 3})
                                 for i in range(0, n, 200)])
    assert t64.column("x").num_chunks == 3 and t64.column("x").type == pa.list_(pa.float64())
    blocks = Blocks("object_store", one_block([ray.put(t64)], "x"))
    one, _, _ = load_rows(cfg, blocks, 0, 2)
    two, _, _ = load_rows(cfg, blocks, 1, 2)
    assert np.shares_memory(one.features, two.features) and one.features.dtype == np.float32
    assert np.array_equal(one.features, x64.astype(np.float32))
    # one block already of one chunk per column and float32 features: left as it is (a join
    # would copy it); one that needs the join is joined
    fine, chunked = ray.put(table), ray.put(t64)
    assert one_block([fine], "x") == [fine] and one_block([chunked], "x") != [chunked]
    with pytest.raises(pa.ArrowInvalid):  # a join that fails says so at ingest
        one_block([ray.put(table), ray.put(pa.table({"z": [1]}))])


def test_bad_datasets_exit_2_before_ray(tmp_path, data_dir, capsys, monkeypatch):
    """In-process, with the cluster unreachable (tests/test_refusals.py's harness)."""
    one = pa.table({"features": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(40 * 4, np.float32)), 4),
        "label": pa.array([0] * 20 + [1] * 19 + [2])})  # class 2: 1 sample
    cases = {
        "class": (write(tmp_path / "one.parquet", one), [], "missing from the validation"),
        "empty": (write(tmp_path / "empty.parquet", one.slice(0, 0)), [], "no rows"),
        "sequence": (write(tmp_path / "noseq.parquet", one), ["data.sequence_column=tokens"],
                     "data.sequence_column"),
        "shard": (write(tmp_path / "small.parquet", one), ["data.val_fraction=0",
                                                           "train.global_batch_size=64"],
                  "train.global_batch_size"),
        "balanced": (write(tmp_path / "bal.parquet", one), [
            "data.val_fraction=0", "batching.strategy=balanced", "train.global_batch_size=8",
            "train.micro_batch_size=null"], "divisible"),
    }
    for name, (path, extra, culprit) in cases.items():
        args = ["train", "--set", f"data.path={path}", "--set", "data.feature_column=features",
                "--set", "model.name=mlp"]
        for e in extra:
            args += ["--set", e]
        with monkeypatch.context() as mp:
            line = refused(args, capsys, mp)
        assert culprit in line, (name, line)


def train(mlflow_uri, out, *overrides):
    from pipeline.launch import run_training

    cfg = load_config(DIGITS, [f"tracking.uri={mlflow_uri}", "tracking.experiment=strategies",
                               "tracking.log_model=false", *overrides])
    cfg, info = resolve(cfg)
    summary = run_training(cfg, info, out)
    return summary, MlflowClient(mlflow_uri)


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


SEQ = ["data.name=sequences", "train.loss=token_cross_entropy", "batching.max_length=64",
       "train.optimizer=adamw", "train.base_lr=0.003", "train.global_batch_size=32",
       "train.micro_batch_size=8", "train.base_batch_size=32", "data.val_fraction=0.5"]


@pytest.mark.ray
@pytest.mark.mlflow
def test_length_bucket_and_curriculum_train_on_sequences(ray_client, mlflow_server, tmp_path):
    lb = [*SEQ, "batching.strategy=length_bucket", "batching.pad_multiple_of=8",
          "train.epochs=1", "train.max_steps=15"]
    s, client = train(mlflow_server, tmp_path / "lb", *lb)
    eff = history(client, s["mlflow_run_id"], "padding_efficiency")
    assert len(eff) == 1 and eff[0] >= 0.8
    # tokens_per_s counts every rank's real tokens (ranks hold different counts): exactly the
    # truncated lengths of the rows the 15 steps drew on both ranks, as inspect-batches draws
    from pipeline.inspect import feed_rows

    cfg, info = resolve(load_config(DIGITS, lb))
    real = sum(int(feed_rows(cfg, info.small, r).column("length").to_numpy().sum())
               for r in range(cfg.scaling.num_workers))
    tokens = history(client, s["mlflow_run_id"], "tokens_per_s")[0]
    wall = history(client, s["mlflow_run_id"], "epoch_time_s")[0]
    assert cfg.scaling.num_workers == 2 and tokens * wall == pytest.approx(real, rel=1e-6)
    s, client = train(mlflow_server, tmp_path / "cur", *SEQ, "batching.strategy=curriculum",
                      "batching.options.difficulty=length", "batching.options.pacing=linear",
                      "batching.options.c0=0.1", "batching.options.pacing_epochs=2",
                      "train.epochs=3", "train.global_batch_size=16", "train.micro_batch_size=8",
                      "train.base_batch_size=16", "data.val_fraction=0.8",
                      "train.loss=cross_entropy")
    pool = history(client, s["mlflow_run_id"], "pool_size")
    # linear pacing from c0 0.1 over 2 epochs: c = 0.1, 0.55, 1.0 of the 800 training rows
    assert pool == [80, 440, 800]
    # Which of 3 token groups dominates a sequence: learned well above chance (1/3).
    assert s["metrics"]["val_accuracy"] > 0.6


@pytest.mark.ray
@pytest.mark.mlflow
def test_hard_mining_and_contrastive_train_on_digits(ray_client, mlflow_server, tmp_path):
    s, client = train(mlflow_server, tmp_path / "hm", "batching.strategy=hard_mining",
                      "batching.options.selection_pressure=10", "train.epochs=3")
    losses = history(client, s["mlflow_run_id"], "hard_mining/loss_mean")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert s["metrics"]["val_accuracy"] > 0.8
    s, client = train(mlflow_server, tmp_path / "con", "batching.strategy=contrastive",
                      "train.loss=nt_xent", "train.epochs=3", "model.kwargs.embedding_dim=32",
                      "train.optimizer=adamw", "train.base_lr=0.002")
    loss = history(client, s["mlflow_run_id"], "train_loss")
    assert loss[-1] < loss[0]
    # Retrieval accuracy: the nearest other view is the same digit's view. Validated as one
    # NT-Xent batch of the 360 validation samples (720 views: chance ~ 1/719; 0.45 here).
    assert s["metrics"]["val_accuracy"] > 0.3


class _OneRank:
    """The worker function's session for rank 0 of 1 in this process (no Ray Train): the
    training reports are kept, the checkpoints dropped."""

    rank, world = 0, 1

    def __init__(self):
        import torch

        self.device, self.reports = torch.device("cpu"), []

    def prepare_model(self, model, ddp_kwargs):
        return model

    def restart_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))


@pytest.mark.ray
def test_training_and_inspect_draw_the_same_batches_from_the_one_feed(
        ray_client, odd_parquet, tmp_path, capsys, monkeypatch):
    """Every micro-batch the worker function trains on (what `RankFeed.collate` is asked for,
    in order) is a micro-batch `inspect-batches` wrote, in the same order, over two epochs of
    length-bucketed, packed sequences with a batch-size warmup."""
    import ray
    import yaml

    from pipeline.data.feed import RankFeed
    from pipeline.tracking import start_run
    from pipeline.worker import train_func

    sets = [f"data.path={odd_parquet}", "data.feature_column=null",
            "data.sequence_column=tokens", "model.name=seq_transformer",
            "model.kwargs={d_model: 16, nhead: 2, num_layers: 1, dim_feedforward: 32}",
            "batching.strategy=length_bucket", "batching.packing=true", "train.epochs=2",
            "train.global_batch_size=48", "train.micro_batch_size=8",
            "train.batch_size_schedule=warmup", "train.batch_size_min=16",
            "train.batch_size_warmup_steps=4", "train.warmup_epochs=0",
            "data.val_fraction=0.1", "scaling.num_workers=1", "tracking.log_model=false"]
    rc, _, stderr = cli_in_process(["inspect-batches", *[a for s in sets for a in ("--set", s)],
                                    "--out", str(tmp_path / "inspect")], capsys, monkeypatch)
    assert rc == 0, stderr[-2000:]
    df = pd.read_parquet(tmp_path / "inspect" / "batches.parquet")
    df["row"] = np.arange(len(df))
    inspected = [(int(e), g["position"].tolist())
                 for (e, _, _), g in df.sort_values("row").groupby(["epoch", "batch", "micro"],
                                                                   sort=False)]

    cfg, info = resolve(load_config(None, sets))
    drawn = []
    collate = RankFeed.collate

    def recording(self, part, key, rows):
        if key[2] == 0:  # a training micro-batch (validation's key ends in 1)
            drawn.append((key[1], part.tolist()))
        return collate(self, part, key, rows)

    monkeypatch.setattr(RankFeed, "collate", recording)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "feed", run_name=None, params={}, config_yaml=yaml.safe_dump({}))
    session = _OneRank()
    train_func({"config": cfg.to_dict(), "table_refs": [ray.put(pq.read_table(odd_parquet))],
                "model_facts": info.facts, "run_id": run_id, "tracking_uri": uri}, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert drawn == inspected and len(drawn) > 2 * 4


@pytest.mark.ray
def test_a_jobs_ranks_train_exactly_the_micro_batches_inspect_wrote_for_them(
        ray_client, odd_parquet, tmp_path, capsys, monkeypatch):
    """The job itself (`run_training`, Ray Train, 2 ranks): each rank's training micro-batches
    -- what its `RankFeed.collate` is asked for, in order, recorded in the worker's process --
    are the micro-batches `inspect-batches` wrote for that rank, over two epochs of a
    batch-size warmup on length-bucketed sequences."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import launch

    sets = [f"data.path={odd_parquet}", "data.feature_column=null",
            "data.sequence_column=tokens", "model.name=seq_transformer",
            "model.kwargs={d_model: 16, nhead: 2, num_layers: 1, dim_feedforward: 32}",
            "batching.strategy=length_bucket", "train.epochs=2",
            "train.global_batch_size=48", "train.micro_batch_size=8",
            "train.batch_size_schedule=warmup", "train.batch_size_min=16",
            "train.batch_size_warmup_steps=4", "train.warmup_epochs=0",
            "data.val_fraction=0.1", "scaling.num_workers=2", "tracking.log_model=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    rc, _, stderr = cli_in_process(["inspect-batches", *[a for s in sets for a in ("--set", s)],
                                    "--out", str(tmp_path / "inspect")], capsys, monkeypatch)
    assert rc == 0, stderr[-2000:]
    df = pd.read_parquet(tmp_path / "inspect" / "batches.parquet")
    df["row"] = np.arange(len(df))
    inspected = {r: [(int(e), g["position"].tolist()) for (e, _, _), g in part.sort_values("row")
                     .groupby(["epoch", "batch", "micro"], sort=False)]
                 for r, part in df.groupby("rank")}
    record = tmp_path / "drawn"

    def entry(config):  # (a closure: Ray pickles it by value into each worker)
        from pipeline.data.feed import RankFeed
        from pipeline.worker import train_func

        drawn, collate = [], RankFeed.collate

        def recording(self, part, key, rows):
            if key[2] == 0:  # a training micro-batch (validation's key ends in 1)
                drawn.append((key[1], part.tolist()))
            return collate(self, part, key, rows)

        RankFeed.collate = recording
        try:
            launch._worker_entry(train_func, config)
        finally:
            rank = ray.train.get_context().get_world_rank()
            (record / f"rank{rank}.json").write_text(json.dumps(drawn))

    def fit(cfg, loop_config, name, storage):
        result = TorchTrainer(entry, train_loop_config=loop_config,
                              scaling_config=ray.train.ScalingConfig(num_workers=2),
                              run_config=ray.train.RunConfig(name=name, storage_path=str(storage))
                              ).fit()
        assert result.error is None, result.error
        return dict(result.metrics or {}), Path(result.checkpoint.path)

    record.mkdir()
    cfg, info = resolve(load_config(None, sets))
    launch.run_training(cfg, info, tmp_path / "job", fit=fit, show_progress=False)
    for rank in (0, 1):
        drawn = [tuple(x) for x in json.loads((record / f"rank{rank}.json").read_text())]
        assert drawn == inspected[rank] and len(drawn) > 2 * 4, rank


@pytest.mark.ray
def test_hard_minings_second_epoch_draws_by_the_losses_its_first_epoch_scored(
        ray_client, tmp_path, monkeypatch):
    """The worker hands the pool's losses, scored after epoch 1, to epoch 2's plan: its draws
    lean to the hard samples (their mean loss well above the pool's; selection pressure 100),
    where epoch 1 -- no losses yet -- drew uniformly. A worker that passed no losses would
    draw uniformly in both, and train and log as well."""
    import ray
    import yaml

    from pipeline.data.datasets import make_digits
    from pipeline.data.feed import RankFeed
    from pipeline.tracking import start_run
    from pipeline.worker import train_func

    sets = ["batching.strategy=hard_mining", "batching.options.selection_pressure=100",
            "train.epochs=2", "scaling.num_workers=1", "tracking.log_model=false"]
    cfg, info = resolve(load_config(DIGITS, sets))
    drawn: dict[int, list[int]] = {0: [], 1: []}
    given: dict[int, np.ndarray | None] = {}
    collate, epoch_of = RankFeed.collate, RankFeed.epoch

    def recording(self, part, key, rows):
        if key[2] == 0:  # a training micro-batch
            drawn[key[1]] += part.tolist()
        return collate(self, part, key, rows)

    def planned(self, epoch, units, sample_losses=None, **kwargs):
        given[epoch] = None if sample_losses is None else np.array(sample_losses)
        return epoch_of(self, epoch, units, sample_losses, **kwargs)

    monkeypatch.setattr(RankFeed, "collate", recording)
    monkeypatch.setattr(RankFeed, "epoch", planned)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "mined", run_name=None, params={}, config_yaml=yaml.safe_dump({}))
    session = _OneRank()
    train_func({"config": cfg.to_dict(), "table_refs": [ray.put(make_digits())],
                "model_facts": info.facts, "run_id": run_id, "tracking_uri": uri}, session)
    assert given[0] is None or np.isnan(given[0]).all()  # epoch 1: nothing scored yet
    losses = given[1]
    train = np.unique(drawn[0])  # (uniform draws with replacement: most of the pool)
    assert losses is not None and np.isfinite(losses[train]).all()
    pool_mean = losses[train].mean()
    first, second = losses[drawn[0]].mean(), losses[drawn[1]].mean()
    assert second > 1.5 * pool_mean and abs(first - pool_mean) < 0.25 * pool_mean, (
        first, second, pool_mean)


@pytest.mark.ray
def test_a_token_budget_trains_every_step_at_the_configured_batchs_lr(ray_client, odd_parquet,
                                                                       tmp_path):
    """Under `max_tokens` a step's sample count follows its sequences' lengths; its LR is the
    scaling rule at the configured global batch (linear, base batch 2 x G: half the base LR),
    not at that count, and the epoch logs the configured batch. `drop_last: false` leaves a
    short last batch, which trains at the same LR."""
    import ray
    import yaml

    from pipeline.tracking import start_run
    from pipeline.worker import train_func

    sets = [f"data.path={odd_parquet}", "data.feature_column=null",
            "data.sequence_column=tokens", "model.name=seq_transformer",
            "model.kwargs={d_model: 16, nhead: 2, num_layers: 1, dim_feedforward: 32}",
            "batching.strategy=length_bucket", "batching.options.max_tokens=400",
            "batching.max_length=64", "batching.drop_last=false", "train.epochs=1",
            "train.global_batch_size=16", "train.micro_batch_size=null",
            "train.base_batch_size=32", "train.base_lr=0.2",
            "train.lr_scaling=linear", "train.warmup_epochs=0", "train.schedule=constant",
            "data.val_fraction=0.1", "scaling.num_workers=1", "tracking.log_model=false"]
    cfg, info = resolve(load_config(None, sets))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "budget", run_name=None, params={}, config_yaml=yaml.safe_dump({}))
    session = _OneRank()
    train_func({"config": cfg.to_dict(), "table_refs": [ray.put(pq.read_table(odd_parquet))],
                "model_facts": info.facts, "run_id": run_id, "tracking_uri": uri}, session)
    client = MlflowClient(uri)
    sizes = history(client, run_id, "step/global_batch_size")
    assert len(set(sizes)) > 2  # the budget's steps hold different sample counts
    assert history(client, run_id, "step/lr") == [pytest.approx(0.1)] * len(sizes)
    (report,) = session.reports
    assert report["global_batch_size"] == 16 and report["lr"] == pytest.approx(0.1)
    assert report["samples"] == sum(sizes)


@pytest.mark.ray
def test_a_streamed_rank_meeting_rows_changed_since_the_checks_ends_as_bad_input(
        ray_client, odd_parquet, tmp_path):
    """The streaming mode fetches the large columns chunk by chunk, after the driver's checks:
    a token id changed since then (here: the checks saw the file before one token became
    999) is met when its chunk arrives, and ends the worker function as bad input -- a
    `fatal_error` report and the line in fatal.json, not an embedding's IndexError that Ray
    Train would retry."""
    import ray  # noqa: F401

    from pipeline.blocks import ingest
    from pipeline.worker import FATAL, train_func

    sets = [f"data.path={odd_parquet}", "data.feature_column=null",
            "data.sequence_column=tokens", "model.name=seq_transformer",
            "model.kwargs={d_model: 16, nhead: 2, num_layers: 1, dim_feedforward: 32}",
            "batching.max_length=64", "train.global_batch_size=32", "train.epochs=1",
            "data.mode=streaming", "scaling.num_workers=1", "tracking.log_model=false"]
    cfg, info = resolve(load_config(None, sets))  # the checks, on the file as it was
    table = pq.read_table(odd_parquet)
    tokens = table.column("tokens").to_pylist()
    tokens[700] = [999] * len(tokens[700])
    changed = write(tmp_path / "changed.parquet", table.set_column(
        table.schema.get_field_index("tokens"), "tokens",
        pa.array(tokens, type=table.schema.field("tokens").type)))
    import yaml

    from pipeline.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "changed", run_name=None, params={}, config_yaml=yaml.safe_dump({}))
    blocks = ingest(dataclasses.replace(info, uri=str(changed)), cfg)
    try:
        session = _OneRank()
        train_func({"config": cfg.to_dict(), "table_refs": blocks, "model_facts": info.facts,
                    "fatal_file": str(tmp_path / "fatal.json"), "run_id": run_id,
                    "tracking_uri": uri}, session)
    finally:
        blocks.release()
    assert session.reports == [{FATAL: 1.0}]
    fatal = json.loads((tmp_path / "fatal.json").read_text())
    assert fatal["kind"] == "input"
    assert "changed since the checks: token id 999, the model's vocabulary has" in fatal["message"]


@pytest.mark.ray
def test_a_streamed_warmup_fetches_each_row_once_an_epoch(ray_client, tmp_path):
    """In the streaming mode the rows of the coming steps are fetched ahead; a warmup's steps
    change size (k 1 -> 2 -> 3 -> 4 units) on a ramp known in advance, so the chunks are cut
    for the sizes the steps will have: an epoch receives its training rows and its validation
    rows once each. (Fetched for the size of the step they were asked from, each change
    fetched the rest of the epoch again: 3x the first epoch's rows here.)"""
    import yaml

    from pipeline.blocks import ingest
    from pipeline.data.batches import SampleTable, split_train_val
    from pipeline.data.epochs import epoch_batches
    from pipeline.tracking import start_run
    from pipeline.worker import train_func

    sets = ["data.name=digits", "model.name=mlp", "train.global_batch_size=64",
            "train.batch_size_schedule=warmup", "train.batch_size_min=16",
            "train.batch_size_warmup_steps=12", "train.epochs=2", "data.mode=streaming",
            "scaling.num_workers=1", "tracking.log_model=false"]
    cfg, info = resolve(load_config(None, sets))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "warmup", run_name=None, params={}, config_yaml=yaml.safe_dump({}))
    blocks = ingest(info, cfg)
    try:
        train_func({"config": cfg.to_dict(), "table_refs": blocks, "model_facts": info.facts,
                    "run_id": run_id, "tracking_uri": uri}, _OneRank())
    finally:
        blocks.release()
    client = MlflowClient(uri)
    assert sorted(set(history(client, run_id, "step/global_batch_size")[:13])) == [16, 32, 48, 64]
    from pipeline.data.datasets import make_digits

    st = SampleTable.from_table(make_digits(), feature_column="features", label_column="label")
    train, val = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    row = 64 * 4  # bytes of a row's features (float32), the only large column
    for epoch, mib in enumerate(history(client, run_id, "data_fetched_mib")):
        drawn = np.unique(np.concatenate(epoch_batches(cfg, st, train, epoch, 1).batches))
        assert mib * 2**20 == pytest.approx((len(drawn) + len(val)) * row, rel=0.01), epoch


@pytest.mark.ray
def test_an_autoscaler_that_cannot_be_asked_refuses_nothing(ray_client, monkeypatch, capsys):
    """Unknown is not "no autoscaler": a failing lookup (a private API) is said and the fit
    left unchecked, where it used to be read as none -- refusing a valid job on an autoscaling
    cluster whose head has no CPU (exit 2)."""
    from ray._private.state import state

    from pipeline import launch
    from pipeline.config import ConfigError, load_config

    def failing():
        raise TimeoutError("GCS lookup timed out")

    too_many = load_config(str(REPO / "jobs/configs/digits.yaml"),
                           ["scaling.num_workers=64", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError):  # (the cluster asked: its 4 CPUs, no autoscaler: refused)
        launch.check_workers_fit([too_many])
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", failing)
    launch.check_workers_fit([too_many])
    assert "the cluster's autoscaler could not be asked (TimeoutError: GCS lookup timed out)" \
        in capsys.readouterr().err
