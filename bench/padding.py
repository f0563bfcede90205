"""Padded batches of `sequences`: padding efficiency and throughput of the batch path.

1. Padding efficiency (real tokens / padded tokens) over one epoch: `random` vs `length_bucket`
   (fixed batch 32, and a token budget), padded to the longest and to a multiple of 8.
2. Throughput of padded batches of 32 over the same Parquet data, side by side in one process,
   variants interleaved over `--repeats` passes, medians, as ratios to (a):
   a. torch DataLoader, per-sample Python __getitem__ and a per-sample Python collate;
   b. plain Ray Data `iter_torch_batches` with a vectorised numpy collate (`pad_ragged`);
   c. the pipeline's path: Ray Data ingest into Arrow blocks in the object store, then per batch
      `SampleTable.gather` (numpy gather from the Arrow buffers + padded collate) + torch;
   d. the in-process limit: the same gather from a table read with pyarrow, no Ray.

    python bench/padding.py [--repeats 3]      # writes bench/results/padding.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import strategies as _strategies  # noqa: E402,F401
from pipeline.data.batches import SampleTable  # noqa: E402
from pipeline.data.datasets import embedded_path  # noqa: E402
from pipeline.data.padding import pad_ragged  # noqa: E402
from pipeline.data.plan import SampleMeta, epoch_rng, plan_epoch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
B = 32


def efficiency(lengths: np.ndarray, batches: list[np.ndarray], multiple: int | None) -> float:
    real = padded = 0
    for b in batches:
        longest = int(lengths[b].max())
        if multiple:
            longest = -(-longest // multiple) * multiple
        real += int(lengths[b].sum())
        padded += longest * len(b)
    return real / padded


def padding_table(lengths: np.ndarray) -> list[dict]:
    meta = SampleMeta(ids=np.arange(len(lengths)), lengths=lengths)
    rows = []
    for name, strategy, opts in (("random", "random", {}),
                                 ("length_bucket", "length_bucket", {}),
                                 ("length_bucket max_tokens=4096", "length_bucket",
                                  {"max_tokens": 4096})):
        plan = plan_epoch(strategy, meta, seed=0, epoch=0, global_batch_size=B, **opts)
        rows.append({"batches": name, "n_batches": len(plan.batches),
                     "efficiency": efficiency(lengths, plan.batches, None),
                     "efficiency_x8": efficiency(lengths, plan.batches, 8)})
    return rows


class PySeqDataset(torch.utils.data.Dataset):
    def __init__(self, table: pa.Table):
        self.tokens = table.column("tokens").to_pylist()
        self.labels = table.column("label").to_pylist()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.tokens[i], self.labels[i]


def py_collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    longest = max(len(t) for t, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, (t, _) in enumerate(items):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = True
    return {"input_ids": ids, "attention_mask": mask,
            "label": torch.tensor([y for _, y in items])}


def ray_collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    seqs = batch["tokens"]  # object array of arrays
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids, mask = pad_ragged(np.concatenate(seqs), lengths)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "label": torch.from_numpy(batch["label"])}


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = embedded_path("sequences")
    table = pq.read_table(path)
    lengths = table.column("length").to_numpy()
    eff = padding_table(lengths)
    print(f"{'batches':<32} {'n':>5} {'efficiency':>10} {'to x8':>7}")
    for r in eff:
        print(f"{r['batches']:<32} {r['n_batches']:>5} {r['efficiency']:>10.3f} "
              f"{r['efficiency_x8']:>7.3f}")
    print("goal: length-bucketed >= 0.9 while random is far lower")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    refs = ray.data.read_parquet(str(path)).materialize().to_arrow_refs()
    pipe = SampleTable.from_table(pa.concat_tables(ray.get(refs)), feature_column=None,
                                  label_column="label", sequence_column="tokens")
    local = SampleTable.from_table(table, feature_column=None, label_column="label",
                                   sequence_column="tokens")
    order = epoch_rng(0, 0).permutation(len(lengths))
    batches = [order[i : i + B] for i in range(0, len(order) - B + 1, B)]
    loader = torch.utils.data.DataLoader(PySeqDataset(table), batch_size=B, shuffle=True,
                                         collate_fn=py_collate, drop_last=True)
    ds = ray.data.read_parquet(str(path), columns=["tokens", "label"]).materialize()

    def run_loader() -> int:
        return sum(len(b["label"]) for b in loader)

    def run_ray_data() -> int:
        return sum(len(b["label"]) for b in ds.iter_torch_batches(
            batch_size=B, collate_fn=ray_collate, drop_last=True))

    def gather_with(st: SampleTable):
        def run() -> int:
            n = 0
            for b in batches:
                out = {k: torch.from_numpy(v) for k, v in st.gather(b).items()}
                n += len(out["label"])
            return n
        return run

    variants = {"a. DataLoader + Python collate": run_loader,
                "b. Ray Data iter_torch_batches": run_ray_data,
                "c. pipeline (object store + gather)": gather_with(pipe),
                "d. Arrow gather, no Ray (limit)": gather_with(local)}
    for fn in variants.values():  # warm-up pass
        fn()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            secs, n = timed(fn)
            rates[k].append(n / secs)
    base = statistics.median(rates["a. DataLoader + Python collate"])
    rows = [{"variant": k, "sequences_per_s": statistics.median(v),
             "x_dataloader": statistics.median(v) / base, "all": v} for k, v in rates.items()]
    print(f"\n{'variant':<38} {'sequences/s':>12} {'x DataLoader':>13}")
    for r in rows:
        print(f"{r['variant']:<38} {r['sequences_per_s']:>12.0f} {r['x_dataloader']:>13.2f}")
    print("goal: pipeline >= 3x the DataLoader")
    ray.shutdown()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "padding.json").write_text(json.dumps(
        {"benchmark": "padding", "batch": B, "efficiency": eff, "throughput": rows,
         "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    print(f"wrote {RESULTS / 'padding.json'}")


if __name__ == "__main__":
    main()
