"""Tune sweeps: the analysis functions on hand-made frames (pure), the search space and
concurrency rules (no cluster), and one real sweep on the session's Ray cluster logging to the
real MLflow server -- ASHA early stopping, a failing trial, resume, the parent's artifacts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.tune.analysis import (
    accuracy_vs_batch_plot,
    steps_to_target,
    steps_vs_batch_plot,
    summary_table,
)
from tests.conftest import REPO, job_status, run_cli, submit_job
from tests.mlflow_ui import browser_problem, open_experiment

PNG = b"\x89PNG"
BAD_MODEL = "import:os:no_such_model"


# -- analysis: pure ------------------------------------------------------------------------------
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


def test_plots_are_written(tmp_path):
    import matplotlib

    df = _trials()
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for a notebook's inline backend: the plots must keep it
    for fn, name in ((accuracy_vs_batch_plot, "acc.png"), (steps_vs_batch_plot, "steps.png")):
        p = fn(df, tmp_path / name)
        assert p.read_bytes()[:4] == PNG and p.stat().st_size > 5000
    # Nothing to draw (every trial failed): still a file, saying so.
    empty = df.assign(val_accuracy=math.nan, steps_to_target=None)
    assert accuracy_vs_batch_plot(empty, tmp_path / "e1.png").read_bytes()[:4] == PNG
    assert steps_vs_batch_plot(empty, tmp_path / "e2.png", target=0.9).read_bytes()[:4] == PNG
    assert matplotlib.get_backend() == "pdf"
    matplotlib.use(before)


def test_summary_table_is_markdown_best_first():
    table = summary_table(_trials(), ["train.global_batch_size", "train.lr_scaling",
                                      "val_accuracy"])
    lines = table.strip().splitlines()
    assert lines[0] == "| train.global_batch_size | train.lr_scaling | val_accuracy |"
    assert lines[1] == "|---|---|---|"
    assert len(lines) == 2 + 7
    assert lines[2].endswith("| 0.9700 |") and lines[-1].endswith("|  |")  # NaN last, blank


# -- search space and concurrency: no cluster -----------------------------------------------------
def _cfg(space: dict, *sets: str):
    return load_config(REPO / "jobs" / "configs" / "sweep_digits.yaml",
                       [f"tune.search_space={json.dumps(space)}", *sets])


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
    random = search_space(_cfg({"train.global_batch_size": {"grid": [32, 128]}},
                               "tune.search=random"))
    assert random["train.global_batch_size"].categories == [32, 128]


def test_optuna_search_suggests_points_of_the_space_reproducibly():
    from pipeline.tune.sweep import search_algorithm, search_space

    space = {"train.global_batch_size": {"grid": [32, 128]},
             "train.base_lr": {"loguniform": [1e-3, 1e-1]}}
    assert search_algorithm(_cfg(space)) is None  # grid: Tune's own generator
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

    from pipeline.tune.sweep import check_trials

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
    from pipeline.tune.sweep import check_trials

    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.").replace("[", r"\[")):
        check_trials(_cfg(space, "scaling.num_workers=2"))


def test_bad_search_space_exits_2_with_one_line(tmp_path):
    out = run_cli("tune", "--config", str(REPO / "jobs" / "configs" / "sweep_digits.yaml"),
                  "--set", 'tune.search_space={"train.global_batch_size": {"grid": [32, 40]}}',
                  "--set", "train.micro_batch_size=16", "--out", str(tmp_path), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.global_batch_size=40" in lines[0]
    assert not (tmp_path / "ray_results").exists()  # failed before any cluster work


def test_trial_concurrency_fits_the_cluster():
    from pipeline.tune.sweep import trial_concurrency

    one = [_cfg({}, "scaling.num_workers=1")]
    two = [_cfg({}, "scaling.num_workers=2", "scaling.cpus_per_worker=1.5")]
    assert trial_concurrency({"CPU": 4.0}, one) == 4
    assert trial_concurrency({"CPU": 4.0}, one, cap=2) == 2
    assert trial_concurrency({"CPU": 7.0}, two) == 2  # 3 CPUs a trial
    assert trial_concurrency({"CPU": 2.0}, two) == 1  # never 0: Ray waits for the autoscaler
    gpu = [_cfg({}, "scaling.num_workers=2", "scaling.use_gpu=true")]
    assert trial_concurrency({"CPU": 64.0, "GPU": 4.0}, gpu) == 2


def test_final_epoch_asha_never_stops_at_the_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    from pipeline.tune.sweep import asha

    class Trial:
        def __init__(self, tid):
            self.trial_id = tid

    s = asha(max_epochs=3)
    s.set_search_properties("val_accuracy", "max")
    good, bad, late = Trial("good"), Trial("bad"), Trial("late")
    for t in (good, bad, late):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.9}) == "CONTINUE"
    assert s.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.2}) == \
        TrialScheduler.STOP
    assert s.on_trial_result(None, late, {"epoch": 3, "val_accuracy": 0.1}) == \
        TrialScheduler.CONTINUE


# -- one real sweep ------------------------------------------------------------------------------
EPOCHS = 3
GOOD_LR, TINY_LR = 0.025, 0.00002
# Four trials, two at a time, in Tune's grid order (first key fastest): [cnn, good LR] and
# [bad model, good LR] start together; [cnn, tiny LR] starts when one of them has ended, so it
# reaches epoch 1 a whole trial start-up after the good-LR trial recorded its epoch-1 accuracy
# there: ASHA (one rung, at epoch 1) must stop it. The bad model fails at import, twice.
SPACE = {"model.name": {"grid": ["digits_cnn", BAD_MODEL]},
         "train.base_lr": {"grid": [GOOD_LR, TINY_LR]}}


@pytest.fixture(scope="module")
def sweep(ray_cluster, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "sweep_digits.yaml").read_text())
    cfg["train"].update(epochs=EPOCHS, warmup_epochs=0)  # global batch 32 = base batch
    cfg["tune"] = {"search_space": SPACE, "scheduler": "asha", "metric": "val_accuracy",
                   "mode": "max", "max_concurrent": 2, "target_accuracy": 0.5}
    cfg["tracking"] = {"uri": mlflow_server, "experiment": "test-sweep", "log_model": False}
    (root / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "out"
    proc = run_cli("tune", "--config", str(root / "sweep.yaml"), "--out", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"out": out, "config": root / "sweep.yaml", "proc": proc, "uri": mlflow_server,
            "result": json.loads((out / "result.json").read_text()),
            "trials": pd.read_csv(out / "trials.csv"), "client": MlflowClient(mlflow_server)}


def _nested(client: MlflowClient, parent: str) -> list:
    exp = client.get_experiment_by_name("test-sweep").experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_sweep_table_and_result(sweep):
    df, result = sweep["trials"], sweep["result"]
    assert len(df) == 4
    assert set(SPACE) <= set(df.columns) and {"status", "epochs", "steps", "val_accuracy",
                                              "val_loss", "mlflow_run_id"} <= set(df.columns)
    bad = df["model.name"] == BAD_MODEL
    assert (df.loc[bad, "status"] == "ERROR").all()
    assert df.loc[bad, "error"].str.contains("no_such_model").all()
    lr = df["train.base_lr"]
    good, tiny = df[~bad & (lr == GOOD_LR)], df[~bad & (lr == TINY_LR)]
    # One good-LR trial, first at the epoch-1 rung (see SPACE): never stopped. Only its own
    # race with a second good trial would make that depend on the machine's load.
    assert (good["status"] == "TERMINATED").all() and (good["epochs"] == EPOCHS).all()
    assert len(good) == len(tiny) == 1
    assert (tiny["status"] == "EARLY_STOPPED").all() and (tiny["stopped_at_epoch"] < EPOCHS).all()
    assert good["stopped_at_epoch"].isna().all()
    steps_per_epoch = (1797 - 360) // 32  # 1437 training rows, drop_last
    assert (df.loc[~bad, "steps"] == df.loc[~bad, "epochs"] * steps_per_epoch).all()
    best = result["best"]
    assert best["overrides"]["train.base_lr"] == GOOD_LR
    assert best["metrics"]["val_accuracy"] == pytest.approx(good["val_accuracy"].max())
    assert best["config"]["train"]["base_lr"] == GOOD_LR and best["metrics"]["epoch"] == EPOCHS
    assert best["config"]["model"]["name"] == best["overrides"]["model.name"] == "digits_cnn"
    assert result["tracking_uri"] and result["parent_run_id"]
    assert "best trial" in sweep["proc"].stdout


def test_parent_run_and_nested_trial_runs(sweep):
    client, result, df = sweep["client"], sweep["result"], sweep["trials"]
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["tune.search_space"]) == SPACE
    assert parent.data.params["train.epochs"] == str(EPOCHS)
    assert parent.data.tags["pipeline.kind"] == "sweep"
    assert parent.data.metrics["trials_error"] == 2
    runs = {r.info.run_id: r for r in _nested(client, parent.info.run_id)}
    assert set(runs) == set(df["mlflow_run_id"])  # every trial is one nested run
    for row in df.itertuples():
        run = runs[row.mlflow_run_id]
        assert run.data.tags["tune.trial_id"] == row.trial_id
        expected = {"ERROR": "FAILED", "TERMINATED": "FINISHED", "EARLY_STOPPED": "KILLED"}
        assert run.info.status == expected[row.status], row
        assert (run.data.tags.get("early_stopped") == "true") == (row.status == "EARLY_STOPPED")
        if row.status != "ERROR":  # one value per epoch it ran
            epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                                      "val_accuracy"))
            assert epochs == list(range(1, row.epochs + 1))
    best = [r for r in runs.values() if r.data.tags.get("best_trial") == "true"]
    assert [r.info.run_id for r in best] == [result["best"]["mlflow_run_id"]]


def test_parent_artifacts_and_files(sweep):
    client, out = sweep["client"], sweep["out"]
    parent = sweep["result"]["parent_run_id"]
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"trials.csv", "summary.md", "accuracy_vs_batch.png", "steps_vs_batch.png",
            "config.yaml", "search_space.json"} <= names
    for name in ("trials.csv", "result.json", "accuracy_vs_batch.png", "steps_vs_batch.png"):
        assert (out / name).is_file()
    # Steps to the target read back from MLflow: the good trials reached 0.5.
    df = sweep["trials"]
    reached = df[(df["status"] == "TERMINATED")]
    assert reached["steps_to_target"].notna().all()
    assert (reached["steps_to_target"] <= reached["steps"]).all()


def test_mlflow_ui_lists_the_sweep_with_its_trials(sweep, tmp_path):
    """The MLflow UI of the test server, in a real headless Chromium: the sweep's parent run,
    opened, lists every trial under it (nested runs show only under their parent)."""
    if problem := browser_problem():
        pytest.fail(problem)
    parent = sweep["client"].get_run(sweep["result"]["parent_run_id"])
    expect = [parent.info.run_name, *sweep["trials"]["trial_id"]]
    text = open_experiment(sweep["uri"], parent.info.experiment_id, expect, tmp_path / "ui.png")
    assert "test-sweep" in text and "5 matching runs" in text
    assert (tmp_path / "ui.png").stat().st_size > 20_000


def test_resume_reruns_no_finished_trial(sweep, ray_cluster):
    """Resumed as a real `ray job submit` of jobs/tune.py: nothing is left to run."""
    client, out = sweep["client"], sweep["out"]
    parent = sweep["result"]["parent_run_id"]
    before = {r.info.run_id: r.info.status for r in _nested(client, parent)}
    trial_dirs = sorted(p.name for p in (out / "trials").glob("*/*"))
    sub_id = f"test-tune-{uuid.uuid4().hex[:8]}"
    proc = submit_job(ray_cluster, sub_id, "python", "jobs/tune.py", "--config",
                      str(sweep["config"]), "--out", str(out), "--resume", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert job_status(ray_cluster, sub_id) == "SUCCEEDED"
    after = {r.info.run_id: r.info.status for r in _nested(client, parent)}
    assert after == before  # no new trial run, none reopened
    assert sorted(p.name for p in (out / "trials").glob("*/*")) == trial_dirs
    assert json.loads((out / "result.json").read_text())["parent_run_id"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    # A changed config cannot resume this sweep.
    changed = run_cli("tune", "--config", str(sweep["config"]), "--out", str(out), "--resume",
                      "--set", "train.epochs=5", timeout=120)
    assert changed.returncode == 2 and "train.epochs" in changed.stderr


def test_jobs_tune_is_the_cli():
    """jobs/tune.py is the CLI with `tune` fixed: bad input exits 2 before joining a cluster."""
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--config",
                          "no_such.yaml"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such config file" in out.stderr
