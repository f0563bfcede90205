"""The one typed, validated config of a job (imports nothing of ours).

A YAML file with sections `data`, `batching`, `model`, `train`, `scaling`, `tune`, `tracking`,
plus `--set dotted.key=value` overrides, becomes a `Config`. Every bad value raises
`ConfigError` with one line naming the key, before any cluster work starts. The config turns
into a plain dict for Ray (`to_dict`), flat dotted params for MLflow (`flat_params`), and back
(`Config.model_validate`). Tune's search space uses the same dotted keys (`with_overrides`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_DATASETS = ("digits", "digits_imbalanced", "sequences")
STRATEGIES = (
    "random", "sequential", "stratified", "balanced", "curriculum", "hard_mining",
    "length_bucket", "contrastive",
)


class ConfigError(ValueError):
    """Bad input (config, data, arguments): the CLI prints it as one line and exits 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = "digits"  # an embedded dataset, or a label for the dataset at `path`
    path: str | None = None  # Parquet/Arrow file or folder, local path or URI (s3://, gs://, ...)
    feature_column: str | None = "features"  # fixed-size numeric vector per sample
    label_column: str | None = "label"
    sequence_column: str | None = None  # variable-length token ids (list column)
    target_column: str | None = None  # per-token targets aligned with sequence_column
    id_column: str | None = None  # stable sample id; row position when absent
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    cache_dir: str | None = None  # where embedded datasets are written; see data/datasets.py


class BatchingConfig(_Section):
    strategy: str = "random"
    seed: int = 0
    drop_last: bool = True
    difficulty_column: str | None = None
    max_length: int | None = Field(None, ge=1)  # truncate sequences
    pad_multiple_of: int | None = Field(None, ge=1)
    num_views: int = Field(2, ge=2)  # contrastive
    options: dict[str, Any] = Field(default_factory=dict)  # strategy options (pacing, max_tokens...)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; known: {', '.join(STRATEGIES)}")
        return v


class ModelConfig(_Section):
    name: str = "digits_cnn"  # digits_cnn | mlp | seq_transformer | import:package.module:function
    kwargs: dict[str, Any] = Field(default_factory=dict)
    activation_checkpointing: bool = False


class TrainConfig(_Section):
    seed: int = 0
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    global_batch_size: int = Field(64, ge=1)
    micro_batch_size: int | Literal["auto"] | None = None  # per worker; None = no accumulation
    optimizer: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    base_lr: float = Field(0.05, gt=0.0)
    base_batch_size: int = Field(64, ge=1)
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    warmup_epochs: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = Field(None, gt=0.0)
    sync_batchnorm: bool = False
    loss: Literal["cross_entropy", "token_cross_entropy", "nt_xent"] = "cross_entropy"

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_micro(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto' (got {v})")
        return v


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the latest checkpoint


class TuneConfig(_Section):
    search_space: dict[str, Any] = Field(default_factory=dict)  # dotted key -> spec
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["grid", "random", "optuna"] = "grid"  # optuna: extra `batch-pipeline[optuna]`
    num_samples: int = Field(1, ge=1)
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int | None = Field(None, ge=1)
    target_accuracy: float = Field(0.9, gt=0.0, le=1.0)


class TrackingConfig(_Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "batch-pipeline"
    run_name: str | None = None
    log_model: bool = True


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> Config:
        t, workers = self.train, self.scaling.num_workers
        if t.global_batch_size < workers:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is smaller than "
                f"scaling.num_workers={workers}"
            )
        micro = t.micro_batch_size
        if isinstance(micro, int) and t.global_batch_size % (micro * workers):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={micro} x scaling.num_workers={workers}"
            )
        if not isinstance(micro, int) and t.global_batch_size % workers:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"scaling.num_workers={workers}"
            )
        if t.sync_batchnorm and not self.scaling.use_gpu and workers > 1:
            raise ValueError(
                "train.sync_batchnorm=true needs GPU workers (scaling.use_gpu=true): PyTorch's "
                "SyncBatchNorm runs only on CUDA (NCCL), not on CPU/gloo"
            )
        if t.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision=fp16 needs a CUDA device (scaling.use_gpu=false); use bf16 or fp32"
            )
        return self

    # -- derived values -------------------------------------------------------------------
    def per_worker_batch(self) -> int:
        return self.train.global_batch_size // self.scaling.num_workers

    def accumulation_steps(self) -> int:
        """global = micro x workers x accumulation (1 when micro is None or auto at start)."""
        micro = self.train.micro_batch_size
        return self.per_worker_batch() // micro if isinstance(micro, int) else 1

    def tracking_uri(self) -> str:
        """Explicit `tracking.uri`, else MLFLOW_TRACKING_URI, else the store `mlflow ui` shows
        when started in the current directory (MLflow 3 defaults to sqlite:///mlflow.db)."""
        if self.tracking.uri:
            return self.tracking.uri
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

    # -- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> string, for MLflow params (the whole resolved config)."""
        return {k: "None" if v is None else str(v) for k, v in flatten(self.to_dict()).items()}

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with dotted-key overrides (used by Tune trials)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return validate(raw)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key.count(".") < 1:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; the section and key must already exist (except inside
    free-form dict fields such as batching.options)."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config error: unknown key {'.'.join(parts[: i + 1])!r} in {key!r}")
        node = node[part]
    free_form = len(parts) > 2  # inside a dict-valued field, e.g. batching.options.pacing
    if not isinstance(node, dict) or (parts[-1] not in node and not free_form):
        raise ConfigError(f"config error: unknown key {key!r}")
    node[parts[-1]] = value


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key {loc!r}"
    got = f" (got {first['input']!r})" if loc and not isinstance(first["input"], dict) else ""
    where = f"{loc}: " if loc else ""
    more = len(err.errors()) - 1
    return f"config error: {where}{msg}{got}" + (f" [+{more} more]" if more else "")


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: expected dotted.key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or defaults when path is None), apply `--set` overrides, validate."""
    raw: dict[str, Any] = Config().to_dict()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: no such config file: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config error: {p} is not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: {p} must hold a mapping of sections")
        for section, values in loaded.items():
            if section not in raw:
                raise ConfigError(f"config error: unknown section {section!r} in {p}")
            if not isinstance(values, dict):
                raise ConfigError(f"config error: section {section!r} must be a mapping")
            raw[section].update(values)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate(raw)
