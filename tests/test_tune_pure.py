"""Tune sweeps without a cluster: the analysis functions on hand-made frames, the search space,
the search algorithm, the concurrency rule and ASHA's rungs, and bad search spaces refused
before the cluster. The real sweep is in tests/test_tune.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.tune import analysis
from pipeline.tune.analysis import (
    accuracy_vs_batch_plot,
    steps_to_target,
    steps_vs_batch_plot,
    summary_table,
)
from tests.conftest import REPO, cli_in_process, digits_train_rows

PNG = b"\x89PNG"
SWEEP = str(REPO / "jobs" / "configs" / "sweep_digits.yaml")


# -- analysis ------------------------------------------------------------------------------------
def test_steps_to_target_first_epoch_reaching_it():
    h = pd.DataFrame({"epoch": [3, 1, 2, 4], "step": [66, 22, 44, 88],
                      "val_accuracy": [0.95, 0.80, 0.93, 0.91]})  # unsorted, not monotone
    assert steps_to_target(h, 0.9) == 44
    assert steps_to_target(h, 0.95) == 66
    assert steps_to_target(h, 0.80) == 22
    assert steps_to_target(h, 0.99) is None
    assert steps_to_target(h.iloc[:0], 0.5) is None
    assert steps_to_target(h.rename(columns={"val_accuracy": "acc"}), 0.9, metric="acc") == 44


def _trials() -> pd.DataFrame:
    rows = []
    for rule, acc in (("none", [0.97, 0.95, 0.80]), ("linear", [0.97, 0.97, 0.96])):
        for batch, a, s in zip((32, 128, 512), acc, (400, 100, 40), strict=True):
            rows.append({"train.global_batch_size": batch, "train.lr_scaling": rule,
                         "val_accuracy": a, "steps_to_target": s if a >= 0.9 else None})
    rows.append({"train.global_batch_size": 32, "train.lr_scaling": "none",
                 "val_accuracy": math.nan, "steps_to_target": None})  # an errored trial
    return pd.DataFrame(rows)


def _lines(fig) -> list[tuple[str, list[float], list[float]]]:
    (ax,) = fig.axes
    return [(ln.get_label(), [float(x) for x in ln.get_xdata()],
             [float(y) for y in ln.get_ydata()]) for ln in ax.get_lines()]


def test_plots_draw_the_best_trial_per_rule_and_batch(tmp_path, monkeypatch):
    figures = []
    save = analysis._save
    monkeypatch.setattr(analysis, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    df = _trials()
    assert accuracy_vs_batch_plot(df, tmp_path / "acc.png").read_bytes()[:4] == PNG
    # One line per rule (sorted), the errored trial (NaN) left out.
    assert _lines(figures[0]) == [
        ("lr_scaling=linear", [32, 128, 512], [0.97, 0.97, 0.96]),
        ("lr_scaling=none", [32, 128, 512], [0.97, 0.95, 0.80])]
    assert steps_vs_batch_plot(df, tmp_path / "steps.png", target=0.9).read_bytes()[:4] == PNG
    # The unscaled batch 512 never reached the target: left out. Perfect scaling through each
    # rule's smallest batch: 400 steps at 32 -> 400 * 32 / b.
    (label, xs, ys), (perfect, pxs, pys), (label2, xs2, ys2), (_, pxs2, pys2) = _lines(figures[1])
    assert (label, xs, ys) == ("lr_scaling=linear", [32, 128, 512], [400, 100, 40])
    assert (perfect, pxs, pys) == ("perfect scaling", [32, 128, 512], [400, 100, 25])
    assert (label2, xs2, ys2) == ("lr_scaling=none", [32, 128], [400, 100])
    assert (pxs2, pys2) == ([32, 128], [400, 100])
    assert figures[1].axes[0].get_title() == "Steps to target vs batch size (val_accuracy >= 0.9)"


def test_plots_keep_the_callers_backend(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for a notebook's inline backend: the plots must keep it
    try:
        accuracy_vs_batch_plot(_trials(), tmp_path / "acc.png")
        steps_vs_batch_plot(_trials(), tmp_path / "steps.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


def test_empty_plots_say_so(tmp_path, monkeypatch):
    figures = []
    save = analysis._save
    monkeypatch.setattr(analysis, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    empty = _trials().assign(val_accuracy=math.nan, steps_to_target=None)
    accuracy_vs_batch_plot(empty, tmp_path / "e1.png")
    steps_vs_batch_plot(empty, tmp_path / "e2.png")
    texts = [[t.get_text() for t in f.axes[0].texts] for f in figures]
    assert texts == [["no finished trial"], ["no trial reached the target"]]
    assert all(_lines(f) == [] for f in figures)


def test_summary_table_is_markdown_best_first():
    table = summary_table(_trials(), ["train.global_batch_size", "train.lr_scaling",
                                      "val_accuracy"])
    lines = table.strip().splitlines()
    assert lines[0] == "| train.global_batch_size | train.lr_scaling | val_accuracy |"
    assert lines[1] == "|---|---|---|"
    assert len(lines) == 2 + 7
    # Best first; ties keep the input order (stable); the NaN row last, blank.
    assert lines[2:5] == ["| 32 | none | 0.9700 |", "| 32 | linear | 0.9700 |",
                          "| 128 | linear | 0.9700 |"]
    assert lines[-1] == "| 32 | none |  |"
    # Ranked by the sweep's own metric and mode (it was val_accuracy, whatever tune.metric).
    by_loss = _trials().assign(val_loss=[0.3, 0.2, 0.9, 0.1, 0.25, 0.4, math.nan])
    lines = summary_table(by_loss, ["train.global_batch_size", "train.lr_scaling", "val_loss"],
                          metric="val_loss", mode="min").strip().splitlines()
    assert lines[2:4] == ["| 32 | linear | 0.1000 |", "| 128 | none | 0.2000 |"]
    assert lines[-1] == "| 32 | none |  |"
    # Trials that ran their budget first, as the best trial is chosen: a trial ASHA stopped
    # at a better accuracy (at its second epoch) comes after them, a failed one after that.
    ranked = _trials().assign(status=["TERMINATED", "EARLY_STOPPED", "ERROR", "TERMINATED",
                                      "TERMINATED", "EARLY_STOPPED", "ERROR"],
                              val_accuracy=[0.90, 0.99, 0.995, 0.95, 0.97, 0.80, math.nan])
    lines = summary_table(ranked, ["train.global_batch_size", "status", "val_accuracy"]
                          ).strip().splitlines()
    assert lines[2:] == ["| 128 | TERMINATED | 0.9700 |", "| 32 | TERMINATED | 0.9500 |",
                         "| 32 | TERMINATED | 0.9000 |", "| 128 | EARLY_STOPPED | 0.9900 |",
                         "| 512 | EARLY_STOPPED | 0.8000 |", "| 512 | ERROR | 0.9950 |",
                         "| 32 | ERROR |  |"]
    # Ranked by the values the best trial was chosen by where the column holds another reading
    # (noise_scale: the column at the target, Tune's value the last result): the top row is it.
    two = pd.DataFrame({"trial": ["t1", "t2"], "status": ["TERMINATED"] * 2,
                        "noise_scale": [900.0, 100.0]})
    lines = summary_table(two, ["trial", "noise_scale"], metric="noise_scale", mode="min",
                          score=pd.Series([5.0, 50.0])).strip().splitlines()
    assert lines[2:] == ["| t1 | 900.0000 |", "| t2 | 100.0000 |"]


# -- search space and concurrency ----------------------------------------------------------------
def _cfg(space: dict, *sets: str):
    return load_config(SWEEP, [f"tune.search_space={json.dumps(space)}", *sets])


def test_search_space_kinds_and_dotted_keys():
    from ray import tune

    from pipeline.tune.sweep import search_space

    space = search_space(_cfg({"train.global_batch_size": {"grid": [32, 128]},
                               "train.lr_scaling": {"choice": ["none", "linear"]},
                               "train.base_lr": {"loguniform": [1e-3, 1e-1]},
                               "train.momentum": {"uniform": [0.8, 0.95]}}))
    assert space["train.global_batch_size"] == tune.grid_search([32, 128])
    assert space["train.lr_scaling"].categories == ["none", "linear"]
    assert isinstance(space["train.base_lr"], tune.search.sample.Float)
    assert space["train.base_lr"].lower == 1e-3 and space["train.momentum"].upper == 0.95
    # YAML 1.1 reads 1e-4 (no decimal point) as text: a range written so is still numbers
    text = yaml.safe_load("{loguniform: [1e-4, 1e-1]}")
    assert text == {"loguniform": ["1e-4", "1e-1"]}
    assert search_space(_cfg({"train.base_lr": text}))["train.base_lr"].lower == 1e-4
    random = search_space(_cfg({"train.global_batch_size": {"grid": [32, 128]}},
                               "tune.search=random"))
    assert random["train.global_batch_size"].categories == [32, 128]


def test_optuna_search_suggests_points_of_the_space_reproducibly():
    from pipeline.tune.sweep import search_algorithm, search_space

    space = {"train.global_batch_size": {"grid": [32, 128]},
             "train.base_lr": {"loguniform": [1e-3, 1e-1]}}
    from ray.tune.search.basic_variant import BasicVariantGenerator

    grid = search_algorithm(_cfg(space), 3)  # grid and random: Tune's own generator, seeded
    assert isinstance(grid, BasicVariantGenerator) and grid.max_concurrent == 3
    cfg = _cfg(space, "tune.search=optuna")
    runs = []
    for _ in range(2):  # seeded with train.seed: the same suggestions twice
        alg = search_algorithm(cfg)
        assert alg.set_search_properties("val_accuracy", "max", search_space(cfg))
        suggested = []
        for i in range(5):
            point = alg.suggest(f"t{i}")
            assert set(point) == set(space)
            assert point["train.global_batch_size"] in (32, 128)
            assert 1e-3 <= point["train.base_lr"] <= 1e-1
            alg.on_trial_complete(f"t{i}", {"val_accuracy": 1 - abs(point["train.base_lr"] - 0.02)})
            suggested.append(point)
        runs.append(suggested)
    assert runs[0] == runs[1]
    assert len({p["train.base_lr"] for p in runs[0]}) == 5


def test_optuna_missing_is_a_config_error(monkeypatch):
    import importlib.util

    from pipeline.tune.space import check_trials

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tune.search=optuna needs Optuna: pip install"):
        check_trials(_cfg({}, "tune.search=optuna"))


@pytest.mark.parametrize("space, culprit", [
    ({"train.nope": {"grid": [1]}}, "'train.nope'"),
    ({"train.base_lr": {"normal": [0, 1]}}, "unknown spec kind 'normal'"),
    ({"train.base_lr": {"loguniform": [0, 1]}}, "tune.search_space.train.base_lr.loguniform"),
    ({"train.base_lr": [0.1, 0.2]}, "tune.search_space.train.base_lr"),
    ({"tune.num_samples": {"grid": [1, 2]}}, "cannot be swept"),
    ({"train.global_batch_size": {"grid": [32, 33]}}, "train.global_batch_size=33"),
])
def test_bad_search_space_is_a_config_error(space, culprit):
    from pipeline.tune.space import check_trials

    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.").replace("[", r"\[")):
        check_trials(_cfg(space, "scaling.num_workers=2"))


def test_a_large_search_space_is_checked_pair_by_pair(monkeypatch):
    """Beyond MAX_CHECKED_COMBINATIONS (made 39 here: 4 x 2 x 5 = 40 combinations), every two
    keys' values are checked together (38 pairs), the third key at its first value (a trial's):
    batch 33 fits 1 worker and 2 workers fit batch 32, but 33 on 2 workers is refused, named
    with the trial. Beyond the limit for pairs too, each key's values are checked alone
    (4 + 2 + 5). The config's own value of a swept key is no trial's, and never checked: its
    2 workers cannot split batch 33, but the sweep's 1 worker can."""
    from pipeline.tune import space
    from pipeline.tune.space import check_trials

    monkeypatch.setattr(space, "MAX_CHECKED_COMBINATIONS", 39)
    lrs = {"grid": [0.01, 0.02, 0.03, 0.04, 0.05]}
    grid = {"train.global_batch_size": {"grid": [32, 33, 34, 36]},
            "scaling.num_workers": {"grid": [1, 2]}, "train.base_lr": lrs}
    with pytest.raises(ConfigError, match=r"\[tune.search_space trial "
                                          r"train.global_batch_size=33, scaling.num_workers=2, "
                                          r"train.base_lr=0.01\]"):
        check_trials(_cfg(grid))
    fine = {**grid, "train.global_batch_size": {"grid": [32, 34, 36, 38]}}
    checked = check_trials(_cfg(fine))
    assert len(checked) == 4 * 2 + 4 * 5 + 2 * 5
    assert {(c.train.global_batch_size, c.scaling.num_workers) for c in checked} == {
        (b, w) for b in (32, 34, 36, 38) for w in (1, 2)}
    monkeypatch.setattr(space, "MAX_CHECKED_COMBINATIONS", 30)
    assert len(check_trials(_cfg(fine))) == 4 + 2 + 5
    one_worker = {**fine, "train.global_batch_size": {"grid": [32, 33, 34, 36]},
                  "scaling.num_workers": {"grid": [1]}, "train.seed": {"grid": [0, 1, 2]}}
    for limit in (30, 59):  # 60 combinations: singles, pairs (59)
        monkeypatch.setattr(space, "MAX_CHECKED_COMBINATIONS", limit)
        checked = check_trials(_cfg(one_worker, "scaling.num_workers=2"))
        assert {c.scaling.num_workers for c in checked} == {1}
    one_key = {"train.base_lr": {"grid": [0.001 * i for i in range(1, 41)]}}
    assert len(check_trials(_cfg(one_key))) == 40  # one key: all its values, whatever the limit


def test_bad_search_space_exits_2_before_connecting(tmp_path, capsys, monkeypatch, data_dir):
    """In-process: `run_sweep` checks every trial's config before it joins a cluster; joining
    one fails this test instead."""
    import pipeline.launch

    def connect(*_, **__):
        raise AssertionError("the sweep joined a cluster: the search space was not refused")

    monkeypatch.setattr(pipeline.launch, "connect", connect)
    rc, _, err = cli_in_process(["tune", "--config", SWEEP, "--set",
                                 'tune.search_space={"train.global_batch_size": {"grid": [32, 40]}}',
                                 "--set", "train.micro_batch_size=16", "--out", str(tmp_path)],
                                capsys, monkeypatch)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert "train.global_batch_size=40" in line and "train.micro_batch_size=16" in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_sweep_without_its_tracking_server_exits_2_before_connecting(tmp_path, capsys,
                                                                      monkeypatch, data_dir):
    """A job carries on while MLflow is away (its run is created later); a sweep, read back
    from MLflow, is refused at once, before any cluster work and with nothing written."""
    import pipeline.launch
    from tests.conftest import free_port

    def connect(*_, **__):
        raise AssertionError("the sweep joined a cluster without its tracking server")

    monkeypatch.setattr(pipeline.launch, "connect", connect)
    uri = f"http://127.0.0.1:{free_port()}"
    rc, _, err = cli_in_process(["tune", "--config", SWEEP, "--set", f"tracking.uri={uri}",
                                 "--out", str(tmp_path)], capsys, monkeypatch)
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert f"tracking.uri={uri}: no MLflow server answers there" in line
    assert list(tmp_path.iterdir()) == []


def test_jobs_tune_is_the_cli_and_exits_2():
    """jobs/tune.py is the CLI with `tune` fixed, in a fresh interpreter as `ray job submit`
    runs it: bad input exits 2 with one line, before joining a cluster."""
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--config",
                          "no_such.yaml"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no such config file" in out.stderr


def test_trial_concurrency_fits_the_cluster():
    from pipeline.tune.space import trial_concurrency

    one = [_cfg({}, "scaling.num_workers=1")]
    two = [_cfg({}, "scaling.num_workers=2", "scaling.cpus_per_worker=1.5")]
    assert trial_concurrency({"CPU": 4.0}, one) == 4
    assert trial_concurrency({"CPU": 4.0}, one, cap=2) == 2
    assert trial_concurrency({"CPU": 7.0}, two) == 2  # 3 CPUs a trial
    assert trial_concurrency({"CPU": 2.0}, two) == 1  # never 0: Ray waits for the autoscaler
    gpu = [_cfg({}, "scaling.num_workers=2", "scaling.use_gpu=true")]
    assert trial_concurrency({"CPU": 64.0, "GPU": 4.0}, gpu) == 2
    # cluster.yaml before its GPU workers join: a head of no CPU, the autoscaler's maximum
    # 8 nodes of 8 CPUs and a GPU
    most = {"CPU": 64.0, "GPU": 8.0}
    assert trial_concurrency({"CPU": 0.0}, gpu, most=most) == 4
    assert trial_concurrency({"CPU": 0.0}, gpu, cap=3, most=most) == 3
    # a node group without a maximum (Ray: sys.maxsize): as many as the sweep has (run_sweep)
    unbounded = {"CPU": float(sys.maxsize), "GPU": float(sys.maxsize)}
    assert trial_concurrency({"CPU": 0.0}, gpu, most=unbounded) > 10**9
    from pipeline.launch import workers_problem

    assert workers_problem(gpu[0], {"CPU": 0.0}, [{"CPU": 0.0}], unbounded) is None
    # trials in their Tune actors: Tune reserves their resources and starts what fits (the
    # rest ask the autoscaler for nodes), so only tune.max_concurrent limits them
    assert trial_concurrency({"CPU": 0.0}, one, in_actors=True) is None
    assert trial_concurrency({"CPU": 2.0}, one, cap=8, in_actors=True) == 8


def test_final_epoch_asha_never_stops_at_the_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    from pipeline.tune.sweep import asha

    class Trial:
        def __init__(self, tid, config=None):
            self.trial_id, self.config = tid, config or {}

    s = asha(max_epochs=3)
    s.set_search_properties("val_accuracy", "max")
    good, bad, late = Trial("good"), Trial("bad"), Trial("late")
    short = Trial("short", {"train.epochs": 1})  # train.epochs swept: epoch 1 is its last
    for t in (good, bad, late, short):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.2}) == TrialScheduler.STOP
    assert s.on_trial_result(None, late, {"epoch": 3, "val_accuracy": 0.1}) == \
        TrialScheduler.CONTINUE
    assert s.on_trial_result(None, short, {"epoch": 1, "val_accuracy": 0.1}) == \
        TrialScheduler.CONTINUE  # as bad as `bad` at the same rung, but at its own last epoch


def test_final_epoch_asha_never_stops_the_result_that_reaches_max_steps():
    """A trial that train.max_steps ends at an epoch of a rung reports its last result there:
    ASHA must not stop it (a stop ends the trial as it logs its model), whether max_steps is
    the base config's or the trial's own; the same result short of max_steps is stopped."""
    from ray.tune.schedulers import TrialScheduler

    from pipeline.tune.sweep import asha

    class Trial:
        def __init__(self, tid, config=None):
            self.trial_id, self.config = tid, config or {}

    def rung_one(max_steps, trial_config, step):
        s = asha(max_epochs=9, max_steps=max_steps)
        s.set_search_properties("val_accuracy", "max")
        good, bad = Trial("good"), Trial("bad", trial_config)
        for t in (good, bad):
            s.on_trial_add(None, t)
        assert s.on_trial_result(None, good, {"epoch": 1, "step": 10, "val_accuracy": 0.9}) == \
            TrialScheduler.CONTINUE
        return s.on_trial_result(None, bad, {"epoch": 1, "step": step, "val_accuracy": 0.2})

    assert rung_one(None, {}, 20) == TrialScheduler.STOP
    assert rung_one(30, {}, 20) == TrialScheduler.STOP  # short of its max_steps
    assert rung_one(20, {}, 20) == TrialScheduler.CONTINUE  # the base config's max_steps
    assert rung_one(None, {"train.max_steps": 20}, 20) == TrialScheduler.CONTINUE  # its own
    assert rung_one(20, {"train.max_steps": None}, 20) == TrialScheduler.STOP  # its own: none


def test_asha_keeps_its_rungs_across_a_resume(tmp_path):
    """Tune saves no scheduler state: a resumed sweep's ASHA started with empty rungs, so a
    trial as bad as one it had stopped went on (its first result at a rung: no cutoff). The
    rungs and the stopped trials are kept beside the experiment's state and read back when the
    resumed sweep adds its trials (as Tune does, restored trials first)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pipeline.tune.sweep import asha

    storage = SimpleNamespace(experiment_fs_path=str(tmp_path))

    class Trial:
        def __init__(self, tid):
            self.trial_id, self.config, self.storage = tid, {}, storage

    def scheduler(*trials):
        s = asha(max_epochs=9)
        s.set_search_properties("val_accuracy", "max")
        for t in trials:
            s.on_trial_add(None, t)
        return s

    first = scheduler(good := Trial("good"), bad := Trial("bad"), Trial("later"), odd := Trial("odd"))
    assert first.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.9}) == \
        TrialScheduler.CONTINUE
    first.on_trial_result(None, odd, {"epoch": 1, "val_accuracy": math.nan})  # (kept as NaN)
    assert first.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.2}) == \
        TrialScheduler.STOP
    # ... interrupted; Tune's saved state missed bad's stop: both come back with another trial
    resumed = scheduler(Trial("good"), Trial("bad"), later := Trial("later"), Trial("odd"))
    assert str(resumed.rungs()) == str(first.rungs())  # (str: NaN != NaN)
    assert resumed.on_trial_result(None, later, {"epoch": 1, "val_accuracy": 0.3}) == \
        TrialScheduler.STOP  # a cutoff from good's 0.9 and bad's 0.2 (empty rungs: went on)
    assert resumed.on_trial_result(None, Trial("bad"), {"epoch": 1, "val_accuracy": 0.2}) == \
        TrialScheduler.STOP  # run again from its checkpoint: stopped again
    alone = Trial("later")  # counter-check: without the kept rungs the same result goes on
    alone.storage = None
    fresh = scheduler(alone)
    assert fresh.on_trial_result(None, alone, {"epoch": 1, "val_accuracy": 0.3}) == \
        TrialScheduler.CONTINUE


def test_a_restored_generator_takes_todays_limit_of_trials_at_a_time(tmp_path):
    """Tune restores its grid/random generator from the saved state, which holds the first
    run's limit; the sweep's generator takes the limit computed for the cluster of the resume
    (as Tune restores it: `restore_from_dir`), and a fresh one its own."""
    from pipeline.tune.resumable import Generator

    first = Generator(max_concurrent=4, random_state=0)
    first.save_to_dir(str(tmp_path), "s")
    try:
        Generator.limit_now = 1
        restored = Generator(max_concurrent=4, random_state=0)  # (as unpickled from tuner.pkl)
        restored.restore_from_dir(str(tmp_path))
        assert restored.max_concurrent == 1
        assert Generator(max_concurrent=4).max_concurrent == 4
    finally:
        Generator.limit_now = None


def test_the_critical_batch_sentence_names_failed_batches_and_a_missing_target():
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    df = pd.DataFrame({"train.global_batch_size": [32, 64], "steps_to_target": [400, 200]})
    said = critical_batch_sentence(critical_batch(df), None, 0.95, failed=[128, 256])
    assert said.endswith(" Every trial at batch size(s) 128, 256 failed.")
    assert "did not reach" not in said  # a failed trial is not one that missed the target
    # No target set: nothing is placed, and the sentence says why (not "too few reached").
    none = critical_batch_sentence(None, 95.4, None)
    assert none == ("No tune.target_accuracy is set, so steps to a target are not measured and "
                    "the critical batch is not placed. The gradient noise scale measured in the "
                    "trials is about 95 samples, a first estimate of it.")
    assert critical_batch_sentence(None, None, None, failed=[32]).endswith(
        "not placed. Every trial at batch size(s) 32 failed.")


def test_summary_table_leaves_missing_integers_blank():
    """Int64 columns (steps_to_target, stopped_at_epoch) hold pd.NA, not NaN: a blank cell."""
    df = pd.DataFrame({"trial_id": ["a", "b"], "steps_to_target": [40, None]})
    df["steps_to_target"] = df["steps_to_target"].astype("Int64")
    lines = summary_table(df).strip().splitlines()
    assert lines[2:] == ["| a | 40 |", "| b |  |"]


def test_summary_table_tells_small_swept_values_apart():
    """A log-uniform LR sweep's 1e-5 and 4e-5 (and 2.5e-4, which 4 decimals round; two draws
    apart in their 4th digit) keep their own digits: 4 significant ones below 0.01, else 4
    decimals, and none past 1,000."""
    df = pd.DataFrame({"train.base_lr": [1e-5, 4e-5, 0.00025, 1.2341e-5, 1.2362e-5, 0.0],
                       "val_accuracy": [0.98765, 0.5, 0.01, 0.0, 0.0, 0.0],
                       "samples": [1234.0] * 6})
    lines = summary_table(df, metric="none").strip().splitlines()
    assert lines[2:] == ["| 1e-05 | 0.9877 | 1234 |", "| 4e-05 | 0.5000 | 1234 |",
                         "| 0.00025 | 0.0100 | 1234 |", "| 1.234e-05 | 0.0000 | 1234 |",
                         "| 1.236e-05 | 0.0000 | 1234 |", "| 0.0000 | 0.0000 | 1234 |"]


def test_digits_train_rows_follow_the_split():
    """The helper the end-to-end tests derive step counts from agrees with the split rule:
    round(count x val_fraction) of each class held out."""
    from pipeline.data.datasets import make_digits

    labels = make_digits().column("label").to_numpy()
    held_out = sum(int(round(c * 0.2)) for c in np.bincount(labels))
    assert digits_train_rows(0.2, 0) == len(labels) - held_out
    assert digits_train_rows(0.2, 1) == digits_train_rows(0.2, 0)  # the seed picks, not counts


def test_critical_batch_recovers_the_papers_curve_and_needs_two_batch_sizes():
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    # S = S_min (1 + B_crit / B) with S_min = 50, B_crit = 200; a second rule's worse trials
    # at the same batches must not move the fit (the fewest steps per batch counts).
    good = [(b, 50 * (1 + 200 / b)) for b in (32, 64, 128, 256, 512)]
    worse = [(b, s * 1.7) for b, s in good]
    df = pd.DataFrame([{"train.global_batch_size": b, "steps_to_target": s}
                       for b, s in good + worse])
    fit = critical_batch(df)
    assert fit["verdict"] == "knee" and fit["missed"] == []
    assert fit["b_crit"] == pytest.approx(200.0) and fit["s_min"] == pytest.approx(50.0)
    assert "about 200" in critical_batch_sentence(fit, None, 0.95)
    # Perfect scaling everywhere (S x B constant) is a knee beyond the largest batch tried.
    perfect = pd.DataFrame({"train.global_batch_size": [32, 64], "steps_to_target": [400, 200]})
    beyond = critical_batch(perfect)  # S_min = 0: no knee within reach
    assert beyond["verdict"] == "beyond" and beyond["b_crit"] == math.inf
    assert beyond["largest"] == 64 and "at least about 64" in critical_batch_sentence(beyond, None, 0.95)
    # Steps that do not fall, or fall with a knee below the smallest batch tried: the
    # critical batch is at or below the smallest batch, never "about 11".
    flat = pd.DataFrame({"train.global_batch_size": [32, 64], "steps_to_target": [100, 100]})
    assert critical_batch(flat)["verdict"] == "flat"
    assert "at or below 32" in critical_batch_sentence(critical_batch(flat), None, 0.95)
    low = pd.DataFrame({"train.global_batch_size": [256, 512, 1024, 2048],
                        "steps_to_target": [100, 98, 97, 96.5]})
    below = critical_batch(low)
    assert below["verdict"] == "below" and below["b_crit"] < 256
    assert "at or below 256" in critical_batch_sentence(below, None, 0.95)
    # Batches that never reached the target are not points, and the sentence names them
    # instead of calling the largest that did "the largest tried".
    missing = pd.DataFrame({"train.global_batch_size": [32, 64, 128, 256, 512, 1024],
                            "steps_to_target": [400, 200, 100, 50, None, None]})
    fit_missing = critical_batch(missing)
    assert fit_missing["verdict"] == "beyond" and fit_missing["missed"] == [512, 1024]
    said = critical_batch_sentence(fit_missing, None, 0.95)
    assert "the largest batch that reached it" in said and "512, 1024 did not reach" in said
    assert critical_batch(df.iloc[:1])["verdict"] == "too_few"
    one = critical_batch_sentence(critical_batch(df.iloc[:1]), 120.0, 0.95)  # one size tried
    assert one.startswith("Only one batch size was tried (32): sweep train.global_batch_size")
    assert "120" in one
    short = critical_batch_sentence(critical_batch(missing.iloc[3:]), 120.0, 0.95)  # 256 reached
    assert short.startswith("Too few batch sizes reached val_accuracy >= 0.95") and "120" in short
    assert "512, 1024 did not reach" in short
    assert critical_batch(pd.DataFrame({"train.global_batch_size": [], "steps_to_target": []})) is None


def test_steps_and_samples_to_target_use_validations_within_epochs():
    from pipeline.tune.analysis import at_target, steps_to_target

    epochs = pd.DataFrame({"step": [20, 40], "val_accuracy": [0.9, 0.97], "samples": [640, 1280]})
    inner = pd.DataFrame({"step": [5, 10, 15, 25, 30], "val_accuracy": [0.5, 0.8, 0.85, 0.92, 0.96],
                          "samples": [160, 320, 480, 800, 960]})
    both = pd.concat([epochs, inner])
    assert steps_to_target(epochs, 0.95) == 40 and steps_to_target(both, 0.95) == 30
    assert at_target(both, 0.95, "samples") == 960.0
    gaps = pd.DataFrame({"step": [10, 20], "val_accuracy": [float("nan"), 0.99]})
    assert steps_to_target(gaps, 0.95) == 20


def test_which_trials_train_in_their_own_actor_and_what_they_reserve():
    from pipeline.tune.trial import every_trial_in_actor, runs_in_actor, trial_resources

    one = _cfg({}, "scaling.num_workers=1", "scaling.cpus_per_worker=2")
    assert runs_in_actor(one, {"train.base_lr": 0.1})
    assert trial_resources(one, {}) == {"CPU": 2.0}
    gpu = _cfg({}, "scaling.num_workers=1", "scaling.use_gpu=true")
    assert trial_resources(gpu, {}) == {"CPU": 1.0, "GPU": 1}
    # a worker group: the trial's function reserves no CPU, its TorchTrainer asks for workers
    for cfg, overrides in [(_cfg({}, "scaling.num_workers=2"), {}),
                           (one, {"data.val_fraction": 0.3}),  # its own ingest (Ray Data tasks)
                           # the small columns streamed ranks hold are the sweep config's
                           (one, {"batching.difficulty_column": "hardness"}),
                           (_cfg({}, "scaling.num_workers=1", "tune.trial_runner=worker_group"),
                            {})]:
        assert not runs_in_actor(cfg, overrides)
        assert trial_resources(cfg, overrides)["CPU"] == 0
    # Tune reuses trial actors, and retries failed trials, only when every trial trains in one
    assert every_trial_in_actor(_cfg({"train.base_lr": {"grid": [0.1, 0.2]}},
                                   "scaling.num_workers=1"))
    assert not every_trial_in_actor(_cfg({"data.val_fraction": {"grid": [0.1, 0.2]}},
                                       "scaling.num_workers=1"))
    assert not every_trial_in_actor(_cfg({"scaling.num_workers": {"grid": [1, 2]}},
                                       "scaling.num_workers=1"))
    assert not every_trial_in_actor(_cfg({}, "scaling.num_workers=2"))


def test_a_trial_keeps_its_two_newest_checkpoints_each_written_whole(tmp_path):
    from pipeline.tune.trial import keep_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    for epoch in (1, 2, 3, 2):  # 2 again: a restart re-reports it
        (src / "state.pt").write_text(f"epoch {epoch}")
        kept = keep_checkpoint(src, tmp_path / "run", epoch)
        assert kept.name == f"checkpoint_epoch_{epoch:05d}"
        assert (kept / "state.pt").read_text() == f"epoch {epoch}"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint_epoch_00002", "checkpoint_epoch_00003"]  # no temporary folder left


def test_ctrl_c_during_tunes_fit_is_its_graceful_stop_then_an_interrupt(monkeypatch):
    """`_tune_stops_on_ctrl_c` with Tune played by a SIGUSR1 handler (what `fit` installs):
    a Ctrl-C before Tune listens interrupts at once; once it listens, the first Ctrl-C is
    Tune's stop (SIGUSR1) and sets the event, the second interrupts; every handler and the
    environment are put back."""
    import os
    import signal

    from pipeline.tune.sweep import _tune_stops_on_ctrl_c

    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    tune_stops = []
    with _tune_stops_on_ctrl_c() as stopped:
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # Tune leaves SIGINT to us
        with pytest.raises(KeyboardInterrupt):  # Tune not listening yet
            signal.raise_signal(signal.SIGINT)
        assert not stopped.is_set()
        signal.signal(signal.SIGUSR1, lambda *_: tune_stops.append(1))  # Tune's fit starts
        signal.raise_signal(signal.SIGINT)
        assert stopped.is_set() and tune_stops == [1]  # Tune stops its own way, no exception
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C
            signal.raise_signal(signal.SIGINT)
        assert tune_stops == [1]
    assert {s: signal.getsignal(s) for s in before} == before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_the_package_hands_out_what_the_readme_names():
    """`from pipeline.tune import run_sweep, SweepInterrupted` (README: a stopped sweep raises
    it): each the sweep module's own, loaded when asked for."""
    import pipeline.tune as tune_pkg
    from pipeline.tune import SweepInterrupted, run_sweep
    from pipeline.tune.sweep import SweepInterrupted as own

    assert SweepInterrupted is own and issubclass(SweepInterrupted, KeyboardInterrupt)
    assert run_sweep.__module__ == "pipeline.tune.sweep"
    assert set(tune_pkg.__all__) >= {"SweepInterrupted", "run_sweep", "history"}


def test_random_search_draws_the_same_trials_on_every_run():
    """`tune.search: random` is seeded with `train.seed`: the same 4 draws twice (an unseeded
    generator drew others on every run of the sweep), other draws for another seed."""
    from ray.tune.experiment import Experiment

    from pipeline.tune.sweep import search_algorithm, search_space

    space = {"train.base_lr": {"loguniform": [0.001, 0.1]},
             "train.global_batch_size": {"grid": [32, 64, 128]}}

    def draws(*more: str) -> list[dict]:
        cfg = _cfg(space, "tune.search=random", "tune.num_samples=4", *more)
        alg = search_algorithm(cfg)
        alg.add_configurations([Experiment(name="draws", run=lambda c: None,
                                           config=search_space(cfg), num_samples=4)])
        out = []
        while (trial := alg.next_trial()) is not None:
            out.append(trial.config)
        return out

    first = draws()
    assert len(first) == 4 and len({d["train.base_lr"] for d in first}) == 4
    assert draws() == first and draws("train.seed=1") != first


def test_repeats_of_a_grid_that_would_train_the_same_weights_are_refused():
    from pipeline.tune.space import check_trials

    grid = {"train.global_batch_size": {"grid": [32, 64]}}
    with pytest.raises(ConfigError, match="tune.num_samples=3 repeats each grid point with the "
                                          "same seeds"):
        check_trials(_cfg(grid, "tune.num_samples=3"))


B, R, LR = "train.global_batch_size", "train.lr_scaling", "train.base_lr"


@pytest.mark.parametrize(("search", "space", "n", "refused"), [
    # sweep_digits' 3 x 3 drawn at random 20 times: 9 distinct configs, 11 repeats for certain
    ("random", {B: {"grid": [32, 128, 512]}, R: {"choice": ["none", "sqrt", "linear"]}}, 20,
     f"draws more trials than the 9 distinct combination(s) of {B}, {R}"),
    ("random", {B: {"grid": [32, 128, 512]}, R: {"choice": ["none", "sqrt", "linear"]}}, 9, None),
    ("grid", {B: {"grid": [32, 128]}, R: {"choice": ["none", "sqrt", "none"]}}, 3,
     f"draws more trials at each grid point than the 2 distinct combination(s) of {R}"),
    ("random", {B: {"grid": [32, 128]}, LR: {"uniform": [0.01, 0.1]}}, 20, None),  # drawn
])
def test_more_draws_than_distinct_configs_are_refused(search, space, n, refused):
    from pipeline.tune.space import check_trials

    cfg = _cfg(space, f"tune.search={search}", f"tune.num_samples={n}")
    if refused is None:
        check_trials(cfg)
        return
    with pytest.raises(ConfigError) as err:
        check_trials(cfg)
    assert str(err.value).startswith(f"config error: tune.num_samples={n} {refused}: some would "
                                     "train the same weights"), err.value


@pytest.mark.parametrize(("space", "extra", "why"), [
    ({"train.batch_size_min": {"grid": [8, 16]}}, [], "train.batch_size_schedule=constant"),
    ({"batching.num_views": {"grid": [2, 4]}}, [], "train.loss=cross_entropy"),  # (2: default)
    ({"batching.options.c0": {"grid": [0.1, 0.5]}}, [], "batching.strategy=random"),
    ({"train.noise_scale_ema": {"grid": [0.9, 0.99]}, "train.noise_scale": {"grid": [True,
                                                                              False]}},
     [], None),  # the trials that measure the noise scale use it
    ({"batching.options.selection_pressure": {"grid": [10.0, 100.0]},
      "batching.strategy": {"grid": ["random", "hard_mining"]}}, [], None),  # hard mining's do
])
def test_a_swept_key_no_trial_uses_is_refused(space, extra, why):
    """A sweep of a setting every trial ignores (a schedule's minimum under a constant batch,
    the views of a loss without them, another strategy's option) trained the same weights in
    each trial without a word."""
    from pipeline.tune.space import check_trials

    cfg = _cfg(space, *extra)
    if why is None:
        check_trials(cfg)
        return
    key = next(iter(space))
    with pytest.raises(ConfigError, match=rf"tune.search_space.{key}: no trial uses it \({why}\)"):
        check_trials(cfg)


def test_a_sweep_with_nothing_to_vary_is_refused():
    """`python -m pipeline tune` on a config without a search space ran a one-trial "sweep"
    without a word."""
    from pipeline.tune.space import check_trials

    with pytest.raises(ConfigError, match="tune.search_space is empty"):
        check_trials(load_config(REPO / "jobs" / "configs" / "digits.yaml"))


def test_a_trial_is_filled_for_its_own_overrides_not_the_sweeps(tmp_path):
    """What `resolve` fills in (the step cost from a throughput file, for the worker count;
    `model.name: auto`; an embedded dataset's columns) is filled again for each trial from the
    config as given: a 1-worker trial got the 2-worker step cost, an `auto` trial the name
    `auto` (which no worker can build), a `data.name: sequences` trial digits' feature column
    (refused before the sweep, though each dataset trains as a job). The check before the sweep
    and the trial itself agree, and the best trial's config reloads."""
    from pipeline.config import changed_keys
    from pipeline.data.datasets import resolve
    from pipeline.tune.space import check_trials, trial_config

    fbs = tmp_path / "find_batch_size.json"
    fbs.write_text(json.dumps({"step_cost_per_worker": 10.0}))
    cfg, info = resolve(load_config(None, [
        f"train.batch_size_throughput={fbs}", "train.batch_size_schedule=adaptive",
        "train.batch_size_min=32", "train.micro_batch_size=16",
        'tune.search_space={"scaling.num_workers": {"grid": [1, 2]}, '
        '"model.name": {"grid": ["mlp", "auto"]}}']))
    assert (cfg.scaling.num_workers, cfg.model.name, cfg.train.batch_size_step_cost) == (
        2, "digits_cnn", 20.0)
    checked = [(c.scaling.num_workers, c.model.name, c.train.batch_size_step_cost)
               for c in check_trials(cfg, info)]
    assert checked == [(1, "mlp", 10.0), (1, "digits_cnn", 10.0), (2, "mlp", 20.0),
                       (2, "digits_cnn", 20.0)]
    for workers, name, cost in checked:
        given = {"scaling.num_workers": workers, "model.name": "auto" if name == "digits_cnn" else name}
        trial, trial_info = trial_config(cfg, info, given)
        assert (trial.model.name, trial.train.batch_size_step_cost) == (name, cost)
        assert trial_info is info  # the sweep's data: not read again
        assert changed_keys(load_config(None, [f"{k}={v}" for k, v in _flat(trial).items()]).to_dict(),
                            trial.to_dict()) == []  # (a step cost from the file reloads)

    cfg, info = resolve(load_config(None, [
        'tune.search_space={"data.name": {"grid": ["digits", "sequences"]}}']))
    seq = [c for c in check_trials(cfg, info) if c.data.name == "sequences"][0]
    assert (seq.model.name, seq.data.feature_column, seq.data.sequence_column) == (
        "seq_transformer", None, "tokens")
    trial, trial_info = trial_config(cfg, info, {"data.name": "sequences"})
    assert trial.to_dict() == seq.to_dict() and trial_info.uri != info.uri


def _flat(cfg) -> dict:
    from pipeline.config import flatten

    return {k: json.dumps(v) if isinstance(v, dict | list) else ("null" if v is None else v)
            for k, v in flatten(cfg.to_dict()).items()}


def test_a_range_is_checked_below_its_upper_bound_which_tune_never_draws():
    """`{uniform: [0.8, 1.0]}` draws momenta in [0.8, 1.0): every one is valid (< 1), so the
    sweep is not refused for the bound itself; a range above the key's limit still is."""
    from pipeline.data.datasets import resolve
    from pipeline.tune.space import check_trials

    cfg, info = resolve(load_config(None, [
        'tune.search_space={"train.momentum": {"uniform": [0.8, 1.0]}}']))
    momenta = [c.train.momentum for c in check_trials(cfg, info)]
    assert momenta[:2] == [0.8, 0.9] and 0.99 < momenta[2] < 1.0
    with pytest.raises(ConfigError, match="train.momentum"):
        check_trials(*resolve(load_config(None, [
            'tune.search_space={"train.momentum": {"uniform": [0.8, 1.5]}}'])))


def test_a_trial_fills_its_step_cost_without_the_throughput_file(tmp_path, monkeypatch):
    """A trial runs in Tune's trial folder (another working directory), maybe on another
    node: the throughput file the sweep's config names (relative, here) is read once by the
    driver, and each trial's step cost comes from that reading."""
    from pipeline.data.datasets import resolve
    from pipeline.tune.space import trial_config, with_absolute_paths

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fbs.json").write_text(json.dumps({"step_cost_per_worker": 7.0}))
    monkeypatch.chdir(tmp_path)
    cfg, info = resolve(load_config(None, [
        "train.batch_size_throughput=runs/fbs.json", "train.batch_size_schedule=adaptive",
        "train.batch_size_min=32", "train.micro_batch_size=16",
        'tune.search_space={"scaling.num_workers": {"grid": [1, 2]}}']))
    given = with_absolute_paths(cfg)  # as run_sweep gives it to the trials (from the driver)
    monkeypatch.chdir(tmp_path / "runs")  # (Tune's trial folder: the relative path is not there)
    costs = [trial_config(cfg, info, {"scaling.num_workers": w})[0].train.batch_size_step_cost
             for w in (1, 2)]
    assert costs == [7.0, 14.0]
    # its paths made absolute, on a node without the file: the driver's reading still serves
    (tmp_path / "runs" / "fbs.json").unlink()
    assert given.train.batch_size_throughput == str(tmp_path / "runs" / "fbs.json")
    assert trial_config(given, info, {"scaling.num_workers": 2})[0].train.batch_size_step_cost \
        == 14.0


def test_seeds_are_repeats_the_critical_batch_takes_their_median():
    """Trials that differ only in a seed are one setting: its steps are the median over the
    seeds, a seed that missed counting as never (the fewest over seeds picked the luckiest
    data order). The README's three-order sweep (fixed batches, steps to 0.95 per
    batching.seed): 128 -> 50, 40, 40; 256 -> 35, 30, 30; 512 -> 24 and twice not reached.
    Medians 40 at 128 and 30 at 256, and 512 missed (one order of three): the line through
    (1/128, 40) and (1/256, 30) is S = 20 (1 + 128 / B), a knee at 128 (the fewest per batch,
    24 at 512, moved it). Over another swept key (the base LR) the best setting still counts."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    rows = [(128, 1, 50), (128, 2, 40), (128, 3, 40), (256, 1, 35), (256, 2, 30),
            (256, 3, 30), (512, 1, 24), (512, 2, None), (512, 3, None)]
    df = pd.DataFrame([{"train.global_batch_size": b, "batching.seed": s, "steps_to_target": n}
                       for b, s, n in rows])
    fit = critical_batch(df)
    assert fit["seeds"] == ["batching.seed"] and fit["missed"] == [512] and fit["points"] == 2
    assert fit["verdict"] == "knee"
    assert fit["b_crit"] == pytest.approx(128.0) and fit["s_min"] == pytest.approx(20.0)
    said = critical_batch_sentence(fit, None, 0.95)
    assert said.endswith("Batch size(s) 512 did not reach val_accuracy >= 0.95 in the epochs "
                         "they trained (in half or more of their seeds): their steps to it are "
                         "not measured.")
    lucky = critical_batch(df.drop(columns=["batching.seed"]))  # read as settings: the fewest
    assert lucky["missed"] == [] and lucky["points"] == 3
    # A second base LR, worse at every batch and seed, does not move the points.
    worse = df.assign(**{"train.base_lr": 0.1}, steps_to_target=df["steps_to_target"] * 2)
    both = critical_batch(pd.concat([df.assign(**{"train.base_lr": 0.05}), worse]))
    assert both["b_crit"] == pytest.approx(128.0) and both["missed"] == [512]
    # Every setting drawn once (a random search: the LR differs in every trial): no repeats,
    # the fewest per batch, and the sentence claims nothing of seeds.
    drawn = df.assign(**{"train.base_lr": [0.01 * (i + 1) for i in range(len(df))]})
    once = critical_batch(drawn)
    assert once["seeds"] == [] and once["missed"] == [] and once["points"] == 3
    assert "seeds" not in critical_batch_sentence(once, None, 0.95)


def test_the_final_accuracy_plot_keeps_early_stopped_trials_off_its_lines(tmp_path, monkeypatch):
    """A trial ASHA stopped at its second epoch has no final accuracy: it is not a point of the
    "same epoch budget" line, unless nothing else trained that batch -- then an open marker of
    its own, named as such."""
    figures = []
    save = analysis._save
    monkeypatch.setattr(analysis, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    df = pd.DataFrame({"train.global_batch_size": [32, 32, 128, 512],
                       "train.lr_scaling": ["linear"] * 4,
                       "status": ["TERMINATED", "EARLY_STOPPED", "TERMINATED", "EARLY_STOPPED"],
                       "val_accuracy": [0.90, 0.95, 0.97, 0.60]})
    accuracy_vs_batch_plot(df, tmp_path / "acc.png")
    assert _lines(figures[0]) == [("lr_scaling=linear", [32, 128], [0.90, 0.97]),
                                  ("stopped early (ASHA): its last epoch", [512], [0.60])]


def _curve(to_target, **columns):
    return pd.DataFrame({"train.global_batch_size": [32, 64, 128, 256, 512][:len(to_target)],
                         "steps_to_target": to_target, **columns})


def test_the_knee_is_fitted_to_relative_errors_not_set_by_the_smallest_batches():
    """Steps halve up to 128 and stop falling: unweighted, the line through (1/B, S) is set by
    the small batches' large counts and puts the knee at 215; fitted to relative errors
    (weights 1/S) at 128, where the curve turns. On the paper's own curve both are exact."""
    from pipeline.tune.analysis import critical_batch

    fit = critical_batch(_curve([200, 100, 50, 50, 50]))
    assert fit["verdict"] == "knee" and fit["b_crit"] == pytest.approx(128.0, abs=1.0)
    exact = critical_batch(_curve([50 * (1 + 100 / b) for b in (32, 64, 128, 256, 512)]))
    assert exact["b_crit"] == pytest.approx(100.0) and exact["s_min"] == pytest.approx(50.0)
    assert exact["rough"] is None


def test_steps_that_stop_falling_at_the_largest_batches_are_not_called_beyond():
    """The line puts the knee past 512 (the small batches scale perfectly), but from 256 to
    512 the steps did not fall: not "more workers still buy fewer steps there"."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    fit = critical_batch(_curve([400, 200, 100, 50, 50]))
    assert fit["verdict"] == "levels_off" and fit["levels_at"] == 256
    assert fit["last_saving"] == (256, 512, 0.0)
    said = critical_batch_sentence(fit, None, 0.95)
    assert said == ("Steps to val_accuracy >= 0.95 fall with the batch up to about 256, then "
                    "little: from 256 to 512 they fall by only 0% (perfect scaling: 50%). The "
                    "critical batch is about 256: beyond it, more workers buy few steps.")
    # A last doubling that saves what a knee at 512 would (a third: S_512 / S_256 = 2/3) or
    # more is still "beyond".
    assert critical_batch(_curve([400, 200, 100, 60, 40]))["verdict"] == "beyond"
    assert critical_batch(_curve([400, 200, 100, 60, 41]))["verdict"] == "levels_off"


def test_a_knee_just_past_the_largest_batch_is_said_as_such_not_as_proportional_steps():
    """100 steps at 32 and 66 at 64: a third fewer, not half. The line's knee, 68 (by hand:
    100 = S (1 + K/32), 66 = S (1 + K/64) give K = 64 x 34 / 32 = 68), is just past 64, so
    the critical batch is at least 64 -- but the steps did not "keep falling about in
    proportion to the batch"; the sentence gives the saving and the fitted knee."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    fit = critical_batch(pd.DataFrame({"train.global_batch_size": [32, 64],
                                       "steps_to_target": [100, 66]}))
    assert fit["verdict"] == "beyond" and fit["b_crit"] == math.inf
    assert fit["b_crit_fit"] == pytest.approx(68.0)
    assert fit["last_saving"] == (32, 64, pytest.approx(0.34))
    said = critical_batch_sentence(fit, None, 0.95)
    assert said == ("Steps to val_accuracy >= 0.95 fall with the batch up to 64, the largest "
                    "batch that reached it (from 32 to 64 by 34%; perfect scaling: 50%), and a "
                    "fit over 2 batch sizes puts the knee near 68, past them: the critical "
                    "batch is at least about 64, and more workers still buy some fewer steps "
                    "there.")
    assert "in proportion" not in said
    # perfect scaling: no finite knee, "in proportion" as before
    perfect = critical_batch(pd.DataFrame({"train.global_batch_size": [32, 64],
                                           "steps_to_target": [400, 200]}))
    assert perfect["b_crit_fit"] == math.inf
    assert "keep falling about in proportion" in critical_batch_sentence(perfect, None, 0.95)


def test_a_batch_that_trained_past_the_largests_count_without_reaching_it_is_evidence():
    """512 trained 60 steps, more than the 35 that 256 needed, and never reached the target:
    its steps to it are more than 60, so the steps stopped falling -- not "not measured, at
    least 256". Had it trained only 30 steps, it would say nothing."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    over = critical_batch(_curve([280, 140, 70, 35, None], steps=[880, 440, 220, 110, 60]))
    assert over["verdict"] == "levels_off" and over["overrun"] == (512, 60, 35.0)
    assert over["levels_at"] == 256 and over["missed"] == [512]
    assert ("batch 512 trained 60 steps without reaching it, more than the 35 batch 256 "
            "needed" in critical_batch_sentence(over, None, 0.95))
    short = critical_batch(_curve([280, 140, 70, 35, None], steps=[880, 440, 220, 110, 30]))
    assert short["verdict"] == "beyond"


def test_a_knee_says_how_far_validation_spacing_moves_it_and_when_the_line_fits_badly():
    """Steps to the target are counted to the first validation that reached it; the crossing
    lies after the validation before. The knee of each bound is given as a range. A point 46%
    off the line is named. Doubling from B_crit costs 1.5 times the samples (2 E_min ->
    3 E_min under S = S_min (1 + B_crit / B)), not twice."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    upper = [50 * (1 + 100 / b) for b in (32, 64, 128, 256)]  # knee 100 exactly
    low = [u - 60 * 32 / b for u, b in zip(upper, (32, 64, 128, 256), strict=True)]  # an epoch of 1,920
    fit = critical_batch(_curve(upper, steps_before_target=low))
    assert fit["verdict"] == "knee" and fit["b_crit"] == pytest.approx(100.0)
    lo, hi = fit["b_crit_range"]
    assert hi == pytest.approx(100.0) and lo < 90  # (50 + 1,920 / B: S_min 50, B_crit 61.6)
    assert lo == pytest.approx(critical_batch(_curve(low))["b_crit"])
    said = critical_batch_sentence(fit, None, 0.95)
    assert f"about 100 ({lo:.0f} to 100 for the target crossed anywhere between validations;" in said
    assert "for 1.5 times the samples." in said
    rough = critical_batch(_curve([100, 40, 70, 35]))
    assert rough["verdict"] == "knee" and rough["rough"][:2] == (128, 70.0)
    assert (f"The line fits roughly: it puts batch 128 at {rough['rough'][2]:.0f} steps, where "
            "70 were measured." in critical_batch_sentence(rough, None, 0.95))


def test_one_config_trained_twice_counts_once_and_a_negative_noise_scale_is_no_estimate():
    """A random search can draw the same (batch, seed) twice: one run, not two seeds (with
    [40, 40, never] the median said 64 reached the target in 1 of 2 distinct orders)."""
    from pipeline.tune.analysis import critical_batch, critical_batch_sentence

    df = pd.DataFrame({"train.global_batch_size": [32, 32, 64, 64, 64],
                       "batching.seed": [0, 1, 0, 0, 1],
                       "steps_to_target": [80, 90, 40, 40, None]})
    assert critical_batch(df)["missed"] == [64]
    fit = critical_batch(_curve([100, 40]))
    assert "noise" not in critical_batch_sentence(fit, -3.4, 0.95)
    assert "about 3 samples" in critical_batch_sentence(fit, 3.4, 0.95)


def test_the_steps_plot_takes_seeds_at_their_median_and_leaves_failed_trials_out():
    from pipeline.tune.analysis import _best_per_point

    df = pd.DataFrame({"train.global_batch_size": [32, 32, 32, 128, 128, 128, 512],
                       "batching.seed": [1, 2, 3, 1, 2, 3, 1],
                       "steps_to_target": [100, 110, 120, 30, 90, 95, 20],
                       "val_accuracy": [0.9, 0.91, 0.92, 0.95, 0.9, 0.91, 0.4],
                       "status": ["TERMINATED"] * 6 + ["ERROR"]})
    steps = _best_per_point(df, "steps_to_target", best="min", rule="train.lr_scaling")
    assert steps[["train.global_batch_size", "steps_to_target"]].values.tolist() == [[32, 110],
                                                                                     [128, 90]]
    acc = _best_per_point(df, "val_accuracy", best="max", rule="train.lr_scaling")
    assert acc["val_accuracy"].tolist() == [0.91, 0.91]  # no batch 512: it failed


def test_steps_before_target_bound_the_crossing():
    from pipeline.tune.analysis import steps_before_target

    h = pd.DataFrame({"step": [5, 10, 15, 20], "val_accuracy": [0.5, None, 0.8, 0.97]})
    assert steps_before_target(h, 0.9) == 16 and steps_before_target(h, 0.8) == 6
    assert steps_before_target(h, 0.4) == 1 and steps_before_target(h, 0.99) is None


def test_a_trial_that_reads_its_own_data_finds_a_relative_path_from_tunes_trial_folder(
        tmp_path, monkeypatch):
    """A swept `data.split_seed` (a seed key the report takes medians over) or `data.path` makes
    each trial resolve its own data, in Tune's trial folder: a relative path passed the
    driver's checks and then failed in every trial ("data.path does not exist"). The sweep
    gives its trials the paths made absolute where it started."""
    import pyarrow.parquet as pq

    from pipeline.data.datasets import make_digits, resolve
    from pipeline.tune.space import check_trials, trial_config, with_absolute_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "trial").mkdir()
    for name in ("a", "b"):
        pq.write_table(make_digits(), tmp_path / "d" / f"{name}.parquet")
    monkeypatch.chdir(tmp_path)
    for space in ('{"data.split_seed": {"grid": [0, 1]}}',
                  '{"data.path": {"grid": ["d/a.parquet", "d/b.parquet"]}}'):
        cfg, info = resolve(load_config(None, [
            "data.path=d/a.parquet", "data.feature_column=features", f"tune.search_space={space}"]))
        assert len(check_trials(cfg, info)) == 2
        given = with_absolute_paths(cfg)  # what run_sweep hands to the trials
        key, values = next(iter(given.tune.search_space.items()))
        monkeypatch.chdir(tmp_path / "trial")
        for value in values["grid"]:
            trial, trial_info = trial_config(given, info, {key: value})
            assert Path(trial_info.uri).parent == tmp_path / "d"
        monkeypatch.chdir(tmp_path)


def test_the_reports_best_config_survives_a_best_trials_data_gone_unreadable(
        tmp_path, monkeypatch, capsys):
    """The report fills the best trial's config for its data: a swept `data.path` is read
    again for that, after every trial has run. A file gone by then (or a store's blip) made
    the sweep FAILED without its result.json; now the config as given with the trial's
    overrides, and one warning line naming the file."""
    import pyarrow.parquet as pq

    from pipeline.data.datasets import make_digits, resolve
    from pipeline.tune.report import best_config
    from pipeline.tune.space import with_absolute_paths

    (tmp_path / "d").mkdir()
    for name in ("a", "b"):
        pq.write_table(make_digits(), tmp_path / "d" / f"{name}.parquet")
    monkeypatch.chdir(tmp_path)
    cfg, info = resolve(load_config(None, [
        "data.path=d/a.parquet", "data.feature_column=features",
        'tune.search_space={"data.path": {"grid": ["d/a.parquet", "d/b.parquet"]}}']))
    cfg = with_absolute_paths(cfg)
    b = str(tmp_path / "d" / "b.parquet")
    filled = best_config(cfg, info, {"data.path": b})
    assert filled.data.path == b and filled.model.name == "mlp"  # (auto, filled for its data)
    capsys.readouterr()
    (tmp_path / "d" / "b.parquet").unlink()
    given = best_config(cfg, info, {"data.path": b})
    assert given.data.path == b and given.model.name == "auto"  # as configured
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[pipeline] warning: the best trial's config could not be filled "
                           "for its data again") and "b.parquet" in line and line.endswith(
                               "result.json gives it as configured")


def test_grid_values_are_taken_as_their_keys_type_so_a_repeat_is_seen():
    """YAML 1.1 reads `1e-4` (no point) as text; the config reads it as 0.0001: [1e-4, 0.0001]
    lists one LR twice (two trials of the same weights), refused as such."""
    from pipeline.data.datasets import resolve
    from pipeline.tune.space import check_trials, parse_search_space

    cfg = load_config(None, ['tune.search_space={"train.base_lr": {"grid": ["1e-4", 0.001]}}'])
    assert parse_search_space(cfg)["train.base_lr"] == ("grid", [0.0001, 0.001])
    with pytest.raises(ConfigError, match=r"train.base_lr lists 0.0001 more than once"):
        check_trials(*resolve(load_config(None, [
            'tune.search_space={"train.base_lr": {"grid": ["1e-4", 0.0001]}}'])))
    # also a key under a mapping (batching.options, model.kwargs), which the config holds whole
    mining = 'tune.search_space={"batching.options.selection_pressure": {"grid": ["1e2", 100.0]}}'
    with pytest.raises(ConfigError, match=r"selection_pressure lists 100.0 more than once"):
        check_trials(*resolve(load_config(None, ["batching.strategy=hard_mining", mining])))


def test_a_swept_dict_valued_key_is_a_setting_of_its_own_in_the_analysis(tmp_path):
    """`model.kwargs` swept as a whole: the table holds dicts, which the analysis compares as
    text (its de-duplication raised "unhashable type: 'dict'" after every trial had trained)."""
    from pipeline.tune.analysis import critical_batch

    df = pd.DataFrame({"train.global_batch_size": [32, 64, 32, 64],
                       "model.kwargs": [{"hidden": 8}, {"hidden": 8}, {"hidden": 16},
                                        {"hidden": 16}],
                       "steps_to_target": [100, 50, 90, 60],
                       "val_accuracy": [0.9] * 4, "status": ["TERMINATED"] * 4})
    assert critical_batch(df)["points"] == 2
    steps_vs_batch_plot(df, tmp_path / "s.png", target=0.9)
    accuracy_vs_batch_plot(df, tmp_path / "a.png")


def test_a_sweep_json_of_before_absolute_paths_still_resumes(tmp_path, monkeypatch):
    """A sweep.json written with the config's relative paths (before the sweep made them
    absolute) is compared as the sweep would now give it, not refused as "differs in
    data.path"; another path is still refused."""
    from pipeline.tune.space import with_absolute_paths
    from pipeline.tune.sweep import _load_state

    monkeypatch.chdir(tmp_path)
    sets = ["data.path=d/a.parquet", 'tune.search_space={"train.base_lr": {"grid": [0.1, 0.2]}}']
    old = load_config(None, sets)
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "config": old.to_dict()}))
    assert _load_state(tmp_path / "sweep.json", with_absolute_paths(old))["name"] == "s"
    other = with_absolute_paths(load_config(None, [*sets, "data.path=d/b.parquet"]))
    with pytest.raises(ConfigError, match="differs from the sweep's in data.path"):
        _load_state(tmp_path / "sweep.json", other)


@pytest.mark.parametrize(("config", "said"), [
    ("sweep_digits.yaml", True),  # a constant batch in every trial
    ("sweep_batch_schedule.yaml", False),  # its warmup and adaptive trials use it
])
def test_a_sweep_notes_a_setting_no_trial_uses(config, said, capsys, monkeypatch, data_dir):
    """`tune` says what `train` says of a setting left unused -- where no trial uses it (a
    schedule's minimum under a constant batch), not where some trials do."""
    import types

    fake = types.ModuleType("pipeline.tune.sweep")
    fake.SweepInterrupted = type("SweepInterrupted", (KeyboardInterrupt,), {})
    fake.run_sweep = lambda *a, **k: pd.DataFrame()
    fake.print_sweep = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "pipeline.tune.sweep", fake)  # (no Ray: the sweep itself)
    rc, out, err = cli_in_process(["tune", "--config", str(REPO / "jobs" / "configs" / config),
                                   "--set", "train.batch_size_min=16"], capsys, monkeypatch)
    assert rc == 0, err
    note = "note: train.batch_size_min (train.batch_size_schedule=constant) is set but no trial"
    assert (note in out) == said, out


def test_a_trial_meeting_bad_input_keeps_it_and_its_retry_fails_at_once(tmp_path, monkeypatch):
    """A trial whose config is bad input (a combination of swept keys past the sweep's checks,
    data changed since) fails with the culprit's line, kept in its fatal.json as a worker keeps
    its own: Tune's retry of the trial fails on it at once, without building the trial or
    reading its data again (a deterministic input error is never retried)."""
    from ray import tune

    from pipeline.data.datasets import resolve
    from pipeline.tune import space, sweep

    class Context:
        def get_trial_id(self):
            return "trial_1"

    monkeypatch.setattr(tune, "get_context", lambda: Context())
    cfg, info = resolve(load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml", []))
    bad = {"train.global_batch_size": 3, "scaling.num_workers": 2}
    kwargs = dict(base=cfg.to_dict(), info=info, root=str(tmp_path), parent_run_id="p",
                  sweep="s", table_refs=None)
    with pytest.raises(ConfigError, match="global_batch_size=3 is not divisible") as first:
        sweep._run_trial(bad, **kwargs)
    record = json.loads((tmp_path / "trial_1" / "fatal.json").read_text())
    assert record == {"kind": "input", "message": str(first.value), "peer": False}

    def built(*_a, **_k):
        raise AssertionError("the trial was built again")

    monkeypatch.setattr(space, "trial_config", built)
    with pytest.raises(ConfigError) as again:
        sweep._run_trial(bad, **kwargs)
    assert str(again.value) == str(first.value)
