"""The CLI's surface and the console settings, in-process and without Ray: per-command help,
`--print-config`, `--verbose`, argument errors as one line, and what quiets Ray's console."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
import yaml

from pipeline import cli, console
from pipeline.config import Config, load_config
from tests.conftest import REPO

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.run(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- help -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_its_own_help_with_description_and_example(name, capsys):
    rc, out, err = _run([name, "--help"], capsys)
    command = cli.COMMANDS[name]
    assert rc == 0 and err == ""
    assert out.startswith(f"usage: python -m pipeline {name} ")
    assert " ".join(command.description.split()) in " ".join(out.split())
    assert f"example:\n  {command.example}\n" in out
    assert command.example.startswith(f"python -m pipeline {name} --config jobs/configs/")
    for flag in ("--config", "--set", "--out", "--verbose", "--print-config"):
        assert flag in out
    assert ("--resume" in out) == (name in ("train", "tune"))


@pytest.mark.parametrize("name", ["train", "tune"])
def test_a_job_scripts_help_names_the_script_and_a_submit_example(name):
    """jobs/train.py and jobs/tune.py fix the command: their --help is the command's, with
    their own usage line and an example as `ray job submit` runs them (an --out outside the
    job's temporary working directory), in a fresh interpreter."""
    out = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith(f"usage: python jobs/{name}.py [-h] ")
    assert "python -m pipeline" not in out.stdout
    assert " ".join(cli.COMMANDS[name].description.split()) in " ".join(out.stdout.split())
    example = out.stdout.split("example:\n  ")[1].strip()
    assert example.startswith(f"ray job submit --working-dir . -- python jobs/{name}.py --config ")
    assert "--out /shared/runs/" in example
    assert example.split(f"jobs/{name}.py ")[1].replace("/shared/runs/", "runs/") == \
        cli.COMMANDS[name].example.split(f"pipeline {name} ")[1]


def test_help_examples_name_configs_that_exist():
    for command in cli.COMMANDS.values():
        words = command.example.split()
        assert (REPO / words[words.index("--config") + 1]).is_file(), command.example


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0
    flat = " ".join(out.split())
    for name, command in cli.COMMANDS.items():
        assert f"{name} {command.summary}" in flat
    assert "--print-config" in out


# -- argument errors: one line, exit 2 ------------------------------------------------------------
@pytest.mark.parametrize("argv, culprit", [
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "required: COMMAND"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["inspect-batches", "--resume"], "unrecognized arguments: --resume"),
    (["train", "--set"], "--set"),
])
def test_argument_errors_are_one_line_and_exit_2(argv, culprit, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("argument error: ") and culprit in err, err


def test_unknown_command_in_a_fresh_interpreter_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "bogus", "--config", DIGITS],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "argument error: argument COMMAND: invalid choice: 'bogus' (choose from 'train', 'tune', "
        "'inspect-batches', 'find-batch-size')"]


def test_verbose_is_accepted_by_every_command():
    for name in cli.COMMANDS:
        assert cli.parse_args([name, "--verbose"]).verbose is True
        assert cli.parse_args([name]).verbose is False


# -- --print-config -------------------------------------------------------------------------------
def test_print_config_round_trips_to_the_same_config(capsys):
    sets = ["train.epochs=3", "batching.strategy=curriculum", "batching.options.pacing=linear",
            "model.name=mlp", "model.kwargs.hidden=64",
            "tune.search_space={train.base_lr: {grid: [0.1, 0.2]}}"]
    argv = ["train", "--config", DIGITS, "--print-config"] + [a for s in sets for a in ("--set", s)]
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and err == ""
    expected = load_config(DIGITS, sets)
    assert Config.model_validate(yaml.safe_load(out)) == expected
    assert expected.train.epochs == 3 and expected.batching.options == {"pacing": "linear"}


def test_print_config_output_is_a_config_file_the_cli_reads(tmp_path, capsys):
    _, out, _ = _run(["tune", "--config", DIGITS, "--print-config", "--set", "train.epochs=4"], capsys)
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    assert load_config(path) == load_config(DIGITS, ["train.epochs=4"])


def test_print_config_comments_every_key_with_its_description_and_default(capsys):
    _, out, _ = _run(["train", "--print-config", "--set", "train.epochs=3"], capsys)
    lines = out.splitlines()
    keys = 0
    for section, sfield in Config.model_fields.items():
        start = lines.index(f"{section}:")
        for key, field in sfield.annotation.model_fields.items():
            at = next(i for i, ln in enumerate(lines) if i > start and ln.startswith(f"  {key}:"))
            comment = []
            for ln in reversed(lines[:at]):  # the comment block right above the key
                if not ln.startswith("  # "):
                    break
                comment.insert(0, ln[4:])
            text = " ".join(comment)
            default = cli._flow(field.get_default(call_default_factory=True))
            assert text.endswith(f"(default: {default})"), (section, key, text)
            if field.description:
                assert " ".join(field.description.split()) in text, (section, key)
            keys += 1
    assert keys == sum(len(f.annotation.model_fields) for f in Config.model_fields.values())
    epochs = lines.index("  epochs: 3")
    assert lines[epochs - 1].endswith("(default: 10)")


def test_print_config_lists_the_strategys_options_not_given(capsys):
    _, out, _ = _run(["train", "--print-config", "--set", "batching.strategy=curriculum",
                      "--set", "batching.options.c0=0.2"], capsys)
    assert "  options:\n    c0: 0.2\n  # options of strategy curriculum, with their defaults:\n" in out
    assert "  #   pacing: root -- " in out and "#   c0:" not in out


def test_print_config_handles_a_field_without_description(monkeypatch):
    field = Config.model_fields["train"].annotation.model_fields["epochs"]
    monkeypatch.setattr(field, "description", None)
    text = cli.config_yaml(Config())
    assert "  # (default: 10)\n  epochs: 10\n" in text


def test_print_config_refuses_a_bad_config_like_a_run(capsys):
    rc, out, err = _run(["train", "--print-config", "--set", "train.epochs=0"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "train.epochs" in err


def test_print_config_touches_neither_the_data_nor_ray():
    code = ("import sys; from pipeline.cli import run; "
            "rc = run(['train', '--print-config', '--set', 'data.path=/nonexistent.parquet']); "
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules), file=sys.stderr); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "[]"
    assert yaml.safe_load(proc.stdout)["data"]["path"] == "/nonexistent.parquet"


# -- the console settings -------------------------------------------------------------------------
def test_ray_init_keeps_workers_output_and_raises_the_ray_logger_unless_verbose():
    quiet, loud = console.ray_init_kwargs(False), console.ray_init_kwargs(True)
    assert quiet == {"log_to_driver": True, "logging_level": logging.ERROR}
    assert loud == {"log_to_driver": True, "logging_level": logging.INFO}
    assert console.train_log_level(False) == "WARNING" and console.train_log_level(True) == "INFO"
    assert console.tune_verbosity(False) == 0 and console.tune_verbosity(True) == 1


def test_ray_data_flags_are_real_data_context_fields():
    """Read from Ray Data's source, not imported: a renamed field would silently do nothing."""
    import importlib.util
    from pathlib import Path

    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # found, not imported
    text = (ray_dir / "data" / "context.py").read_text()
    flags = console.ray_data_flags(False)
    assert flags == {"enable_progress_bars": False, "print_on_execution_start": False}
    for name in flags:
        assert f"\n    {name}: bool = " in text, name
    assert console.ray_data_flags(True) == {}


def test_set_verbose_chooses_the_console_before_ray_is_imported(monkeypatch):
    ray_keys = ("RAY_DISABLE_WORKER_LOG_PREFIX", "RAY_AIR_NEW_OUTPUT")
    for key in (console.VERBOSE_ENV, *ray_keys):
        monkeypatch.delenv(key, raising=False)
    console.set_verbose(False)
    assert not console.is_verbose()
    assert [os.environ[k] for k in ray_keys] == ["1", "0"]
    for key in ray_keys:
        monkeypatch.delenv(key)
    console.set_verbose(True)
    assert console.is_verbose() and not any(k in os.environ for k in ray_keys)
    assert console.local_ray_env(True) == {} and console.ray_env(True) == {}


def test_set_verbose_keeps_a_users_own_ray_setting(monkeypatch):
    monkeypatch.setenv("RAY_DISABLE_WORKER_LOG_PREFIX", "0")
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.set_verbose(False)
    assert os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "0"


@pytest.fixture
def saved_loggers():
    names = ("mlflow", "alembic", "ray.data")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, handlers) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).handlers[:] = handlers


def test_quiet_loggers_silence_mlflow_and_ray_datas_console_but_not_its_file(saved_loggers, tmp_path):
    data = logging.getLogger("ray.data")
    stream, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "ray-data.log")
    data.handlers[:] = [stream, file]
    for h in (stream, file):
        h.setLevel(logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.INFO)
    console.quiet_loggers(True)
    assert logging.getLogger("mlflow").level == logging.INFO and stream.level == logging.INFO
    console.quiet_loggers(False)
    assert logging.getLogger("mlflow").level == logging.ERROR
    assert logging.getLogger("alembic").level == logging.ERROR
    assert stream.level == logging.ERROR and file.level == logging.INFO
    file.close()


def test_quiet_worker_logs_reach_ray_trains_file_named_logger():
    ours = logging.getLogger("/venv/site-packages/ray/train/v2/_internal/execution/context.py")
    other = logging.getLogger("/venv/site-packages/torch/distributed/run.py")
    for lg in (ours, other):
        lg.setLevel(logging.NOTSET)
    console.quiet_worker_logs(True)
    assert ours.level == logging.NOTSET
    console.quiet_worker_logs(False)
    assert ours.level == logging.WARNING and other.level == logging.NOTSET
    assert not ours.isEnabledFor(logging.INFO)


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert console.progress_bar_wanted(Tty()) is True
    assert console.progress_bar_wanted(io.StringIO()) is False


def test_epoch_line_shows_the_key_metrics_in_order():
    line = console.epoch_line({"epoch": 3, "val_accuracy": 0.5, "train_loss": float("nan"),
                               "lr": 0.1, "padding_efficiency": 0.8123, "tokens_per_s": 1e4})
    assert line == "epoch 3: train_loss=nan val_accuracy=0.5000 lr=0.1 padding=81.2% 10000 tokens/s"


def test_setup_lines_state_the_batch_arithmetic_and_the_scaled_lr():
    from pipeline.data.datasets import DatasetInfo

    cfg = Config().with_overrides({"train.global_batch_size": 256, "train.micro_batch_size": 32,
                                   "scaling.num_workers": 4, "train.lr_scaling": "sqrt",
                                   "train.base_lr": 0.1, "train.base_batch_size": 64})
    lines = console.setup_lines(cfg, DatasetInfo(uri="u", num_rows=10, columns=()), "sqlite:///x")
    assert len(lines) == 4
    assert "global batch 256 = 4 workers x 2 micro-batches of 32" in lines[1]
    assert "lr 0.2 (0.1 at batch 64, sqrt rule)" in lines[2]  # 0.1 * sqrt(256 / 64)
    assert lines[3].endswith("in sqlite:///x")
    # credentials in the data's URI (pyarrow takes s3://KEY:SECRET@bucket/...) are masked
    lines = console.setup_lines(cfg, DatasetInfo(uri="s3://AKIA:wJalrSECRET@b/d", num_rows=10,
                                                 columns=()), "sqlite:///x")
    assert "(s3://AKIA:***@b/d)" in lines[0]


def test_a_refusal_naming_a_uri_with_credentials_masks_them(capsys):
    """The exit-2 line quotes data.path (pyarrow takes s3://KEY:SECRET@bucket/...)."""
    path = "/nonexistent/http://me:wJalrSECRET@h/d.parquet"
    assert cli.run(["inspect-batches", "--config", str(REPO / "jobs/configs/digits.yaml"),
                    "--set", f"data.path={path}"]) == 2
    err = capsys.readouterr().err
    assert "me:***@h" in err and "wJalrSECRET" not in err


def test_an_unexpected_failure_prints_its_traceback_masked_and_exits_1(monkeypatch, capsys):
    """Anything but bad input and a stop on purpose: the traceback in full, exit 1 -- with a
    URL's password masked (MLflow's connection errors name the whole tracking URL)."""
    import dataclasses

    def fails(*_args):
        raise ConnectionError("API request to http://me:wJalrSECRET@h:5000/api failed")

    command = dataclasses.replace(cli.COMMANDS["inspect-batches"], run=fails)
    monkeypatch.setitem(cli.COMMANDS, "inspect-batches", command)
    rc = cli.run(["inspect-batches", "--config", str(REPO / "jobs/configs/digits.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback (most recent call last)" in err
    assert "ConnectionError: API request to http://me:***@h:5000/api failed" in err
    assert "wJalrSECRET" not in err


def test_sigterm_outside_a_run_exits_1_with_one_line_and_other_exits_pass(monkeypatch, capsys):
    """Ray's SIGTERM handler ends the driver with SystemExit(15) (`ray job stop`); where no
    run is to be marked (inspect-batches, or train before its run exists) the command exits 1
    with one line, as after Ctrl-C -- not 15. Another SystemExit is not swallowed."""
    import signal

    def stopped(*_a, **_k):
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(cli, "_run", stopped)
    assert cli.run(["inspect-batches", "--config", "x.yaml"]) == 1
    assert capsys.readouterr().err == "[pipeline] inspect-batches interrupted\n"

    def other(*_a, **_k):
        raise SystemExit(3)

    monkeypatch.setattr(cli, "_run", other)
    with pytest.raises(SystemExit) as caught:
        cli.run(["train"])
    assert caught.value.code == 3



@pytest.mark.timeout(120)
def test_sigterm_before_ray_ends_the_command_with_its_line_and_cleans_up(tmp_path):
    """SIGTERM where Ray's handler is not installed -- find-batch-size in its own process
    never starts Ray -- ends the command as under Ray: exit 1 with its one line, and `finally`
    blocks run (it was the signal's default: killed, exit -15, silent, temporary files left).
    The handler is the command's only: the caller's is back after `run` returns."""
    import signal

    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "find-batch-size", "--config",
         str(REPO / "jobs/configs/digits.yaml"), "--max-memory", "64MiB", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert job.stdout is not None
    for line in job.stdout:  # the search under way: its first trial's row (of about 20)
        if line.split()[:2] == ["1", "yes"]:
            break
    else:
        raise AssertionError(job.communicate()[1][-3000:])
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == "[pipeline] find-batch-size interrupted", err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    before = signal.getsignal(signal.SIGTERM)
    cli.run(["train", "--set", "train.epochs=0"])  # (refused at once)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_the_data_checks_is_the_commands_line_and_exit_1(monkeypatch, capsys):
    """SIGTERM while `prepare` reads the data (before Ray): the command's line and exit 1, as
    later -- the `--help` exit's clause took its SystemExit(15) for a code to return."""
    import signal

    def checks(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)  # (the handler `run` installed raises here)
        raise AssertionError("SIGTERM did not end the checks")

    monkeypatch.setattr("pipeline.data.datasets.resolve", checks)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.run(["inspect-batches", "--config", str(REPO / "jobs/configs/digits.yaml")]) == 1
    assert capsys.readouterr().err == "[pipeline] inspect-batches interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is before
