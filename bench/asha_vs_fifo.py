"""ASHA vs FIFO on the same grid: sweep wall time and the best accuracy each reaches.

Both run `jobs/configs/sweep_digits.yaml`'s grid (global batch {32, 128, 512} x LR rule {none,
sqrt, linear}) with the same epoch budget, one after the other in this process on the same
local Ray cluster, alternating the order over `--repeats` rounds so machine noise hits both.
Besides wall time, the total trial-epochs trained is reported: the work ASHA saves, free of the
machine's noise. The local Ray is started before the first sweep (not timed), so both sweeps
run on a warm cluster. Two wall times per sweep:
- the sweep: `run_sweep` from call to return (ingest, the parent run, Tune's start, the trials,
  reading them back, the report);
- its trials: from the first trial's MLflow run start to the last metric any trial logged,
  i.e. without the sweep's own fixed cost, which is the same whatever the scheduler does:
  the time before (`before s`: ingest, the parent run, Tune's start, the first actors) and
  after (`after s`: the last trial's end, Tune's, reading the trials back, the report).
MLflow is a real `mlflow server` on 127.0.0.1 (as a sweep on a cluster records to), started
before the first sweep; `--tracking sqlite` has every process open the sqlite file itself.
And two measures of the work: trial-epochs, and the trials' compute (the sum of every trial
epoch's `epoch_time_s`): a batch-32 epoch costs about twice a batch-512 one here, so the
epochs ASHA stops are not the average epoch.

    python bench/asha_vs_fifo.py [--epochs 8] [--repeats 1] [--tracking server|sqlite]

Prints a table and writes bench/results/asha_vs_fifo.json (asha_vs_fifo_sqlite.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.datasets import resolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def sweep(scheduler: str, epochs: int, root: Path, uri: str) -> dict:
    from pipeline.tune import run_sweep

    cfg, info = resolve(load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml", [
        f"train.epochs={epochs}", f"tune.scheduler={scheduler}", "tracking.log_model=false",
        f"tracking.uri={uri}", f"tracking.experiment=bench-{scheduler}-{root.name}"]))
    start, started = time.perf_counter(), time.time()
    df = run_sweep(cfg, info, root / scheduler)
    wall, ended = time.perf_counter() - start, time.time()
    best = df.loc[df["val_accuracy"].idxmax()]
    trials = trials_wall(cfg, df)
    return {"scheduler": scheduler, "wall_s": wall,
            # the sweep's own fixed cost: before the first trial's run, after the last metric
            "before_s": trials.pop("first_start") - started, "after_s": ended - trials.pop("last"),
            **trials,
            "trials": len(df),
            "early_stopped": int((df["status"] == "EARLY_STOPPED").sum()),
            "trial_epochs": int(df["epochs"].sum()), "best_val_accuracy": float(best["val_accuracy"]),
            "best": {"batch": int(best["train.global_batch_size"]),
                     "rule": str(best["train.lr_scaling"])}}


def trials_wall(cfg, df) -> dict[str, float]:
    """`trials_s`: seconds from the first trial run's start to the last metric point any trial
    logged; `compute_s`: the sum of every trial epoch's epoch_time_s (read from MLflow)."""
    from pipeline.tracking import client

    c = client(cfg.tracking_uri())
    starts, ends, compute = [], [], 0.0
    for run_id in df["mlflow_run_id"]:
        run = c.get_run(run_id)
        epochs = c.get_metric_history(run_id, "epoch_time_s")
        starts.append(run.info.start_time)
        ends.append(max(m.timestamp for m in epochs))
        compute += sum(m.value for m in epochs)
    return {"trials_s": (max(ends) - min(starts)) / 1000, "compute_s": compute,
            "first_start": min(starts) / 1000, "last": max(ends) / 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tracking", choices=["server", "sqlite"], default="server",
                    help="an `mlflow server` on 127.0.0.1 (what a cluster's sweep records to), "
                         "or the sqlite file each process opens itself")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    from pipeline.launch import connect

    server = None
    if args.tracking == "server":  # started outside the timings, like the local Ray
        from tests.servers import free_port, start_mlflow_server

        port = free_port()
        server = start_mlflow_server(tmp, port)
        uri = f"http://127.0.0.1:{port}"
    else:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
    connect()  # the local Ray starts here, outside the timings
    rows = []
    try:
        for r in range(args.repeats):
            order = ("fifo", "asha") if r % 2 == 0 else ("asha", "fifo")
            for scheduler in order:
                row = sweep(scheduler, args.epochs, tmp / f"round{r}", uri)
                rows.append({"round": r, **row})
                print(f"[bench] round {r} {scheduler}: {row['wall_s']:.0f} s", flush=True)
    finally:
        if server is not None:
            from tests.servers import stop_mlflow_server

            stop_mlflow_server(server)
    by = {s: [row for row in rows if row["scheduler"] == s] for s in ("fifo", "asha")}
    wall_ratio = statistics.median(a["wall_s"] / f["wall_s"]
                                   for a, f in zip(by["asha"], by["fifo"], strict=True))
    epoch_ratio = statistics.median(a["trial_epochs"] / f["trial_epochs"]
                                    for a, f in zip(by["asha"], by["fifo"], strict=True))
    trials_ratio = statistics.median(a["trials_s"] / f["trials_s"]
                                     for a, f in zip(by["asha"], by["fifo"], strict=True))
    compute_ratio = statistics.median(a["compute_s"] / f["compute_s"]
                                      for a, f in zip(by["asha"], by["fifo"], strict=True))
    print(f"\n{'round':>5} {'scheduler':>9} {'wall s':>7} {'before s':>8} {'trials s':>8} "
          f"{'after s':>7} {'compute s':>9} {'trial-epochs':>12} {'stopped':>7} "
          f"{'best val acc':>12}  best trial")
    for row in rows:
        print(f"{row['round']:>5} {row['scheduler']:>9} {row['wall_s']:>7.1f} "
              f"{row['before_s']:>8.1f} {row['trials_s']:>8.1f} {row['after_s']:>7.1f} "
              f"{row['compute_s']:>9.1f} "
              f"{row['trial_epochs']:>12} {row['early_stopped']:>7} "
              f"{row['best_val_accuracy']:>12.4f}  batch {row['best']['batch']}, "
              f"{row['best']['rule']}")
    print(f"ASHA/FIFO: sweep wall time x{wall_ratio:.2f}, the trials' wall time "
          f"x{trials_ratio:.2f}, trial-epochs x{epoch_ratio:.2f}, the trials' compute "
          f"x{compute_ratio:.2f} ({args.epochs} epochs, 9 trials, MLflow {args.tracking})")
    for what, ratio in (("sweep", wall_ratio), ("trials", trials_ratio)):
        print(f"  {what} wall-time saving / trial-epoch saving = "
              f"{(1 - ratio) / (1 - epoch_ratio):.2f}, / compute saving = "
              f"{(1 - ratio) / (1 - compute_ratio):.2f}")
    name = "asha_vs_fifo" + ("" if args.tracking == "server" else "_sqlite")
    path = save(RESULTS / f"{name}.json", {
        "benchmark": "asha_vs_fifo", "config": "jobs/configs/sweep_digits.yaml",
        "epochs": args.epochs, "tracking": args.tracking, "wall_ratio": wall_ratio,
        "trials_wall_ratio": trials_ratio,
        "trial_epoch_ratio": epoch_ratio, "compute_ratio": compute_ratio,
        "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
