"""Training job for `ray job submit` (thin: parse, validate, call the library).

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits.yaml \
        --set tracking.uri=http://<mlflow-server>:5000 --out /shared/runs/digits

It joins the cluster it was submitted to (RAY_ADDRESS, set by the job server) and never starts
a second one. Same arguments and exit codes as `python -m pipeline train`
(`--help`, `--print-config`); the job's log shows the pipeline's lines (and the few that Ray's
core writes past any filter), `--verbose` adds Ray's own.
"""

import sys
from pathlib import Path

# The job's working directory is an uploaded copy of the repo: import the package from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]], address="auto", job="python jobs/train.py"))
