"""`python -m pipeline COMMAND --config FILE [--set dotted.key=value ...] [--out DIR]`.

Exit codes: 0 success; 2 bad input (config, data, arguments) with one line on stderr naming
the culprit, checked before any cluster work starts; 1 anything else.

Heavy imports (Ray, torch) happen only after validation, so bad input fails in a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config

COMMANDS = ("train", "tune", "inspect-batches")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; we want one line
        raise ConfigError(f"argument error: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value by dotted key (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/<command>)")
    p.add_argument("--resume", action="store_true", help="train: resume from the latest checkpoint in --out")
    return p


def prepare(argv: list[str] | None) -> tuple[argparse.Namespace, Config, object, Path]:
    """Parse and validate everything; raise ConfigError on bad input. No cluster work."""
    from pipeline.data.datasets import resolve

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg, info = resolve(cfg)
    out = Path(args.out or f"runs/{args.command}").resolve()
    if args.resume and not (out / "ray_results").exists():
        raise ConfigError(f"argument error: --resume: nothing to resume in {out}")
    return args, cfg, info, out


def run(argv: list[str] | None = None, *, address: str | None = None) -> int:
    """Run a command; `address="auto"` joins a running cluster and never starts one (jobs/)."""
    try:
        args, cfg, info, out = prepare(argv)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    try:
        if args.command == "train":
            from pipeline.launch import run_training

            summary = run_training(cfg, info, out, resume=args.resume, address=address)
            m = summary["metrics"]
            print(f"[pipeline] done: val_accuracy={m.get('val_accuracy', float('nan')):.4f} "
                  f"val_loss={m.get('val_loss', float('nan')):.4f} after {m.get('epoch')} epochs")
            print(f"[pipeline] result: {out / 'result.json'}")
            print(f"[pipeline] MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
            if summary["tracking_uri"].startswith("sqlite:///"):
                print(f"[pipeline] see it: mlflow ui --backend-store-uri {summary['tracking_uri']}")
            return 0
        if args.command == "inspect-batches":
            from pipeline.inspect import inspect_batches, print_summary

            print_summary(inspect_batches(cfg, info, out))
            print(f"[pipeline] wrote {out / 'batches.parquet'} and {out / 'batches.png'}")
            return 0
        if args.command == "tune":
            from pipeline.tune.sweep import SweepInterrupted, print_sweep, run_sweep

            try:
                trials = run_sweep(cfg, info, out, resume=args.resume, address=address)
            except SweepInterrupted as err:
                print(f"[pipeline] {err}", file=sys.stderr)
                return 1
            print_sweep(trials, out)
            return 0
        print(f"{args.command}: not available yet", file=sys.stderr)
        return 1
    except ConfigError as err:  # bad input found while connecting (e.g. multi-node + sqlite)
        print(str(err), file=sys.stderr)
        return 2


def main() -> None:
    sys.exit(run())
