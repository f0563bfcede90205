"""Config validation: every bad case is one line on stderr naming the key, exit 2, and no
cluster work (the CLI subprocess returns in seconds, before Ray is imported)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config
from tests.conftest import REPO, run_cli

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")

BAD = [
    (["--set", "train.global_batch_size=0"], "train.global_batch_size"),
    (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
    (["--set", "train.global_batch_size=60"], "train.micro_batch_size=32"),  # 60 % (32*2)
    (["--set", "train.epochs=abc"], "train.epochs"),
    (["--set", "train.nosuchkey=1"], "train.nosuchkey"),
    (["--set", "nosection.x=1"], "nosection"),
    (["--set", "train.lr_scaling=cubic"], "train.lr_scaling"),
    (["--set", "data.label_column=nolabel"], "data.label_column"),
    (["--set", "batching.difficulty_column=nodiff"], "batching.difficulty_column"),
    (["--set", "batching.strategy=bogus"], "batching.strategy"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction"),
    (["--set", "train.precision=fp16"], "train.precision"),
    (["--set", "data.path=/no/such/file.parquet"], "data.path"),
    (["--set", "data.name=nosuchset"], "data.name"),
    (["--set", "train.global_batch_size=4096", "--set", "train.micro_batch_size=null"],
     "train.global_batch_size"),
]


@pytest.mark.parametrize(("args", "culprit"), BAD, ids=[c for _, c in BAD])
def test_bad_config_exits_2_with_one_line(args, culprit, data_dir):
    out = run_cli("train", "--config", DIGITS, *args, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert culprit in lines[0]
    assert "ray" not in out.stdout.lower()


def test_bad_arguments_and_files(tmp_path, data_dir):
    out = run_cli("train", "--config", str(tmp_path / "missing.yaml"), timeout=60)
    assert out.returncode == 2 and "missing.yaml" in out.stderr
    out = run_cli("nosuchcommand", timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    out = run_cli("train", "--config", DIGITS, "--set", "novalue", timeout=60)
    assert out.returncode == 2 and "novalue" in out.stderr
    out = run_cli("train", "--config", DIGITS, "--resume", "--out", str(tmp_path), timeout=60)
    assert out.returncode == 2 and "--resume" in out.stderr


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 2, "learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(p)


def test_overrides_parse_yaml_values_and_derived_values():
    cfg = load_config(DIGITS, ["train.global_batch_size=128", "train.micro_batch_size=16",
                               "batching.options.pacing=root", "tracking.uri=http://x:5000"])
    assert cfg.train.global_batch_size == 128 and cfg.train.micro_batch_size == 16
    assert cfg.per_worker_batch() == 64 and cfg.accumulation_steps() == 4  # 128 = 16 x 2 x 4
    assert cfg.batching.options == {"pacing": "root"}
    assert cfg.tracking_uri() == "http://x:5000"


def test_round_trip_dict_and_flat_params():
    cfg = load_config(DIGITS)
    assert Config.model_validate(cfg.to_dict()) == cfg
    flat = cfg.flat_params()
    for key in ("data.name", "data.path", "data.feature_column", "data.label_column",
                "data.sequence_column", "data.val_fraction", "batching.strategy",
                "batching.seed", "batching.difficulty_column", "train.seed", "train.epochs",
                "train.max_steps", "train.global_batch_size", "train.micro_batch_size",
                "train.optimizer", "train.base_lr", "train.base_batch_size", "train.lr_scaling",
                "train.precision", "scaling.num_workers", "scaling.use_gpu", "tracking.uri",
                "tracking.experiment"):
        assert key in flat, key
    assert flat["train.global_batch_size"] == "64"


def test_with_overrides_validates():
    cfg = load_config(DIGITS)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.with_overrides({"train.global_batch_size": 48})  # 48 % (32 x 2) != 0
