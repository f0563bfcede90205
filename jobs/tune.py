"""Tune sweep job for `ray job submit` (thin: parse, validate, call the library).

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/sweep_digits.yaml \
        --set tracking.uri=http://<mlflow-server>:5000 --out /shared/runs/sweep

It joins the cluster it was submitted to (RAY_ADDRESS, set by the job server) and never starts
a second one; trials run as many at a time as the cluster's CPUs/GPUs fit (an autoscaling
cluster's, at its largest). An interrupted sweep
continues with the same command plus `--resume`. Same arguments and exit codes as
`python -m pipeline tune` (`--help`, `--print-config`); the job's log shows the
pipeline's lines (and the few that Ray's core writes past any filter), `--verbose` adds Ray's
own.
"""

import sys
from pathlib import Path

# The job's working directory is an uploaded copy of the repo: import the package from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["tune", *sys.argv[1:]], address="auto", job="python jobs/tune.py"))
