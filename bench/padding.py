"""Padded batches of `sequences`: padding efficiency, and the throughput of the batch paths.

1. Padding efficiency (real tokens / padded token slots, over whole epochs, from the pipeline's
   own `SampleTable.gather`) of `random` vs `length_bucket` batches (global batch 32, and a
   token budget `max_tokens`), padded to the batch's longest and to a multiple of 8; and the
   random batches packed (`batching.packing`) into rows of 512 tokens and into one row.
2. Throughput (sequences/s, real tokens/s) of padded batches of 32 -- input_ids, attention_mask,
   token_targets (-100 on padding), lengths, label, sample_id as torch tensors -- over the same
   Parquet file, variants interleaved over `--repeats` timed epochs after one warm-up epoch,
   medians, as ratios to (a) taken within each round:
   a. torch DataLoader (num_workers=0) over a map-style Dataset of Python lists (columns
      converted with `to_pylist` up front), per-sample `__getitem__`, per-sample Python collate;
   b. plain Ray Data: `read_parquet(path).iter_torch_batches(batch_size=32, collate_fn=...)` with
      a vectorised numpy collate (`pad_ragged`), the Dataset re-executed (Parquet re-read) every
      epoch, as a training loop over a lazy Dataset does; b1: the same with Ray Data's V1
      Parquet datasource (`DataContext.use_datasource_v2 = False`): Ray 2.60's default V2
      starts FooterReader actors (new processes) for every read;
   b2. the same iteration over `read_parquet(path).materialize()` (read once, like c);
   c. the pipeline's steps, written out here: ingest as `pipeline.blocks.ingest` did before
      its `one_block` join (read_parquet with the V1 datasource -> materialize -> Arrow
      blocks in the object store; the embedded file is one block, so the join changes nothing),
      `SampleTable.from_table(pa.concat_tables(ray.get(refs)))` once, then per epoch a
      `random` plan and per batch `gather(positions)` + `to_torch` -- what a worker does per
      micro-batch;
   d. the in-process limit: the same gather from `pq.read_table(path)`, no Ray.
   One-time costs (to_pylist, ingest, read_table) are reported apart, not in the epoch times.
   Every variant is checked to produce identical tensors for the same rows (file order 0..31).

Data: the embedded `sequences` file (4,000 rows); `--scale K` also times a K-times larger file
written by the same generator (`make_sequences(4000 * K)`) into a temporary folder.

    python bench/padding.py             # 25 s to 3 min on 2 cores; writes bench/results/padding.json
    python bench/padding.py --quick     # 3 repeats, 2 epochs of padding efficiency
    python bench/padding.py --scale 10  # + a 40,000-row file (about a minute more)
    python bench/padding.py --efficiency-only  # section 1 alone, no Ray (seconds)

Ray is started locally (`address="local"`, 2 CPUs, no dashboard); its start-up is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import strategies  # noqa: E402,F401  (registers length_bucket)
from pipeline.data.batches import SampleTable  # noqa: E402
from pipeline.data.datasets import embedded_path, make_sequences  # noqa: E402
from pipeline.data.epochs import planned_lengths  # noqa: E402
from pipeline.data.padding import IGNORE_INDEX, pad_ragged, padding_efficiency  # noqa: E402
from pipeline.data.plan import plan_epoch  # noqa: E402
from pipeline.engine.step import to_torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
B = 32
MAX_TOKENS = 2048  # ~ 32 x the mean length (55): about as many real tokens as a batch of 32
CPU = torch.device("cpu")
BASE = "a"
NAMES = {
    "a": "a. DataLoader, Python collate",
    "b": "b. Ray Data, re-read per epoch",
    "b1": "b1. same, V1 Parquet datasource",
    "b2": "b2. Ray Data, materialized once",
    "c": "c. pipeline: object store + gather",
    "d": "d. Arrow gather, no Ray (limit)",
}


def sample_table(table: pa.Table) -> SampleTable:
    return SampleTable.from_table(table, feature_column=None, label_column="label",
                                  sequence_column="tokens", target_column="targets")


# --------------------------------------------------------------------------- 1. padding


def padding_rows(st: SampleTable, epochs: int) -> list[dict]:
    """Token-weighted efficiency of whole epochs, from the pipeline's gather (epochs 0..n-1)."""
    meta = st.meta(np.arange(len(st)))
    rows = []
    for label, strategy, opts in (("random, batch 32", "random", {}),
                                  ("length_bucket, batch 32", "length_bucket", {}),
                                  (f"length_bucket, max_tokens={MAX_TOKENS}", "length_bucket",
                                   {"max_tokens": MAX_TOKENS})):
        row: dict = {"batches": label, "strategy": strategy, "options": opts}
        for multiple in (None, 8):
            effs, sizes, counts = [], [], []
            # planned on the lengths as padded, as training plans them
            padded = load_config(None, [f"batching.pad_multiple_of={multiple}"] if multiple else [])
            planned = dataclasses.replace(meta, lengths=planned_lengths(padded, meta.lengths))
            for epoch in range(epochs):
                plan = plan_epoch(strategy, planned, seed=0, epoch=epoch, global_batch_size=B,
                                  **opts)
                real = slots = 0
                for batch in plan.batches:
                    out = st.gather(batch, pad_multiple_of=multiple)
                    width = out["input_ids"].shape[1]
                    assert abs(padding_efficiency(out["lengths"], width)
                               - out["attention_mask"].mean()) < 1e-12
                    real += int(out["lengths"].sum())
                    slots += out["input_ids"].size
                effs.append(real / slots)
                sizes.append(plan.num_samples / len(plan.batches))
                counts.append(len(plan.batches))
            key = "to_x8" if multiple else "longest"  # each planned on its own padded lengths
            row[key] = {"mean": statistics.fmean(effs), "min": min(effs), "per_epoch": effs,
                        "n_batches": counts, "mean_batch_size": statistics.fmean(sizes)}
        rows.append(row)
    return rows


def packing_rows(st: SampleTable, epochs: int) -> list[dict]:
    """The same random batches of 32 (epochs 0..n-1), padded to their longest and packed
    (`batching.packing`): into rows of at most 512 tokens (the longest sequence's length), and
    into one row per batch (`pack_tokens: null`); real tokens / token slots, from the
    pipeline's own `SampleTable.gather`."""
    meta = st.meta(np.arange(len(st)))
    rows = []
    for label, kwargs in (("padded to the longest", {}),
                          ("packed, rows of 512 tokens", {"packing": True, "pack_tokens": 512}),
                          ("packed, one row per batch", {"packing": True, "pack_tokens": None})):
        effs = []
        for epoch in range(epochs):
            plan = plan_epoch("random", meta, seed=0, epoch=epoch, global_batch_size=B)
            real = slots = 0
            for batch in plan.batches:
                out = st.gather(batch, **kwargs)
                real += int(out["attention_mask"].sum())
                slots += out["input_ids"].size
            effs.append(real / slots)
        rows.append({"batches": f"random, batch {B}, {label}", "options": kwargs,
                     "mean": statistics.fmean(effs), "min": min(effs), "per_epoch": effs})
    return rows


# --------------------------------------------------------------------------- 2. variants


class PyListDataset(torch.utils.data.Dataset):
    """What a user writes: Python lists converted up front, one sample per __getitem__."""

    def __init__(self, table: pa.Table):
        self.tokens = table.column("tokens").to_pylist()
        self.targets = table.column("targets").to_pylist()
        self.labels = table.column("label").to_pylist()
        self.ids = table.column("sample_id").to_pylist()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[i], "targets": self.targets[i], "label": self.labels[i],
                "sample_id": self.ids[i]}


def python_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sample loop: padded ids / targets and the mask, row by row."""
    lengths = [len(s["tokens"]) for s in samples]
    width = max(lengths)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = lengths[i]
        ids[i, :n] = torch.tensor(s["tokens"], dtype=torch.long)
        targets[i, :n] = torch.tensor(s["targets"], dtype=torch.long)
        mask[i, :n] = True
    return {"input_ids": ids, "attention_mask": mask, "token_targets": targets,
            "lengths": torch.tensor(lengths, dtype=torch.long),
            "label": torch.tensor([s["label"] for s in samples]),
            "sample_id": torch.tensor([s["sample_id"] for s in samples])}


def numpy_collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Ray Data hands a dict of numpy arrays; a list column is an object array of int64 arrays.
    Lengths and one concatenation per column, then the vectorised `pad_ragged`."""
    tokens = batch["tokens"]
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    ids, mask = pad_ragged(np.concatenate(tokens), lengths)
    targets, _ = pad_ragged(np.concatenate(batch["targets"]), lengths, pad_value=IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "token_targets": torch.from_numpy(targets), "lengths": torch.from_numpy(lengths),
            "label": torch.from_numpy(batch["label"]),
            "sample_id": torch.from_numpy(batch["sample_id"])}


def make_ray_collate():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PadCollate(NumpyBatchCollateFn):  # a plain function is deprecated since Ray 2.47
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return numpy_collate(batch)

    return PadCollate()


def gather_epoch(st: SampleTable, epoch: int):
    """One epoch as a worker runs it: plan, then gather + to_torch per batch."""
    plan = plan_epoch("random", st.meta(np.arange(len(st))), seed=0, epoch=epoch,
                      global_batch_size=B)
    for positions in plan.batches:
        yield to_torch(st.gather(positions), CPU)


def count(batches) -> tuple[int, int]:
    n = tokens = 0
    for batch in batches:
        n += len(batch["label"])
        tokens += int(batch["lengths"].sum())
    return n, tokens


def check_same(outs: dict[str, dict[str, torch.Tensor]]) -> None:
    ref_name, ref = next(iter(outs.items()))
    for name, out in outs.items():
        if sorted(out) != sorted(ref):
            raise AssertionError(f"{name}: keys {sorted(out)} != {ref_name}: {sorted(ref)}")
        for k in ref:
            if out[k].dtype != ref[k].dtype or not torch.equal(out[k], ref[k]):
                raise AssertionError(f"{name}: {k} differs from {ref_name}")


def throughput(path: Path, repeats: int) -> dict:
    """All variants over one Parquet file; Ray must be initialised."""
    import ray
    import ray.data

    one_time: dict[str, float] = {}
    t0 = time.perf_counter()
    table = pq.read_table(path)
    local = sample_table(table)
    one_time["d: read_table + from_table"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset = PyListDataset(table)
    one_time["a: to_pylist"] = time.perf_counter() - t0

    # c: the three lines of pipeline.blocks.ingest (preserve_order, read_parquet, materialize,
    # to_arrow_refs), then what pipeline.blocks.load_rows does. b2 iterates the same
    # materialized Dataset.
    ctx = ray.data.DataContext.get_current()
    order, v2 = ctx.execution_options.preserve_order, ctx.use_datasource_v2
    ctx.execution_options.preserve_order = True
    ctx.use_datasource_v2 = False  # as pipeline.blocks.ingest reads (V1: bench/ingest.py)
    t0 = time.perf_counter()
    materialized = ray.data.read_parquet(str(path)).materialize()
    refs = materialized.to_arrow_refs()
    t1 = time.perf_counter()
    ctx.execution_options.preserve_order, ctx.use_datasource_v2 = order, v2
    pipe = sample_table(pa.concat_tables(ray.get(refs)))
    one_time["c: ingest (read_parquet, materialize, to_arrow_refs)"] = t1 - t0
    one_time["c: ray.get + concat_tables + from_table"] = time.perf_counter() - t1
    lazy = ray.data.read_parquet(str(path))
    ctx.use_datasource_v2 = False  # the Dataset keeps a copy of the context it was made in
    lazy_v1 = ray.data.read_parquet(str(path))
    t0 = time.perf_counter()
    lazy_v1.materialize()
    one_time["V1 datasource: read_parquet + materialize"] = time.perf_counter() - t0
    ctx.use_datasource_v2 = v2
    collate = make_ray_collate()

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=B, shuffle=True, num_workers=0, collate_fn=python_collate,
        drop_last=True, generator=torch.Generator().manual_seed(0))
    epochs = {"c": 0, "d": 0}

    def ray_iter(ds):
        return ds.iter_torch_batches(batch_size=B, collate_fn=collate, drop_last=True)

    def pipeline_pass(key: str, st: SampleTable) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            epochs[key] += 1
            return count(gather_epoch(st, epochs[key]))
        return run

    variants: dict[str, Callable[[], tuple[int, int]]] = {
        "a": lambda: count(loader),
        "b": lambda: count(ray_iter(lazy)),
        "b1": lambda: count(ray_iter(lazy_v1)),
        "b2": lambda: count(ray_iter(materialized)),
        "c": pipeline_pass("c", pipe),
        "d": pipeline_pass("d", local),
    }

    # Same rows (file order 0..31) through every collate and reader: identical tensors.
    rows = np.arange(B)
    ctx.execution_options.preserve_order = True  # the file's first rows first (b, b1 read
    first_b = ray.data.read_parquet(str(path)).take_batch(B, batch_format="numpy")  # anew)
    ctx.use_datasource_v2 = False
    first_b1 = ray.data.read_parquet(str(path)).take_batch(B, batch_format="numpy")
    ctx.use_datasource_v2 = v2
    check_same({
        "a": python_collate([dataset[int(i)] for i in rows]),
        "b": collate(first_b),
        "b1": collate(first_b1),
        "b2": collate(materialized.take_batch(B, batch_format="numpy")),
        "c": to_torch(pipe.gather(rows), CPU),
        "d": to_torch(local.gather(rows), CPU),
    })
    ctx.execution_options.preserve_order = order

    for fn in variants.values():  # warm-up epoch (Ray workers, imports, caches)
        fn()
    samples: dict[str, list[tuple[float, int, int]]] = {k: [] for k in variants}
    for r in range(repeats):
        keys = list(variants)
        keys = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate who goes first
        for k in keys:
            start = time.perf_counter()
            n, tokens = variants[k]()
            samples[k].append((time.perf_counter() - start, n, tokens))
    rows_out = []
    for k, runs in samples.items():
        seq = [n / s for s, n, _ in runs]
        tok = [t / s for s, _, t in runs]
        ratio = [x / b for x, b in zip(seq, [n / s for s, n, _ in samples[BASE]], strict=True)]
        rows_out.append({
            "key": k, "variant": NAMES[k], "seq_per_s": statistics.median(seq),
            "tokens_per_s": statistics.median(tok), "x_dataloader": statistics.median(ratio),
            "x_range": [min(ratio), max(ratio)], "epoch_s": [s for s, _, _ in runs],
            "sequences_per_epoch": runs[0][1], "tokens_per_epoch": runs[0][2],
        })
    return {"path": str(path), "rows": table.num_rows, "one_time_s": one_time,
            "variants": rows_out}


# --------------------------------------------------------------------------- main


def print_padding(rows: list[dict], epochs: int) -> None:
    print(f"\nPadding efficiency (real tokens / padded slots), `sequences`, mean (min) over "
          f"{epochs} epoch(s)")
    print(f"{'batches':<36} {'to longest':>16} {'batches/ep':>10} {'size':>5} {'to x8':>16} "
          f"{'batches/ep':>10} {'size':>5}")
    for r in rows:
        cells = []
        for k in ("longest", "to_x8"):  # each planned on its own padded lengths
            n = r[k]["n_batches"]
            cells += [f"{r[k]['mean']:.3f} ({r[k]['min']:.3f})",
                      f"{min(n)}-{max(n)}" if min(n) != max(n) else str(n[0]),
                      f"{r[k]['mean_batch_size']:.1f}"]
        print(f"{r['batches']:<36} {cells[0]:>16} {cells[1]:>10} {cells[2]:>5} {cells[3]:>16} "
              f"{cells[4]:>10} {cells[5]:>5}")
    print("goal: length-bucketed >= 0.9 while random is far lower")


def print_packing(rows: list[dict], epochs: int) -> None:
    print(f"\nPacking (real tokens / token slots), `sequences`, random order, mean (min) over "
          f"{epochs} epoch(s)")
    for r in rows:
        print(f"{r['batches']:<48} {r['mean']:.3f} ({r['min']:.3f})")
    print("goal (issue #12): packed >= 0.99 with random batch order")


def print_throughput(res: dict, label: str) -> None:
    print(f"\nThroughput, padded batches of {B}, {label} ({res['rows']} rows), median of "
          f"{len(res['variants'][0]['epoch_s'])} epochs")
    print(f"{'variant':<36} {'seq/s':>9} {'real tok/s':>11} {'x DataLoader':>12} "
          f"{'(range)':>13}")
    for r in res["variants"]:
        lo, hi = r["x_range"]
        print(f"{r['variant']:<36} {r['seq_per_s']:>9,.0f} {r['tokens_per_s']:>11,.0f} "
              f"{r['x_dataloader']:>12.2f} {f'({lo:.2f}-{hi:.2f})':>13}")
    print("one-time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["one_time_s"].items()))
    print("goal: pipeline (c) >= 3x the DataLoader")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 repeats, 2 epochs of padding efficiency")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs (default 5, quick 3; at least 3)")
    ap.add_argument("--scale", type=int, default=0,
                    help="also time a file this many times larger than `sequences` (0: skip)")
    ap.add_argument("--efficiency-only", action="store_true",
                    help="padding and packing efficiency only (no Ray, no throughput); writes "
                         "bench/results/padding_efficiency.json")
    args = ap.parse_args()
    repeats = max(3, args.repeats or (3 if args.quick else 5))
    eff_epochs = 2 if args.quick else 5
    scale = args.scale
    started = time.perf_counter()
    load = [os.getloadavg()[0]]

    path = embedded_path("sequences")
    eff = padding_rows(sample_table(pq.read_table(path)), eff_epochs)
    print_padding(eff, eff_epochs)
    packing = packing_rows(sample_table(pq.read_table(path)), eff_epochs)
    print_packing(packing, eff_epochs)
    if args.efficiency_only:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "padding_efficiency.json"
        save(out, {"benchmark": "padding_efficiency", "when": time.strftime("%Y-%m-%d %H:%M"),
                   "batch": B, "max_tokens": MAX_TOKENS, "efficiency_epochs": eff_epochs,
                   "efficiency": eff, "packing": packing,
                   "versions": {"python": platform.python_version(), "pyarrow": pa.__version__,
                                "numpy": np.__version__}})
        print(f"wrote {out}")
        return

    os.environ.pop("RAY_ADDRESS", None)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # Ray's
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
            sizes = [("embedded `sequences`", path)]
            if scale > 1:
                big = Path(tmp) / f"sequences-x{scale}.parquet"
                pq.write_table(make_sequences(n=4000 * scale, seed=0), big)
                sizes.append((f"`make_sequences` x{scale}", big))
            for label, p in sizes:
                results[label] = throughput(p, repeats)
                print_throughput(results[label], label)
    finally:
        ray.shutdown()
    load.append(os.getloadavg()[0])
    total = time.perf_counter() - started
    print(f"\nwall {total:.0f} s; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end "
          f"({os.cpu_count()} CPUs)")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "padding.json"
    save(out, {
        "benchmark": "padding", "when": time.strftime("%Y-%m-%d %H:%M"), "batch": B,
        "max_tokens": MAX_TOKENS, "repeats": repeats, "quick": args.quick,
        "efficiency_epochs": eff_epochs, "efficiency": eff, "packing": packing,
        "throughput": results,
        "wall_s": total, "load_average_1min": load, "cpus": os.cpu_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray.__version__, "pyarrow": pa.__version__,
                     "numpy": np.__version__},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
