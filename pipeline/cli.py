"""`python -m pipeline COMMAND --config FILE [--set dotted.key=value ...] [--out DIR] [--verbose]
[--print-config]` (`--resume`: train, tune; `--max-memory SIZE`, `--on-workers`:
find-batch-size).

Exit codes: 0 success; 2 bad input (config, data, arguments) with one line on stderr naming
the culprit, checked before any cluster work starts; 1 anything else.

Heavy imports (Ray, torch) happen only after validation, so bad input fails in a second.
Each command is one `Command` in `COMMANDS` (its help, example, extra arguments and handler):
a new command is one more entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import console
from pipeline.config import (
    Config,
    ConfigError,
    DataUnreachable,
    check_tracking_uri,
    load_config,
    missing_resumed_store,
    sqlite_file,
)
from pipeline.files import run_state
from pipeline.redact import redact_text
from pipeline.resume import resume_folder, resume_point

PROG = "python -m pipeline"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage; we want one line
        """
        >>> _Parser().error("argument --max-memory: expected one argument")  # --max-memory -5MiB
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pipeline.config.ConfigError: ... (a value that starts with "-": give it as --max-memory=VALUE)
        """
        if (m := re.fullmatch(r"argument (--[\w-]+): expected one argument", message)):
            message += f' (a value that starts with "-": give it as {m.group(1)}=VALUE)'
        raise ConfigError(f"argument error: {message}")


# -- the commands -----------------------------------------------------------------------------
def submitted_job_note(out: Path, uri: str, cwd: Path | None = None,
                       environ: dict[str, str] | None = None) -> str | None:
    """A line for a job `ray job submit` started whose results would stay in its working
    directory -- Ray's temporary copy of the uploaded one, cleaned up with the job's files --
    or None: the --out folder, or a sqlite store, under it.

    >>> job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"working_dir": "gcs://p.zip"}}'}
    >>> print(submitted_job_note(Path("/pkg/runs/train"), "sqlite:////pkg/mlflow.db",
    ...                          Path("/pkg"), job))  # doctest: +NORMALIZE_WHITESPACE
    note: this job runs in Ray's temporary copy of its working directory (/pkg): --out and the
    MLflow store there go when the job's files are cleaned up; give --out an absolute path on
    shared storage and tracking.uri an MLflow server
    >>> submitted_job_note(Path("/shared/r"), "http://h:5000", Path("/pkg"), job) is None
    True
    >>> submitted_job_note(Path("/pkg/runs/train"), "http://h:5000", Path("/pkg"), {}) is None
    True
    """
    env = os.environ if environ is None else environ
    try:  # (set by the job server for a job's driver)
        job = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    if not (job.get("runtime_env") or {}).get("working_dir"):  # not an uploaded copy
        return None
    here = (cwd or Path.cwd()).resolve()
    store = sqlite_file(uri)
    inside = [what for what, path in (("--out", out),
                                      ("the MLflow store", Path(store) if store else None))
              if path is not None and path.resolve().is_relative_to(here)]
    if not inside:
        return None
    return (f"note: this job runs in Ray's temporary copy of its working directory ({here}): "
            f"{' and '.join(inside)} there go when the job's files are cleaned up; give --out "
            "an absolute path on shared storage and tracking.uri an MLflow server")


def _train(args: argparse.Namespace, cfg: Config, info: Any, out: Path, address: str | None) -> int:
    from pipeline.launch import TrainingInterrupted, run_training

    uri = _store(args, cfg, out)
    for line in console.setup_lines(cfg, info, uri):
        console.say(line)
    for key in cfg.unused_settings():  # not refused (see Config.unused_settings), but said
        console.say(f"note: {key} is set but not used")
    for note in getattr(info, "notes", []):  # (the data checks': DatasetInfo.notes)
        console.say(f"note: {note}")
    if (note := submitted_job_note(out, uri)) is not None:
        console.say(note)
    if cfg.tune.search_space:  # a sweep's config given to train: its one config runs
        console.say("note: tune.search_space is set but not used: train runs the config as it "
                    f"is ({PROG} tune sweeps it)")
    try:
        summary = run_training(cfg, info, out, resume=args.resume, address=address)
    except TrainingInterrupted as err:
        print(f"[pipeline] {err}", file=sys.stderr)
        return 1  # the interface's code for anything but success and bad input, as `tune`'s
    m = summary["metrics"]
    keys = ("val_accuracy", "val_loss") if "val_loss" in m else ("train_loss",)  # (no split)
    shown = " ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)
    console.say(f"done: {shown} after {console.counted(int(m.get('epoch', 0)), 'epoch')}")
    console.say(f"result: {out / 'result.json'}")
    if summary["mlflow_run_id"] is None:  # the tracking server never came back (launch says)
        return 0
    console.say(f"MLflow run {summary['mlflow_run_id']} in {redact_text(summary['tracking_uri'])}")
    if summary["tracking_uri"].startswith("sqlite:///"):
        console.say(f"see it: mlflow ui --backend-store-uri {redact_text(summary['tracking_uri'])}")
    return 0


def _tune(args: argparse.Namespace, cfg: Config, info: Any, out: Path, address: str | None) -> int:
    from pipeline.tune.space import check_trials

    checked = check_trials(cfg, info)  # every trial's config, as a job's (exit 2), before Ray
    from pipeline.tune.sweep import SweepInterrupted, print_sweep, run_sweep

    if (note := submitted_job_note(out, _store(args, cfg, out))) is not None:
        console.say(note)
    # the notes a job gets: a setting no trial uses (one some trials use is not said), and the
    # data checks'
    unused = [{u.split(" (", 1)[0]: u for u in trial.unused_settings()} for trial in checked]
    for key in [k for k in unused[0] if all(k in u for u in unused)] if unused else []:
        console.say(f"note: {unused[0][key]} is set but no trial uses it")
    for note in getattr(info, "notes", []):
        console.say(f"note: {note}")

    try:
        trials = run_sweep(cfg, info, out, resume=args.resume, address=address, checked=checked)
    except SweepInterrupted as err:
        print(f"[pipeline] {err}", file=sys.stderr)
        return 1
    print_sweep(trials, out)
    return 0


def _inspect(args: argparse.Namespace, cfg: Config, info: Any, out: Path, address: str | None) -> int:
    from pipeline.inspect import inspect_batches, print_summary

    print_summary(inspect_batches(cfg, info, out, address))
    console.say(f"wrote {out / 'batches.parquet'} and {out / 'batches.png'}")
    return 0


def _find_batch_size(args: argparse.Namespace, cfg: Config, info: Any, out: Path,
                     address: str | None) -> int:
    from pipeline.engine.batch_finder import human_bytes
    from pipeline.find_batch_size import find_batch_size, print_result

    result = find_batch_size(cfg, info, out, args.max_memory, progress=True,
                             on_workers=args.on_workers, address=address)
    print_result(result, table=False)  # printed row by row as the sizes were tried
    console.say(f"wrote {out / 'find_batch_size.json'} and {out / 'find_batch_size.png'}")
    def over_budget(trials: list[dict[str, Any]]) -> bool:
        """Whether size 1 failed on the budget (not a GPU's own out-of-memory within it)."""
        one = next((x for x in trials if x["micro_batch_size"] == 1), {})
        return str(one.get("note") or "").startswith("over budget")

    if result["max_micro_batch_size"] and result.get("max_accumulating_micro_batch_size") == 0:
        # a step of several micro-batches: not even one sample fits beside its gradients
        budget = result["max_memory_bytes"]
        blamed = args.max_memory is not None and over_budget(result["accumulating_trials"])
        within = f" in {human_bytes(budget)}, {result['budget']}" if budget else ""
        print(f"{'argument error: --max-memory: ' if blamed else ''}not "
              f"even micro_batch_size=1 fits beside the gradients a step of several "
              f"micro-batches holds{within} (train.global_batch_size="
              f"{cfg.train.global_batch_size} needs accumulation here)", file=sys.stderr)
        return 2 if blamed else 1
    if result["max_micro_batch_size"] == 0:
        budget = result["max_memory_bytes"]
        if not over_budget(result["trials"]):
            budget = None  # size 1 failed otherwise (a GPU's own out-of-memory), not the budget
        if budget and args.max_memory is not None:  # the user's budget is the culprit
            print(f"argument error: --max-memory: not even micro_batch_size=1 fits in "
                  f"{human_bytes(budget)}", file=sys.stderr)
            return 2
        if budget:  # the default budget, half the memory available
            print(f"not even micro_batch_size=1 fits in {human_bytes(budget)}, "
                  f"{result['budget']}", file=sys.stderr)
        else:  # a GPU's own out-of-memory (within the budget, if any)
            print("out of memory at micro_batch_size=1", file=sys.stderr)
        return 1
    return 0


def _memory_size(text: str) -> int:
    from pipeline.find_batch_size import parse_size

    try:
        return parse_size(text)
    except ConfigError as err:  # argparse adds "argument --max-memory: "
        raise argparse.ArgumentTypeError(str(err).split(": ", 2)[-1]) from None


def _find_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", metavar="SIZE", type=_memory_size, default=None,
                   help="memory budget of one step, e.g. 512MiB or 4GiB (CPU default: half the "
                   "memory available, divided among scaling.num_workers; CUDA default: none, "
                   "out-of-memory decides)")
    p.add_argument("--on-workers", action="store_true",
                   help="search on the cluster's scaling.num_workers Ray Train workers, each on "
                   "its own device, the ranks agreeing on every size (as with `ray job submit` "
                   "to a cluster whose head has no GPU); default: in this process, on this "
                   "machine's device, without Ray")


def _resume_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resume", action="store_true", help=what)


@dataclass(frozen=True)
class Command:
    summary: str  # one line, in `python -m pipeline --help`
    description: str  # the command's own --help
    example: str
    run: Callable[[argparse.Namespace, Config, Any, Path, str | None], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {
    "train": Command(
        summary="train one model with Ray Train (DDP workers), tracked in MLflow",
        description="Train one model: Ray Data ingest, Ray Train's TorchTrainer on "
        "scaling.num_workers DDP workers, one MLflow run. Writes DIR/result.json (final metrics, "
        "MLflow run id, last checkpoint, resolved config) and a checkpoint every epoch.",
        example=f"{PROG} train --config jobs/configs/digits.yaml --set train.epochs=2 --out runs/digits",
        run=_train,
        add_arguments=lambda p: _resume_argument(
            p, "continue from the latest checkpoint in --out (the same MLflow run)")),
    "tune": Command(
        summary="sweep batch size x LR scaling rule x ... with Ray Tune (ASHA or FIFO)",
        description="Run the Ray Tune sweep that tune.search_space describes (dotted config keys), "
        "one nested MLflow run per trial under a parent run. Writes DIR/result.json (best trial, "
        "parent run id), DIR/trials.csv and plots.",
        example=f"{PROG} tune --config jobs/configs/sweep_digits.yaml --set train.epochs=3 "
        "--out runs/sweep",
        run=_tune,
        add_arguments=lambda p: _resume_argument(
            p, "continue the interrupted sweep recorded in --out")),
    "inspect-batches": Command(
        summary="draw a job's exact batches without training, and summarise them",
        description="Run the job's batch pipeline (same ingest, plans, rank slices and "
        "micro-batches) for train.epochs epochs (or train.max_steps steps) on "
        "scaling.num_workers ranks without training. What only training knows is not shown: "
        "hard_mining's later epochs (planned from measured losses), an adaptive schedule's "
        "steps (its unit batches show), an auto micro-batch's shrinking. "
        "Writes one row per sample drawn to DIR/batches.parquet, DIR/summary.json and "
        "DIR/batches.png, and prints a per-epoch summary.",
        example=f"{PROG} inspect-batches --config jobs/configs/digits.yaml "
        "--set batching.strategy=stratified --out runs/inspect",
        run=_inspect),
    "find-batch-size": Command(
        summary="find the largest micro-batch a worker trains, and a batching to configure",
        description="Find the largest per-worker micro-batch that trains a full step (forward, "
        "backward, optimizer step) on the training split's largest samples (longest sequences "
        "first): doubling, then bisection to the exact boundary. Runs one worker in-process on "
        "this machine's device, without Ray; --on-workers runs it on the cluster's "
        "scaling.num_workers Ray Train workers, every rank trying the same size and the minimum "
        "winning (no rank left waiting after another ran out of memory). On a CPU a step fits "
        "when its peak tensor memory is within --max-memory. "
        "Prints a table; writes DIR/find_batch_size.json (max_micro_batch_size, device, ranks, "
        "suggestion: micro batch x accumulation x workers for train.global_batch_size, trials) "
        "and DIR/find_batch_size.png.",
        example=f"{PROG} find-batch-size --config jobs/configs/digits.yaml --max-memory 64MiB "
        "--out runs/find",
        run=_find_batch_size,
        add_arguments=_find_arguments),
}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. train.epochs=2; a section "
                   "given a mapping is merged (repeatable)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default runs/<command>)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own logs (default: only the pipeline's lines)")
    p.add_argument("--print-config", action="store_true",
                   help="print the config after --config and --set as YAML, every key with its "
                   "default and description, and exit")


def build_parser(job: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `job` (e.g. "python jobs/train.py") names a job script that fixes the
    command, for its usage line and example (`python jobs/train.py --help`)."""
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Ray-based training and tuning of PyTorch models, built around how "
                "batches are composed,\nstepped and sized. Every command reads one typed config "
                "(--config FILE, --set key=value).",
                epilog=f"{PROG} COMMAND --help shows a command's options and an example;\n"
                f"{PROG} COMMAND --print-config prints every config key with its default and "
                "description.\n\nexample:\n  " + COMMANDS["train"].example)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    for name, c in COMMANDS.items():
        example = c.example if job is None else c.example.replace(
            f"{PROG} {name}", f"ray job submit --working-dir . -- {job}", 1).replace(
            "--out runs/", "--out /shared/runs/")  # (the job's working directory is a temporary copy)
        sp = sub.add_parser(name, help=c.summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=textwrap.fill(c.description, 96),
                            epilog=f"example:\n  {example}", **({} if job is None else {"prog": job}))
        _common_arguments(sp)
        if c.add_arguments is not None:
            c.add_arguments(sp)
        sp.set_defaults(resume=False)
    return p


def parse_args(argv: list[str] | None, job: str | None = None) -> argparse.Namespace:
    return build_parser(job).parse_args(argv)


def prepare(argv: list[str] | None) -> tuple[argparse.Namespace, Config, object, Path]:
    """Parse and validate everything; raise ConfigError on bad input. No cluster work."""
    from pipeline.data.datasets import resolve

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    given = args.out or f"runs/{args.command}"
    try:
        out = Path(given).expanduser().resolve()  # (--out=~/x: no shell expands it)
        problem = out_problem(out)
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
        raise ConfigError(f"argument error: --out {given}: {getattr(err, 'strerror', None) or err}"
                          ) from None
    if problem is not None:
        raise ConfigError(f"argument error: --out {out}: {problem}")
    if args.resume and not (out / "ray_results").exists():
        raise ConfigError(f"argument error: --resume: nothing to resume in {out}")
    if args.command in ("train", "tune"):  # the store they record to: one MLflow knows
        check_tracking_uri(*_store_and_source(args, cfg, out))
    resuming = args.resume and args.command == "train"
    started = run_state(out) if resuming else {}
    # a resumed run whose store file is gone: said before the data's reads
    if started.get("mlflow_run_id") and started.get("tracking_uri") and (
            missing := missing_resumed_store(started["mlflow_run_id"], started["tracking_uri"])):
        raise missing
    cfg, info = resolve(cfg)  # the data's checks last: they read the data (seconds on a big one)
    if resuming:  # no checkpoint, or another training
        if not started:  # (its checkpoints alone: whose config, whose MLflow run, which run?)
            raise ConfigError(f"argument error: --resume: {out / 'run.json'} is missing (the "
                              "run's config, MLflow run and checkpoint folder): a resume could "
                              "not check that it continues the same training; start a new run "
                              "in another --out")
        resume_point(cfg, out / "ray_results" / resume_folder(started), started, checksum=False,
                     finished=(out / "result.json").exists())
    return args, cfg, info, out


def out_problem(out: Path) -> str | None:
    """Why the folder `out` cannot be made or written (nothing is made here: a refused command
    leaves nothing behind), or None.

    >>> import tempfile; root = Path(tempfile.mkdtemp()); _ = (root / "f").write_text("")
    >>> out_problem(root / "f"), out_problem(root / "f" / "sub"), out_problem(root / "a" / "b")
    ('it is a file, not a folder', 'f is a file, not a folder', None)
    """
    if out.exists() and not out.is_dir():
        return "it is a file, not a folder"
    above = out
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        return f"{above.name} is a file, not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{above} is not writable"
    return None


def _store_and_source(args: argparse.Namespace, cfg: Config, out: Path) -> tuple[str, str]:
    """The store a run records to -- a resumed run's own (as `run_training` picks it) -- and
    where that URI comes from, for a line that names it."""
    state = "sweep.json" if args.command == "tune" else "run.json"  # (a sweep keeps its own)
    resumed = (run_state(out, state) if args.resume else {}).get("tracking_uri")
    if resumed:
        return resumed, f"{out / state}: tracking_uri"
    return cfg.tracking_uri(), cfg.tracking_source()


def _store(args: argparse.Namespace, cfg: Config, out: Path) -> str:
    """The store a run records to (`_store_and_source`)."""
    return _store_and_source(args, cfg, out)[0]


def run(argv: list[str] | None = None, *, address: str | None = None, job: str | None = None) -> int:
    """Run a command; `address="auto"` joins a running cluster and never starts one (jobs/),
    `job` names the job script for `--help` (see build_parser)."""
    main = threading.current_thread() is threading.main_thread()
    # SIGTERM (`ray job stop`, a scheduler's kill) ends the command as Ray's own handler does
    # once Ray is started -- with SystemExit, so that `finally` blocks clean up -- also before
    # it is (the data's checks) and where it never is (find-batch-size in this process)
    held = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        return _run(argv, address, job)
    except (KeyboardInterrupt, SystemExit) as err:
        # Ctrl-C, or SIGTERM (`ray job stop`: Ray's handler exits with the signal's number),
        # where no run is to be marked (train and tune mark theirs): 1 and one line, as they do
        if isinstance(err, SystemExit) and err.code != signal.SIGTERM:
            raise
        given = sys.argv[1:] if argv is None else argv
        command = next((a for a in given if a in COMMANDS), "pipeline")
        print(f"[pipeline] {command} interrupted", file=sys.stderr)
        return 1
    finally:
        if held is not None:
            signal.signal(signal.SIGTERM, held)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(signum)


def _run(argv: list[str] | None, address: str | None, job: str | None = None) -> int:
    try:
        args = parse_args(argv, job)
        if args.print_config:
            print(config_yaml(load_config(args.config, args.overrides), args.command), end="")
            return 0
        args, cfg, info, out = prepare(argv)
    except ConfigError as err:
        print(redact_text(str(err)), file=sys.stderr)  # (a data.path with credentials)
        return 2
    except DataUnreachable as err:  # not bad input: the same command may work later
        print(redact_text(str(err)), file=sys.stderr)
        return 1
    except SystemExit as exit_:  # --help (SIGTERM's: `run` says it and exits 1)
        if exit_.code == signal.SIGTERM:
            raise
        return exit_.code if isinstance(exit_.code, int) else 0
    except Exception:
        return _unexpected()
    console.set_verbose(args.verbose)  # before Ray is imported
    console.say_pipeline_warnings()
    try:
        return COMMANDS[args.command].run(args, cfg, info, out, address)
    except ConfigError as err:  # bad input found while connecting (e.g. multi-node + sqlite)
        print(redact_text(str(err)), file=sys.stderr)  # (a data.path with credentials)
        return 2
    except DataUnreachable as err:  # a sweep's checks of a swept data.path: one line, as above
        print(redact_text(str(err)), file=sys.stderr)
        return 1
    except Exception as err:  # a run stopped on purpose (train.nonfinite=stop): its one line
        stopped = getattr(sys.modules.get("pipeline.launch"), "TrainingStopped", None)
        if stopped is None or not isinstance(err, stopped):
            return _unexpected()
        print(redact_text(str(err)), file=sys.stderr)
        return 1


def _unexpected() -> int:
    """An error no check foresaw: its traceback in full, exit 1 -- masked (MLflow's connection
    errors carry the tracking URL, password and all). Called in an `except` block."""
    import traceback

    print(redact_text(traceback.format_exc()), end="", file=sys.stderr)
    return 1


def main() -> None:
    sys.exit(run())


# -- --print-config ---------------------------------------------------------------------------
def _flow(value: Any) -> str:
    """A value as one line of YAML.

    >>> _flow(None), _flow("auto"), _flow(0.0005), _flow({}), _flow([32, 128])
    ('null', 'auto', '0.0005', '{}', '[32, 128]')
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _comment(text: str, indent: str) -> list[str]:
    lines = textwrap.wrap(text, 100 - len(indent), break_on_hyphens=False, break_long_words=False)
    return [f"{indent}# {ln}" for ln in lines] or [f"{indent}#"]


def _field_lines(key: str, value: Any, field: Any, indent: str) -> list[str]:
    """A key's description and default as comments, then the key as YAML."""
    default = field.get_default(call_default_factory=True)
    about = (field.description or "").strip()  # a field without a description still shows
    lines = _comment(f"{about} (default: {_flow(default)})".strip(), indent)
    body = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=10**6)
    return lines + [indent + ln for ln in body.rstrip("\n").splitlines()]


def _known_entries(model: Any, given: dict[str, Any], indent: str, what: str) -> list[str]:
    """A typed options/kwargs model's entries not given, commented out with their defaults."""
    rest = {k: f for k, f in model.model_fields.items() if k not in given}
    if not rest:
        return []
    lines = [f"{indent}# {what}, with their defaults:"]
    for k, f in rest.items():
        about = f" -- {f.description}" if f.description else ""
        lines.append(f"{indent}#   {k}: {_flow(f.get_default(call_default_factory=True))}{about}")
    return lines


def config_yaml(cfg: Config, command: str = "train") -> str:
    """`cfg` as YAML that loads back to the same config, each key under a comment with its
    one-line description and default, taken from the typed config itself.

    >>> text = config_yaml(Config().with_overrides({"train.epochs": 3}))
    >>> "  # passes over the training pool (default: 10)\\n  epochs: 3" in text
    True
    >>> Config.model_validate(yaml.safe_load(text)) == Config().with_overrides({"train.epochs": 3})
    True

    Secrets are masked (`pipeline.redact`), as on the console and in MLflow -- a file saved
    from it then holds `***` where they were, which a header line says:

    >>> text = config_yaml(Config().with_overrides({"tracking.uri": "http://me:hunter22@h:5000"}))
    >>> "uri: http://me:***@h:5000" in text, "# Secrets are shown as ***" in text
    (True, True)
    """
    from pipeline.config import MODEL_KWARGS, STRATEGY_OPTIONS
    from pipeline.redact import redact

    shown = Config.model_validate(redact(cfg.to_dict()))
    masked = shown != cfg
    cfg = shown
    out = [f"# {PROG} {command} --config THIS_FILE",
           "# The config after --config and --set; every key with its default and description.",
           "# Values that the data decides (model.name: auto, unset columns) are filled at the run",
           "# and recorded in the resolved config MLflow keeps.",
           *(["# Secrets are shown as ***: give them again (--set, or the environment) where "
              "this file is used."] if masked else [])]
    for section, sfield in Config.model_fields.items():
        values = getattr(cfg, section)
        out.append("")
        out += _comment(sfield.description or section, "")
        out.append(f"{section}:")
        for key, field in type(values).model_fields.items():
            value = getattr(values, key)
            out += _field_lines(key, value, field, "  ")
            if (section, key) == ("batching", "options"):
                out += _known_entries(STRATEGY_OPTIONS[values.strategy], value, "  ",
                                      f"options of strategy {values.strategy}")
            elif (section, key) == ("model", "kwargs") and values.name in MODEL_KWARGS:
                out += _known_entries(MODEL_KWARGS[values.name], value, "  ",
                                      f"arguments of model {values.name}")
    return "\n".join(out) + "\n"
