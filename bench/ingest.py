"""Ray Data ingest: Ray 2.60's default Parquet datasource (V2) vs the V1 reader.

`blocks.ingest` reads the dataset once per job (and once per sweep) into Arrow blocks in
the object store. Both readers run here on the same local Ray cluster, alternating over
`--rounds` rounds: read_parquet -> materialize -> to_arrow_refs, timed from the call to the
blocks being in the object store; both must give the same rows in the same order.

    python bench/ingest.py [--rounds 4]

Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.datasets import resolve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def read(uri: str, v2: bool) -> tuple[float, pa.Table]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = v2
    ctx.execution_options.preserve_order = True
    start = time.perf_counter()
    refs = ray.data.read_parquet(uri).materialize().to_arrow_refs()
    ray.wait(refs, num_returns=len(refs))
    wall = time.perf_counter() - start
    return wall, pa.concat_tables(ray.get(refs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never RAY_ADDRESS's
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for name in ("digits", "sequences"):
        _, info = resolve(load_config(None, [f"data.name={name}"]))
        for v2 in (True, False):  # untimed: the process's first reads pay Ray Data's start-up
            read(info.uri, v2)
        tables = {}
        for r in range(args.rounds):
            for v2 in ((True, False) if r % 2 == 0 else (False, True)):
                wall, tables[v2] = read(info.uri, v2)
                rows.append({"dataset": name, "round": r, "reader": "V2" if v2 else "V1",
                             "seconds": wall})
        # The same rows in the same order (worker plans index rows by position).
        assert tables[True].num_rows == info.num_rows and tables[True].equals(tables[False]), name
    print(f"{'dataset':>10} {'V2 (default) s':>15} {'V1 s':>8} {'V1/V2 time':>11}")
    summary = {}
    for name in ("digits", "sequences"):
        med = {k: statistics.median(r["seconds"] for r in rows
                                    if r["dataset"] == name and r["reader"] == k)
               for k in ("V1", "V2")}
        # the ratio within each round (the two readers side by side), then the median
        per_round = [next(r["seconds"] for r in rows if (r["dataset"], r["round"], r["reader"])
                          == (name, i, "V1"))
                     / next(r["seconds"] for r in rows if (r["dataset"], r["round"], r["reader"])
                            == (name, i, "V2")) for i in range(args.rounds)]
        ratio = statistics.median(per_round)
        summary[name] = {**med, "ratio": ratio, "ratio_per_round": per_round}
        print(f"{name:>10} {med['V2']:>15.2f} {med['V1']:>8.2f} {ratio:>11.3f}")
    path = save(RESULTS / "ingest.json", {
        "benchmark": "ingest", "ray": ray.__version__, "rounds": args.rounds,
        "summary": summary, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
