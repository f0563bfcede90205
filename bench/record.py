"""Every bench's JSON: written whole (`pipeline.files.write_json`), with when and where it was
measured -- the date, the CPU, the CPU count, the 1-minute load average (this machine is
shared) and the versions of what the bench imported. Imports nothing beyond the standard
library and `pipeline.files` (`bench/gpu_check.py` runs where Ray and MLflow are absent)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.files import write_json  # noqa: E402

VERSIONED = ("torch", "numpy", "pyarrow", "ray", "mlflow")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where and when: what a figure quoted from the JSON needs said beside it."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        # only what the bench itself imported (importing Ray here would cost seconds)
        "versions": {m: getattr(sys.modules[m], "__version__", None)
                     for m in VERSIONED if m in sys.modules},
        "commit": code_version(),
    }


def code_version() -> str | None:
    """The repository's commit, with "+changes" when the working tree differs from it (the
    figures of a "before/after" pair say which code they are of); None outside a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(  # (the committed results a bench rewrites are no change)
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
             ":(exclude,top)bench/results"], cwd=here, check=True, capture_output=True,
            text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def save(path: str | Path, data: dict[str, Any]) -> Path:
    """`data` plus `machine` (unless it has one) as JSON at `path`, written whole."""
    return write_json(path, {**data, "machine": data.get("machine") or machine()})
