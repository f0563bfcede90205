"""What a sweep pays per trial beyond its compute: a sweep against stand-alone jobs of its trials.

Both run as a user runs them, through the CLI, each in its own process with its own local Ray
(2 CPUs here), alternating over `--repeats` rounds (the machine is shared and noisy):

- job: `python -m pipeline train` on `jobs/configs/sweep_digits.yaml` at one trial's values
  (batch 128, linear rule), `--epochs` epochs (warmup: 2 epochs, or all but the last);
- sweep: `python -m pipeline tune` on the same config (its 9-trial grid, as many at a time as
  the cluster has CPUs), FIFO, the same epochs, its one-worker trials in their own Tune actor
  (`tune.trial_runner: auto`, the default);
- sweep, worker groups: the same with `tune.trial_runner=worker_group` (every trial a
  TorchTrainer, as all trials were before), unless `--no-worker-group`.

Reported per round: the job's wall time, each sweep's wall time, its wall time per trial and
that per-trial time's ratio to the job, and each trial's fixed cost (`startup_s`: from the
trial's start -- for the first trial in a Tune actor, the actor's loading of the pipeline -- to
its first optimizer step, a metric of every run) read back from trials.csv.
All log to one sqlite store under a temporary folder; none logs its model.

    python bench/sweep_overhead.py [--epochs 1] [--repeats 3]

Prints a table and writes bench/results/sweep_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = REPO / "jobs" / "configs" / "sweep_digits.yaml"


def _run(command: str, epochs: int, out: Path, extra: list[str]) -> float:
    sets = [f"train.epochs={epochs}", f"train.warmup_epochs={min(2, epochs - 1)}",
            "tracking.log_model=false",
            f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", *extra]
    argv = [sys.executable, "-m", "pipeline", command, "--config", str(CONFIG), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    out.parent.mkdir(parents=True, exist_ok=True)  # the working directory (MLflow's artifacts)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=out.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (a multiple of the arms, "
                    "3 or 2 with --no-worker-group, puts each arm first equally often)")
    ap.add_argument("--no-worker-group", action="store_true",
                    help="leave out the sweep whose trials are all TorchTrainers")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    kinds = ["job", "actor", *([] if args.no_worker_group else ["worker_group"])]
    rows = []
    for r in range(args.repeats):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]  # rotate the order
        job_s, sweeps = 0.0, []
        for kind in order:
            out = tmp / f"round{r}" / kind
            if kind == "job":
                wall = job_s = _run("train", args.epochs, out, [
                    "train.global_batch_size=128", "train.lr_scaling=linear"])
            else:
                wall = _run("tune", args.epochs, out, [f"tune.trial_runner="
                                                       f"{'auto' if kind == 'actor' else kind}"])
                trials = pd.read_csv(out / "trials.csv")
                sweeps.append({"runner": kind, "sweep_s": wall, "trials": len(trials),
                               "startup_s": [round(float(x), 2) for x in trials["startup_s"]]})
            print(f"[bench] round {r} {kind}: {wall:.1f} s", flush=True)
        for sweep in sweeps:
            sweep["per_trial_s"] = sweep["sweep_s"] / sweep["trials"]
            rows.append({"round": r, "job_s": job_s, **sweep,
                         "per_trial_x_job": sweep["per_trial_s"] / job_s})
    print(f"\n{'round':>5} {'trials run in':>13} {'job s':>6} {'sweep s':>8} {'trials':>6} "
          f"{'sweep s/trial':>13} {'x job':>6}  trial fixed cost s (median, max)")
    for row in rows:
        print(f"{row['round']:>5} {row['runner']:>13} {row['job_s']:>6.1f} {row['sweep_s']:>8.1f} "
              f"{row['trials']:>6} {row['per_trial_s']:>13.1f} {row['per_trial_x_job']:>6.2f}  "
              f"{statistics.median(row['startup_s']):.1f}, {max(row['startup_s']):.1f}")
    ratios = {kind: statistics.median(row["per_trial_x_job"] for row in rows
                                      if row["runner"] == kind) for kind in kinds[1:]}
    for kind, ratio in ratios.items():
        print(f"sweep wall per trial / stand-alone job, trials in {kind}: x{ratio:.2f} "
              f"(median of {args.repeats} rounds, {args.epochs} epoch(s))")
    path = save(RESULTS / "sweep_overhead.json", {
        "benchmark": "sweep_overhead", "config": "jobs/configs/sweep_digits.yaml",
        "epochs": args.epochs, "per_trial_x_job": ratios, "rows": rows,
        "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
