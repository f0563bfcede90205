"""The driver's memory against the dataset's size: what the checks before the cluster
(`resolve`, run by every command before Ray starts) and the ingest (`blocks.ingest`: Ray Data
reads the Parquet file into the object store) cost the driver process, at two dataset sizes.

Each measurement is a fresh Python process (its peak RSS, VmHWM, only ever grows), for
the stages in turn: `import` (the pipeline and its libraries loaded), `check` (+ `resolve` on the
dataset), `ingest` (+ a local Ray and `blocks.ingest`; Ray's own processes are not the driver's),
and `find` (`resolve`, then `find-batch-size`'s search for the `seq_transformer` on the longest
sequences, `--max-memory 48MiB`: it runs in the driver's process and reads the rows it tries).
The datasets are `make_sequences`' token sequences (lognormal lengths, median ~40 tokens) at
`--rows` sizes, written once under `--data`.

    python bench/driver_memory.py [--rows 100000 1000000] [--data /tmp/driver_memory]

Prints a table and writes bench/results/driver_memory.json. The issue's target: from the small
to the large dataset the driver's peak RSS grows by less than 10% of the large one's in-memory
size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
STAGES = ("import", "check", "ingest", "find")


def dataset(rows: int, root: Path) -> Path:
    """The sequences dataset at `rows` rows (written once, in row groups of 65,536 rows)."""
    import pyarrow.parquet as pq

    from pipeline.data.datasets import make_sequences

    path = root / f"sequences-{rows}.parquet"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(make_sequences(rows), tmp, row_group_size=65_536)
        tmp.rename(path)
    return path


def child(path: str, stage: str) -> None:
    """One measurement, in this (fresh) process: print the peak RSS in bytes."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    if stage != "import":
        cfg = load_config(None, [f"data.path={path}", "data.sequence_column=tokens",
                                 "data.target_column=targets", "data.label_column=label",
                                 "train.loss=token_cross_entropy",
                                 "batching.strategy=length_bucket"])
        cfg, info = resolve(cfg)
        if stage == "find":
            import tempfile

            from pipeline.find_batch_size import find_batch_size

            with tempfile.TemporaryDirectory() as out:
                find_batch_size(cfg.with_overrides({"scaling.num_workers": 1}), info, Path(out),
                                48 * MiB)
        if stage == "ingest":
            import ray

            from pipeline.launch import ingest

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            refs = ingest(info).refs
            ray.wait(refs, num_returns=len(refs))
            ray.shutdown()
    print(peak_rss())


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which belongs to the process's own
    address space (ru_maxrss would carry over the parent's through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(path: Path, stage: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), stage],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    p.add_argument("--data", type=Path, default=Path("/tmp/driver_memory"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    import pyarrow.parquet as pq

    rows = []
    for n in args.rows:
        path = dataset(n, args.data)
        size = pq.read_table(path).nbytes
        rss = {stage: measure(path, stage) for stage in STAGES}
        rows.append({"rows": n, "data_bytes": size, **{f"rss_{s}": rss[s] for s in STAGES}})
        print(f"{n:>9,} rows ({size / MiB:,.0f} MiB in memory): peak RSS "
              + ", ".join(f"{s} {rss[s] / MiB:,.0f} MiB" for s in STAGES), flush=True)
    small, large = rows
    print("\n| stage | peak RSS, small | peak RSS, large | growth | growth / large data |")
    print("| --- | --- | --- | --- | --- |")
    growth = {}
    for s in STAGES:
        g = large[f"rss_{s}"] - small[f"rss_{s}"]
        growth[s] = g / large["data_bytes"]
        print(f"| {s} | {small[f'rss_{s}'] / MiB:,.0f} MiB | {large[f'rss_{s}'] / MiB:,.0f} MiB "
              f"| {g / MiB:+,.0f} MiB | {growth[s]:.1%} |")
    RESULTS.mkdir(exist_ok=True)
    save(RESULTS / "driver_memory.json", {"rows": rows, "growth_over_large_data": growth})
    print(f"\nwrote {RESULTS / 'driver_memory.json'}")


if __name__ == "__main__":
    main()
