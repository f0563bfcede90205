"""The typed config, its conversions, the defaults that follow the data (`resolve`), and the
CLI's argument errors. The table of refused configs is in tests/test_refusals.py; two
subprocess smoke tests here check the same from a fresh interpreter."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import (
    MODEL_KWARGS,
    PACINGS,
    STRATEGY_OPTIONS,
    Config,
    ConfigError,
    describe,
    load_config,
)
from pipeline.data.datasets import resolve
from tests.conftest import REPO, run_cli
from tests.test_refusals import refused, s

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


# -- argument errors, in-process -----------------------------------------------------------------
def test_bad_arguments_and_files(tmp_path, capsys, monkeypatch, data_dir):
    assert "missing.yaml" in refused(["train", "--config", str(tmp_path / "missing.yaml")],
                                     capsys, monkeypatch)
    assert "nosuchcommand" in refused(["nosuchcommand"], capsys, monkeypatch)
    assert "novalue" in refused(["train", "--config", DIGITS, "--set", "novalue"], capsys,
                                monkeypatch)
    assert "--resume" in refused(["train", "--config", DIGITS, "--resume", "--out",
                                  str(tmp_path)], capsys, monkeypatch)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    assert "'train'" in refused(["train", "--config", str(bad)], capsys, monkeypatch)


# -- two smoke tests in a fresh interpreter ------------------------------------------------------
def test_subprocess_refusal_exits_2_with_one_line(data_dir):
    out = run_cli("train", "--config", DIGITS, "--set", "train.micro_batch_size=true", timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "config error: train.micro_batch_size: must be an integer >= 1, 'auto' or null (got True)"]


def test_subprocess_refusal_imports_no_ray(data_dir, tmp_path):
    """In a fresh interpreter `sys.modules` tells whether Ray (or MLflow) was imported."""
    bad = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"x": [[1.0, 2.0], [3.0]] * 10, "y": [0, 1] * 10}), bad)
    code = ("import sys; from pipeline.cli import run; "
            f"rc = run(['train', '--set', 'data.path={bad}', '--set', 'data.feature_column=x', "
            "'--set', 'data.label_column=y']); "
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules)); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "data.feature_column='x'" in out.stderr
    assert out.stdout.strip() == "[]"  # neither Ray, MLflow nor torch was imported


# -- the typed config ----------------------------------------------------------------------------
def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 2, "learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(p)


def test_overrides_parse_yaml_values_and_derived_values():
    cfg = load_config(DIGITS, ["train.global_batch_size=128", "train.micro_batch_size=16",
                               "batching.strategy=curriculum", "batching.options.pacing=root",
                               "batching.options.c0=1", "tracking.uri=http://x:5000",
                               "train.base_lr=1e-3"])
    assert cfg.train.global_batch_size == 128 and cfg.train.micro_batch_size == 16
    assert cfg.per_worker_batch() == 64 and cfg.accumulation_steps() == 4  # 128 = 16 x 2 x 4
    assert cfg.batching.options == {"pacing": "root", "c0": 1.0}  # typed: c0 is a float
    assert isinstance(cfg.batching.options["c0"], float)
    assert cfg.train.base_lr == 0.001  # YAML reads 1e-3 as text; still a number
    assert cfg.tracking_uri() == "http://x:5000"


def test_a_section_set_whole_is_merged_and_a_swept_key_can_be_set(tmp_path):
    """`--set train={epochs: 3}` keeps the file's other train keys (it put them back to their
    defaults); `--set tune.search_space.train.base_lr=...` sets one swept key (the dotted
    name was read as sections: "unknown key"); a YAML error names its line."""
    cfg = load_config(DIGITS, ["train={epochs: 3}"])
    assert cfg.train.epochs == 3 and cfg.train.micro_batch_size == load_config(DIGITS).train.micro_batch_size
    swept = load_config(REPO / "jobs/configs/sweep_digits.yaml",
                        ["tune.search_space.train.base_lr={grid: [0.1, 0.2]}"])
    assert swept.tune.search_space["train.base_lr"] == {"grid": [0.1, 0.2]}
    assert "train.global_batch_size" in swept.tune.search_space  # the file's kept
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  seed: [3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(ParserError: .*, line 4\)"):
        load_config(p)


def test_overrides_of_text_keys_keep_the_text_as_given(tmp_path):
    """YAML would read these as an int, a date, a base-60 number, a boolean and a comment
    (null); a key of text keeps them as typed. YAML's null and quotes still mean what they do."""
    cfg = load_config(None, ["tracking.experiment=2024", "tracking.run_name=12:30",
                             "data.label_column=no", "data.id_column=2024-01-05"])
    assert (cfg.tracking.experiment, cfg.tracking.run_name) == ("2024", "12:30")
    assert (cfg.data.label_column, cfg.data.id_column) == ("no", "2024-01-05")
    assert load_config(None, ["tracking.run_name=#1"]).tracking.run_name == "#1"
    assert load_config(None, ["tracking.run_name=run #1 "]).tracking.run_name == "run #1"
    assert load_config(None, ['tracking.run_name="a b"']).tracking.run_name == "a b"
    for null in ("null", "~"):
        assert load_config(None, [f"data.label_column={null}"]).data.label_column is None
    with pytest.raises(ConfigError, match="no value"):  # (`=$UNSET` is not null: refused)
        load_config(None, ["data.label_column= "])
    assert load_config(None, ["train.epochs=3"]).train.epochs == 3  # not text: YAML's int
    # a section whose keys are all commented out is an empty one, not an error
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\ntune:\n  # search_space: {}\n")
    assert load_config(p).train.epochs == 2
    # so is a mapping's field: `options:` with its entries commented out, then a --set inside
    p.write_text("batching:\n  options:\n    # pacing: root\nmodel:\n  kwargs:\n")
    cfg = load_config(p, ["model.kwargs.hidden=32"])
    assert (cfg.batching.options, cfg.model.kwargs) == ({}, {"hidden": 32})



def test_a_date_is_its_text_in_a_file_and_in_a_text_override(tmp_path):
    """YAML 1.1 reads 2024-06-30 as a date, and one that is no day (2024-02-30) raised a bare
    ValueError: a traceback, exit 1. No setting takes a date: it stays the text written."""
    p = tmp_path / "c.yaml"
    p.write_text("tracking:\n  run_name: 2024-02-30\n  experiment: 2024-06-30 12:00:00\n")
    cfg = load_config(p)
    assert (cfg.tracking.run_name, cfg.tracking.experiment) == ("2024-02-30", "2024-06-30 12:00:00")
    assert load_config(None, ["tracking.run_name=2024-06-31"]).tracking.run_name == "2024-06-31"
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be a valid integer \(got '2024"):
        load_config(None, ["train.epochs=2024-01-01"])


def test_a_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    """The workers run in a directory of their own: `sqlite:///mlflow.db` there would be
    another, empty database (every metric point refused as "run not found")."""
    monkeypatch.chdir(tmp_path)
    want = f"sqlite:///{tmp_path}/stores/mlflow.db"
    assert load_config(None, ["tracking.uri=sqlite:///stores/mlflow.db"]).tracking_uri() == want
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db")
    assert load_config(None).tracking_uri() == want
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(None).tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_settings_of_a_feature_left_off_are_named():
    """Not refused (a sweep's config holds the settings of the schedules it sweeps to), but
    named, so `train` can say that they do nothing."""
    cfg = load_config(REPO / "jobs" / "configs" / "sweep_batch_schedule.yaml")
    assert cfg.train.batch_size_schedule == "constant"
    # (its own batch, 32, is the LR's base batch: the warmup has no ramp; its trials of 64 up do)
    no_ramp = "train.warmup_epochs (the scaled LR is not above train.base_lr: nothing to ramp)"
    assert cfg.unused_settings() == [
        "train.batch_size_min (train.batch_size_schedule=constant)",
        "train.batch_size_warmup_steps (train.batch_size_schedule=constant)",
        "train.batch_size_step_cost (train.batch_size_schedule=constant)", no_ramp]
    adaptive = cfg.with_overrides({"train.batch_size_schedule": "adaptive",
                                   "train.global_batch_size": 128})
    assert adaptive.unused_settings() == [
        "train.batch_size_warmup_steps (train.batch_size_schedule=adaptive)"]
    assert no_ramp in adaptive.with_overrides({"train.lr_scaling": "none"}).unused_settings()
    # no ramp, but a decaying schedule starts after the warmup: it acts
    assert load_config(None, ["train.warmup_epochs=1", "train.schedule=cosine",
                              "train.epochs=3"]).unused_settings() == []
    # a packed row holds several sequences of at most max_length: padded to more, rightly
    assert load_config(None, ["batching.max_length=64", "batching.packing=true",
                              "batching.pack_tokens=512", "batching.pad_multiple_of=128"]
                       ).batching.pad_multiple_of == 128
    assert load_config(None, ["train.batch_size_interval=3", "batching.pack_tokens=64"]
                       ).unused_settings() == [
        "train.batch_size_interval (train.batch_size_schedule=constant)",
        "batching.pack_tokens (batching.packing=false)"]
    assert load_config(DIGITS).unused_settings() == []
    assert load_config(None, ["train.sync_batchnorm=true", "scaling.num_workers=1",
                              "train.auto_micro_batchnorm=true", "train.lr_scaling=none",
                              "train.base_batch_size=32"]).unused_settings() == [
        "train.base_batch_size (train.lr_scaling=none)",
        "train.sync_batchnorm (scaling.num_workers=1)",
        "train.auto_micro_batchnorm (train.micro_batch_size=null)"]
    # A strategy's options under another strategy: named, kept for a switch back (a sweep of
    # {batching.strategy: [curriculum, random]}, refused before); a typo is still refused.
    mixed = load_config(None, ["batching.strategy=random",
                               'batching.options={"difficulty": "length", "pacing": "root"}'])
    assert mixed.batching.options == {} and mixed.unused_settings() == [
        "batching.options.difficulty (batching.strategy=random)",
        "batching.options.pacing (batching.strategy=random)"]
    back = mixed.with_overrides({"batching.strategy": "curriculum"})
    assert back.batching.options == {"difficulty": "length", "pacing": "root"}
    assert back.unused_settings() == []
    with pytest.raises(ConfigError, match="batching.options.pacnig: not an option"):
        load_config(None, ['batching.options={"pacnig": "root"}'])
    # Settings of a feature switched off by another key
    assert load_config(None, ["train.nonfinite=skip", "train.nonfinite_limit=3",
                              "train.noise_scale=false", "train.noise_scale_ema=0.9",
                              "data.val_fraction=0", "train.eval_every=2",
                              "batching.num_views=3"]).unused_settings() == [
        "train.nonfinite_limit (train.nonfinite=skip)",
        "train.noise_scale_ema (train.noise_scale=false)",
        "train.eval_every (data.val_fraction=0)",
        "batching.num_views (train.loss=cross_entropy)"]
    # A curriculum's options of a pacing other than its own (steps: step and exponential;
    # growth: exponential; c0 and pacing_epochs: any but none), and the scoring option where a
    # difficulty column is given (the column is taken)
    def curriculum(options: dict, *more: str) -> list[str]:
        return load_config(None, ["batching.strategy=curriculum",
                                  f"batching.options={json.dumps(options)}", *more]
                           ).unused_settings()

    assert curriculum({"pacing": "linear", "steps": 3, "growth": 3.0}) == [
        "batching.options.steps (batching.options.pacing=linear)",
        "batching.options.growth (batching.options.pacing=linear)"]
    assert curriculum({"steps": 3}) == ["batching.options.steps (batching.options.pacing=root)"]
    assert curriculum({"pacing": "step", "steps": 3, "growth": 3.0}) == [
        "batching.options.growth (batching.options.pacing=step)"]
    assert curriculum({"pacing": "exponential", "steps": 3, "growth": 3.0, "c0": 0.2}) == []
    assert curriculum({"pacing": "none", "c0": 0.2, "pacing_epochs": 2}) == [
        "batching.options.c0 (batching.options.pacing=none)",
        "batching.options.pacing_epochs (batching.options.pacing=none)"]
    assert curriculum({"difficulty": "length"}, "batching.difficulty_column=h") == [
        "batching.options.difficulty (batching.difficulty_column=h)"]


def test_new_train_keys_and_their_defaults():
    t = Config().train
    assert (t.nonfinite, t.nonfinite_limit, t.auto_micro_batchnorm) == ("stop", 0, False)
    cfg = load_config(DIGITS, ["train.nonfinite=skip", "train.nonfinite_limit=3",
                               "train.micro_batch_size=auto", "train.auto_micro_batchnorm=true"])
    assert (cfg.train.nonfinite, cfg.train.nonfinite_limit) == ("skip", 3)
    assert cfg.train.micro_batch_size == "auto"


def test_round_trip_dict_and_flat_params():
    cfg = load_config(DIGITS)
    assert Config.model_validate(cfg.to_dict()) == cfg
    flat = cfg.flat_params()
    for key in ("data.name", "data.path", "data.feature_column", "data.label_column",
                "data.sequence_column", "data.val_fraction", "batching.strategy",
                "batching.seed", "batching.difficulty_column", "train.seed", "train.epochs",
                "train.max_steps", "train.global_batch_size", "train.micro_batch_size",
                "train.optimizer", "train.base_lr", "train.base_batch_size", "train.lr_scaling",
                "train.precision", "train.nonfinite", "scaling.num_workers", "scaling.use_gpu",
                "tracking.uri", "tracking.experiment"):
        assert key in flat, key
    assert flat["train.global_batch_size"] == "64"


def test_with_overrides_validates():
    cfg = load_config(DIGITS)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.with_overrides({"train.global_batch_size": 48})  # 48 % (32 x 2) != 0


def test_every_key_has_a_default_and_a_description():
    rows = describe()
    flat = Config().flat_params()
    assert {key for key, *_ in rows} == set(flat) | {"batching.options", "model.kwargs",
                                                     "tune.search_space"}
    for key, value, default, description in rows:
        assert value == default, key
        assert description and "\n" not in description, key
    for model in (*STRATEGY_OPTIONS.values(), *MODEL_KWARGS.values()):
        for name, field in model.model_fields.items():
            assert field.description, (model.__name__, name)


def test_strategy_options_match_the_planners():
    """Every keyword a planner takes is a typed option of its strategy, with the same default."""
    from pipeline.data import pacing, strategies  # noqa: F401  (registers the planners)
    from pipeline.data.plan import PLANNERS

    assert PACINGS == pacing.PACINGS
    fixed = {"meta", "seed", "epoch", "global_batch_size", "drop_last"}
    for strategy, model in STRATEGY_OPTIONS.items():
        params = {n: p for n, p in inspect.signature(PLANNERS[strategy]).parameters.items()
                  if n not in fixed and p.kind is p.KEYWORD_ONLY}
        options = {n: f for n, f in model.model_fields.items() if n != "difficulty"}
        assert set(options) == set(params), strategy
        for name, param in params.items():
            if name != "pacing_epochs":  # set from train.epochs in data/epochs.py
                assert options[name].default == param.default, (strategy, name)


def test_model_kwargs_match_the_builders():
    """Every keyword of a built-in model is a typed kwarg, with the same default."""
    from pipeline.engine.models import MLP, DigitsCNN, SeqTransformer

    derived = {"self", "input_dim", "num_outputs", "vocab_size", "per_token",
               "activation_checkpointing"}
    for name, cls in (("digits_cnn", DigitsCNN), ("mlp", MLP), ("seq_transformer", SeqTransformer)):
        params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n not in derived}
        kwargs = {n: f for n, f in MODEL_KWARGS[name].model_fields.items()
                  if n not in ("num_outputs", "embedding_dim", "vocab_size")}
        assert set(kwargs) == set(params), name
        for n, p in params.items():
            assert kwargs[n].default == p.default, (name, n)


# -- defaults that follow the data (resolve is pure: no Ray) ------------------------------------
def _sequences_file(path, n=90):
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 30, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    tokens = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 40, lengths.sum())))
    pq.write_table(pa.table({"seq": tokens, "cls": np.arange(n) % 3}), path)
    return str(path)


def _vectors_file(path, n=90, width=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, width)).astype(np.float32)  # a list<float> column, as pandas writes
    pq.write_table(pa.table({"vec": list(x), "cls": np.arange(n) % 3}), path)
    return str(path)


def _forward(cfg, info):
    """One collated batch through the model resolve chose (what a worker builds)."""
    from pipeline.data.batches import SampleTable
    from pipeline.engine.models import build_model
    from pipeline.engine.step import to_torch

    d = cfg.data
    st = SampleTable.from_table(pq.read_table(info.uri), feature_column=d.feature_column,
                                label_column=d.label_column, sequence_column=d.sequence_column)
    vocab = None if st.tokens is None else int(pa.compute.max(pa.compute.list_flatten(st.tokens)).as_py()) + 1
    model = build_model(cfg.model.name, input_dim=None if st.features is None
                        else st.features.shape[1], num_outputs=int(st.labels.max()) + 1,
                        vocab_size=vocab)
    import torch

    return model(to_torch(st.gather(np.arange(8)), torch.device("cpu")))


def test_sequences_with_path_sequence_and_label_columns_only(tmp_path):
    path = _sequences_file(tmp_path / "s.parquet")
    cfg = load_config(None, [f"data.path={path}", "data.sequence_column=seq",
                             "data.label_column=cls"])
    assert cfg.model.name == "auto" and cfg.data.feature_column is None  # nothing chosen yet
    resolved, info = resolve(cfg)
    assert resolved.model.name == "seq_transformer"
    assert resolved.flat_params()["model.name"] == "seq_transformer"  # what MLflow logs
    assert resolved.data == cfg.data  # the user's data keys are left as they were
    assert tuple(_forward(resolved, info).shape) == (8, 3)


def test_feature_vectors_with_path_feature_and_label_columns_only(tmp_path):
    path = _vectors_file(tmp_path / "v.parquet")
    cfg = load_config(None, [f"data.path={path}", "data.feature_column=vec",
                             "data.label_column=cls"])
    resolved, info = resolve(cfg)
    assert resolved.model.name == "mlp"
    assert resolved.data == cfg.data
    assert tuple(_forward(resolved, info).shape) == (8, 3)
    # 64-long vectors of one's own are not taken for images: still an mlp.
    path = _vectors_file(tmp_path / "v64.parquet", width=64)
    assert resolve(cfg.with_overrides({"data.path": path}))[0].model.name == "mlp"


def test_embedded_datasets_keep_working(data_dir):
    digits, _ = resolve(load_config(None))
    assert (digits.data.feature_column, digits.model.name) == ("features", "digits_cnn")
    imbalanced, _ = resolve(load_config(None, ["data.name=digits_imbalanced"]))
    assert imbalanced.model.name == "digits_cnn"
    seq, _ = resolve(load_config(None, ["data.name=sequences"]))
    assert (seq.data.sequence_column, seq.data.target_column, seq.data.feature_column,
            seq.model.name) == ("tokens", "targets", None, "seq_transformer")


def test_explicit_choices_are_never_rewritten(data_dir, capsys, monkeypatch):
    cfg, _ = resolve(load_config(None, ["model.name=mlp"]))
    assert cfg.model.name == "mlp"  # on digits, where auto would pick digits_cnn
    line = refused(["train", *s("data.name=sequences", "model.name=digits_cnn")], capsys,
                   monkeypatch)
    assert "model.name=digits_cnn" in line  # refused, not silently replaced


def test_a_sweep_may_rank_by_every_metric_a_run_of_its_config_logs():
    """The measured noise scale, the adaptive schedule's step cost and the non-finite step count
    are logged per epoch (tests/test_train_ray.py checks the lists against a run's metrics), so a
    sweep may rank by them; where the noise scale is not measured (off, or one worker stepping
    one micro-batch: no small batch beside the global one), `noise_scale` is refused, naming
    why."""
    space = 'tune.search_space={"train.base_lr": {"grid": [0.01, 0.1]}}'
    for metric, sets in [("noise_scale", []), ("nonfinite_steps", ["tune.mode=min"]),
                         ("batch_size_step_cost", ["train.batch_size_schedule=adaptive",
                                                   "train.batch_size_min=32",
                                                   "train.batch_size_step_cost=150"])]:
        cfg, _ = resolve(load_config(DIGITS, [space, f"tune.metric={metric}", *sets]))
        assert metric in cfg.logged_metrics()
    for unmeasured in (["train.noise_scale=false"],  # off, or no small batch beside the global
                       ["scaling.num_workers=1", "train.micro_batch_size=null"],
                       ["train.loss=nt_xent", "model.name=mlp"]):  # no per-sample sum
        cfg = resolve(load_config(DIGITS, [space, "tune.metric=noise_scale", *unmeasured]))[0]
        with pytest.raises(ConfigError, match=r"only when train.noise_scale=true with several "
                                              r"workers or micro-batches"):
            cfg.check_tune()  # (`tune`'s check_trials; `train` runs the config as one job)
    one_worker_two_micro = ["scaling.num_workers=1", "train.micro_batch_size=32"]
    cfg, _ = resolve(load_config(DIGITS, [space, "tune.metric=noise_scale", *one_worker_two_micro]))
    assert cfg.accumulation_steps() == 2 and "noise_scale" in cfg.logged_metrics()


def test_a_one_epoch_curriculum_is_refused_unless_its_pool_is_whole_from_the_start():
    from pipeline.config import ConfigError
    from pipeline.data.epochs import planner_options

    cur = ["batching.strategy=curriculum", "train.epochs=1"]
    with pytest.raises(ConfigError, match="train.epochs=1: the pool widens"):
        load_config(None, cur)
    load_config(None, [*cur, "batching.options.pacing=none"])  # the whole pool from the start
    load_config(None, [*cur, "batching.options.c0=1"])
    # pacing_epochs left null is the default (half the run), as left out
    cfg = load_config(None, ["batching.strategy=curriculum", "train.epochs=6",
                             "batching.options.pacing_epochs=null"])
    assert planner_options(cfg)["pacing_epochs"] == 3
