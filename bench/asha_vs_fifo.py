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
  i.e. without the sweep's own fixed cost, which is the same whatever the scheduler does.
And two measures of the work: trial-epochs, and the trials' compute (the sum of every trial
epoch's `epoch_time_s`): a batch-32 epoch costs about twice a batch-512 one here, so the
epochs ASHA stops are not the average epoch.

    python bench/asha_vs_fifo.py [--epochs 8] [--repeats 1]

Prints a table and writes bench/results/asha_vs_fifo.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.datasets import resolve  # noqa: E402
from pipeline.files import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def sweep(scheduler: str, epochs: int, root: Path) -> dict:
    from pipeline.tune import run_sweep

    cfg, info = resolve(load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml", [
        f"train.epochs={epochs}", f"tune.scheduler={scheduler}", "tracking.log_model=false",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.experiment=bench-{scheduler}"]))
    start = time.perf_counter()
    df = run_sweep(cfg, info, root / scheduler)
    wall = time.perf_counter() - start
    best = df.loc[df["val_accuracy"].idxmax()]
    return {"scheduler": scheduler, "wall_s": wall, **trials_wall(cfg, df),
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
    return {"trials_s": (max(ends) - min(starts)) / 1000, "compute_s": compute}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    from pipeline.launch import connect

    connect()  # the local Ray starts here, outside the timings
    rows = []
    for r in range(args.repeats):
        order = ("fifo", "asha") if r % 2 == 0 else ("asha", "fifo")
        for scheduler in order:
            row = sweep(scheduler, args.epochs, tmp / f"round{r}")
            rows.append({"round": r, **row})
            print(f"[bench] round {r} {scheduler}: {row['wall_s']:.0f} s", flush=True)
    by = {s: [row for row in rows if row["scheduler"] == s] for s in ("fifo", "asha")}
    wall_ratio = statistics.median(a["wall_s"] / f["wall_s"]
                                   for a, f in zip(by["asha"], by["fifo"], strict=True))
    epoch_ratio = statistics.median(a["trial_epochs"] / f["trial_epochs"]
                                    for a, f in zip(by["asha"], by["fifo"], strict=True))
    trials_ratio = statistics.median(a["trials_s"] / f["trials_s"]
                                     for a, f in zip(by["asha"], by["fifo"], strict=True))
    compute_ratio = statistics.median(a["compute_s"] / f["compute_s"]
                                      for a, f in zip(by["asha"], by["fifo"], strict=True))
    print(f"\n{'round':>5} {'scheduler':>9} {'wall s':>7} {'trials s':>8} {'compute s':>9} "
          f"{'trial-epochs':>12} {'stopped':>7} {'best val acc':>12}  best trial")
    for row in rows:
        print(f"{row['round']:>5} {row['scheduler']:>9} {row['wall_s']:>7.1f} "
              f"{row['trials_s']:>8.1f} {row['compute_s']:>9.1f} "
              f"{row['trial_epochs']:>12} {row['early_stopped']:>7} "
              f"{row['best_val_accuracy']:>12.4f}  batch {row['best']['batch']}, "
              f"{row['best']['rule']}")
    print(f"ASHA/FIFO: sweep wall time x{wall_ratio:.2f}, the trials' wall time "
          f"x{trials_ratio:.2f}, trial-epochs x{epoch_ratio:.2f}, the trials' compute "
          f"x{compute_ratio:.2f} ({args.epochs} epochs, 9 trials)")
    for what, ratio in (("sweep", wall_ratio), ("trials", trials_ratio)):
        print(f"  {what} wall-time saving / trial-epoch saving = "
              f"{(1 - ratio) / (1 - epoch_ratio):.2f}, / compute saving = "
              f"{(1 - ratio) / (1 - compute_ratio):.2f}")
    path = write_json(RESULTS / "asha_vs_fifo.json", {
        "benchmark": "asha_vs_fifo", "config": "jobs/configs/sweep_digits.yaml",
        "epochs": args.epochs, "wall_ratio": wall_ratio, "trials_wall_ratio": trials_ratio,
        "trial_epoch_ratio": epoch_ratio, "compute_ratio": compute_ratio,
        "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
