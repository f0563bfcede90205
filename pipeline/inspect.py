"""`inspect-batches`: run a job's exact batch pipeline without training.

Same Ray Data ingest, same per-rank batch feed as training (`pipeline/data/feed.py`: plan,
steps, rank slice, micro-batches, the slots the collate pads or packs to) for
`scaling.num_workers` ranks and `train.epochs` epochs, one Ray task per rank. Writes one row
per sample drawn to `batches.parquet` (epoch, rank, batch, micro, sample id, label, length,
difficulty, weight, padded length), prints a summary and writes a PNG.
Hard-example mining has no losses without training: its weights are uniform here, and its epochs
after the first (planned in training from the losses it measured) are uniform draws here. An
`adaptive` batch-size schedule's steps (grouped in training by the noise scale it measures) are
shown as their unit batches, and an `auto` micro-batch at its starting size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import Config
from pipeline.console import counted
from pipeline.data.batches import SampleTable, split_train_val
from pipeline.data.datasets import DatasetInfo, small_columns
from pipeline.data.epochs import pool_meta, truncated_lengths
from pipeline.data.feed import RankFeed
from pipeline.engine.batch_schedule import BatchSchedule
from pipeline.files import replacing, save_figure, write_json
from pipeline.redact import redact_text


@ray.remote(num_cpus=1)
def rank_rows(cfg_dict: dict[str, Any], refs: Any, rank: int) -> pa.Table:
    """Rank `rank`'s rows (`refs`: `pipeline.blocks.Blocks`; the streaming mode's small
    columns suffice: nothing is gathered)."""
    from pipeline.blocks import load_rows

    cfg = Config.model_validate(cfg_dict)
    return feed_rows(cfg, load_rows(cfg, refs, 0, 1)[0], rank)


def feed_rows(cfg: Config, st: SampleTable, rank: int) -> pa.Table:
    """One row per sample rank `rank` draws over the run, read off its batch feed (no Ray)."""
    train_pos, _ = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    world = cfg.scaling.num_workers
    feed = RankFeed(cfg, st, train_pos, rank, world)
    micro = cfg.train.micro_batch_size
    micro = micro if isinstance(micro, int) else cfg.per_worker_batch()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "epoch", "rank", "batch", "micro", "position", "sample_id", "label", "length",
        "difficulty", "weight", "padded_length", "micro_slots", "pool_size")}
    t = cfg.train
    # A warmup schedule's steps are known in advance: group the unit batches as training does.
    # An adaptive one's depend on the noise scale measured in training: its unit batches show.
    sched = BatchSchedule(kind="warmup" if t.batch_size_schedule == "warmup" else "constant",
                          unit=cfg.plan_batch_size(), max_units=t.global_batch_size
                          // cfg.plan_batch_size(), ramp_steps=t.batch_size_warmup_steps or 0)
    if t.batch_size_schedule == "adaptive":
        sched.max_units = 1
    step = 0
    weights = np.full(len(st), 1.0 / max(len(train_pos), 1))
    # the difficulty a curriculum orders by: the column, or its scoring pass (e.g. lengths)
    difficulty = np.full(len(st), np.nan)
    scored = pool_meta(cfg, st, train_pos, None).difficulty
    if scored is not None:
        difficulty[train_pos] = scored

    def next_units() -> int:
        nonlocal step
        step += 1
        return sched.next_units(step - 1, math.nan)

    # train.max_steps ends training after that many optimizer steps, as it ends the batches
    # here (an adaptive schedule's steps are not known in advance: its unit batches show all)
    max_steps = t.max_steps if t.batch_size_schedule != "adaptive" else None
    for epoch in range(cfg.train.epochs):
        if max_steps is not None and step >= max_steps:
            break
        eb, steps = feed.epoch(epoch, next_units)
        for i, feed_step in enumerate(steps):
            if max_steps is not None and step > max_steps:  # `step` counts the one pulled
                break
            for j, part in enumerate(feed_step.micro(micro)):
                n = len(part)
                lengths = (truncated_lengths(cfg, st.lengths[part]) if st.lengths is not None
                           else np.zeros(n, np.int64))  # the tokens the batch holds
                rows, width = feed.shape(part)  # padded: a row per sample; packed: fewer
                for key, val in (("epoch", epoch), ("rank", rank), ("batch", i), ("micro", j),
                                 ("padded_length", width), ("micro_slots", rows * width),
                                 ("pool_size", eb.plan.pool_size)):
                    cols[key].append(np.full(n, val, dtype=np.int64))
                cols["position"].append(part)
                cols["sample_id"].append(st.ids[part])
                cols["label"].append(st.labels[part] if st.labels is not None
                                     else np.full(n, -1, np.int64))
                cols["length"].append(lengths)
                cols["difficulty"].append(difficulty[part])
                cols["weight"].append(weights[part])
    return pa.table({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})


def training_split_shares(cfg: Config, labels: np.ndarray | None, num_rows: int
                          ) -> tuple[int, pd.Series | None]:
    """The training split's size and its classes' shares (by label), which stratified batches
    keep -- not the whole dataset's, whose validation rows are never drawn."""
    train_pos = split_train_val(num_rows, labels, cfg.data.val_fraction, cfg.data.split_seed)[0]
    if labels is None:
        return len(train_pos), None
    return len(train_pos), pd.Series(labels[train_pos]).value_counts(normalize=True).sort_index()


def by_unit_batch(e: pd.DataFrame, unit: int, world: int) -> pd.DataFrame:
    """The rows of steps of k unit batches (a `warmup` schedule's) as unit batches: `batch`
    numbers each unit batch, `rank` the rank whose slice of that unit batch (`rank_slice`) a
    row falls in, where a batch-size schedule keeps its stratification (README). A step's
    global batch is its ranks' slices in rank order, each in micro-batch order.

    >>> e = pd.DataFrame({"batch": [0] * 4, "rank": [0, 0, 1, 1], "micro": [0] * 4,
    ...                   "label": [1, 2, 3, 4]})
    >>> by_unit_batch(e, 2, 2)[["batch", "rank", "label"]].values.tolist()
    [[0, 0, 1], [0, 1, 2], [1, 0, 3], [1, 1, 4]]
    """
    e = e.assign(_row=np.arange(len(e))).sort_values(["batch", "rank", "micro", "_row"])
    at = e.groupby("batch").cumcount().to_numpy()  # the row's place in its step's global batch
    bounds = np.cumsum([len(s) for s in np.array_split(np.arange(unit), world)])
    units = e["batch"].to_numpy() * 10**6 + at // unit  # (step, unit) as one number, ordered
    return e.assign(batch=pd.factorize(units, sort=True)[0],
                    rank=np.searchsorted(bounds, at % unit, side="right")).drop(columns="_row")


def summarize(df: pd.DataFrame, num_train: int, global_batch: int,
              class_share: pd.Series | None, unit: int | None = None,
              world: int | None = None) -> dict[str, Any]:
    """Coverage, duplicates, class-proportion deviation, padding efficiency, pool per epoch.

    With class shares: ``max_class_deviation`` (full global batches) and
    ``worst_rank_class_deviation``, the largest |count - share x slice size| over every rank's
    slice of a full global batch and every class, per epoch and over the run (top level).
    `unit` (steps of several unit batches, a `warmup` schedule's): both over the unit batches
    of every step (`by_unit_batch`), as the schedule keeps them, on `world` ranks (default:
    those in `df`)."""
    per_epoch = []
    worst_rank = 0.0
    world = world or (int(df["rank"].max()) + 1 if len(df) else 1)
    for epoch, e in df.groupby("epoch"):
        counts = e["sample_id"].value_counts()
        row = {"epoch": int(epoch), "drawn": int(len(e)), "unique": int(len(counts)),
               "coverage": len(counts) / num_train, "duplicates": int((counts - 1).sum()),
               "pool_size": int(e["pool_size"].iloc[0])}
        if class_share is not None:
            batches, size = e, global_batch
            if unit is not None and unit != global_batch:
                batches, size = by_unit_batch(e, unit, world), unit
            full = batches.groupby("batch").filter(lambda g, size=size: len(g) == size)
            if len(full):
                c = full.groupby(["batch", "label"]).size().unstack(fill_value=0)
                c = c.reindex(columns=class_share.index, fill_value=0)
                row["max_class_deviation"] = float((c - class_share * size).abs().max().max())
                r = full.groupby(["batch", "rank", "label"]).size().unstack(fill_value=0)
                r = r.reindex(columns=class_share.index, fill_value=0)
                dev = (r - np.outer(r.sum(axis=1), class_share.to_numpy())).abs().to_numpy().max()
                row["worst_rank_class_deviation"] = float(dev)
                worst_rank = max(worst_rank, float(dev))
        if (e["length"] > 0).any():
            micro = e.groupby(["rank", "batch", "micro"]).agg(real=("length", "sum"),
                                                              slots=("micro_slots", "first"))
            row["padding_efficiency"] = float(micro["real"].sum() / micro["slots"].sum())
        per_epoch.append(row)
    out = {"epochs": per_epoch, "ranks": sorted(int(r) for r in df["rank"].unique())}
    if any("worst_rank_class_deviation" in e for e in per_epoch):
        out["worst_rank_class_deviation"] = worst_rank
    return out


def plot(df: pd.DataFrame, summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend is left alone

    ep = pd.DataFrame(summary["epochs"])
    fig = Figure(figsize=(14, 3.6))
    ax = fig.subplots(1, 3)
    first = df[df["epoch"] == df["epoch"].min()]
    if (first["label"] >= 0).any():
        c = first.groupby(["batch", "label"]).size().unstack(fill_value=0)
        (c.div(c.sum(axis=1), axis=0)).plot.area(ax=ax[0], legend=False, linewidth=0)
        ax[0].set_title("class share per global batch (epoch 1)")
        ax[0].set_ylabel("share")
    ax[1].plot(ep["epoch"] + 1, ep["pool_size"], marker="o", label="pool size")
    ax[1].plot(ep["epoch"] + 1, ep["unique"], marker="x", label="unique samples drawn")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    ax[1].set_title("pool and coverage")
    if "padding_efficiency" in ep:
        ax[2].bar(ep["epoch"] + 1, ep["padding_efficiency"])
        ax[2].set_ylim(0, 1)
        ax[2].set_title("padding efficiency (real / padded tokens)")
    else:
        df.groupby("rank").size().plot.bar(ax=ax[2])
        ax[2].set_title("samples drawn per rank")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def inspect_batches(cfg: Config, info: DatasetInfo, out_dir: Path,
                    address: str | None = None) -> dict[str, Any]:
    from pipeline.blocks import config_errors_as_raised
    from pipeline.launch import connect, ingest

    connect(address)  # (bad input found here: a refused command leaves no --out folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = ingest(info, cfg)
    try:
        with config_errors_as_raised():  # bad data met in a task
            tables = ray.get([rank_rows.remote(cfg.to_dict(), refs, r)
                              for r in range(cfg.scaling.num_workers)])
    finally:
        refs.release()  # the streaming mode's servers: the rows are drawn
    table = pa.concat_tables(tables)
    with replacing(out_dir / "batches.parquet") as tmp:
        pq.write_table(table, tmp)
    df = table.to_pandas()
    labels = small_columns(cfg, info)[0].labels
    num_train, share = training_split_shares(cfg, labels, info.num_rows)
    full = (cfg.plan_batch_size() if cfg.train.batch_size_schedule == "adaptive"
            else cfg.train.global_batch_size)  # the size of a full batch in the rows above
    summary = summarize(df, num_train, full, share,
                        unit=cfg.plan_batch_size() if cfg.train.batch_size_schedule == "warmup"
                        else None, world=cfg.scaling.num_workers)
    summary.update(strategy=cfg.batching.strategy, workers=cfg.scaling.num_workers,
                   rows=len(df), dataset=redact_text(info.uri))  # (a URI's credentials)
    if share is not None:
        summary["class_share"] = {str(k): float(v) for k, v in share.items()}
    if cfg.batching.strategy == "hard_mining" and cfg.train.epochs > 1:
        summary["note"] = ("hard_mining: epochs after the first are planned in training from the "
                           "losses it measures; shown here as uniform draws")
    write_json(out_dir / "summary.json", summary)
    plot(df, summary, out_dir / "batches.png")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """What `python -m pipeline inspect-batches` prints: one line of setup, then one row per
    epoch (every per-epoch figure the summary holds; the known ones first)."""
    print(f"[pipeline] strategy {summary['strategy']} on {counted(summary['workers'], 'worker')}: "
          f"{summary['rows']} samples drawn from {summary['dataset']}", flush=True)
    if summary.get("note"):
        print(f"[pipeline] {summary['note']}", flush=True)
    first = ["epoch", "drawn", "unique", "coverage", "duplicates", "pool_size",
             "max_class_deviation", "padding_efficiency"]
    ep = pd.DataFrame(summary["epochs"])
    ep["epoch"] += 1
    cols = [c for c in first if c in ep] + [c for c in ep if c not in first]
    print(ep[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)
