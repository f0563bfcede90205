"""The one typed, validated config of a job (imports nothing of ours).

A YAML file with sections `data`, `batching`, `model`, `train`, `scaling`, `tune`, `tracking`,
plus `--set dotted.key=value` overrides, becomes a `Config`. Every bad value raises
`ConfigError` with one line naming the key, before any cluster work starts. The config turns
into a plain dict for Ray (`to_dict`), flat dotted params for MLflow (`flat_params`), and back
(`Config.model_validate`). Tune's search space uses the same dotted keys (`with_overrides`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

EMBEDDED_DATASETS = ("digits", "digits_imbalanced", "sequences")
STRATEGIES = (
    "random", "sequential", "stratified", "balanced", "curriculum", "hard_mining",
    "length_bucket", "contrastive",
)
MODELS = ("digits_cnn", "mlp", "seq_transformer")  # plus "auto" and "import:module:function"
PACINGS = ("linear", "root", "step", "exponential", "none")  # = pipeline.data.pacing.PACINGS
# Per-epoch metrics a training run reports (pipeline/worker.py, engine/loop.py train_epoch and
# engine/step.py evaluate), hence what Tune can rank trials by. Some exist only for some runs:
# see `Config.logged_metrics`. One more, `ghost_batch_size`, is logged only for a model with
# BatchNorm, which the config alone does not tell (tests/test_train_ray.py checks the lists
# against a run's metrics).
ALWAYS_LOGGED = (
    "train_loss", "train_accuracy", "grad_norm", "steps", "epoch_time_s", "worker_samples_per_s",
    "lr", "epoch", "step", "samples_per_s", "dropped", "pool_size", "skipped_steps",
    "nonfinite_steps", "micro_batch_size", "global_batch_size", "samples", "startup_s",
    "data_fetched_mib", "data_wait_s", "worker_rss_mib",
)
# a small batch beside the global one: a worker's share, or one worker's first micro-batch
# with elements
NOISE_MEASURED = ("train.noise_scale=true with several workers or micro-batches, and a loss "
                  "that is a sum over samples (not nt_xent)")
SOMETIMES_LOGGED = {  # metric -> when it is logged
    "val_loss": "data.val_fraction > 0", "val_accuracy": "data.val_fraction > 0",
    "padding_efficiency": "sequence data", "tokens_per_s": "sequence data",
    "loss_scale": "train.precision=fp16",
    "hard_mining/loss_mean": "batching.strategy=hard_mining",
    "hard_mining/loss_p90": "batching.strategy=hard_mining",
    "noise_scale": NOISE_MEASURED, "noise_grad_sq": NOISE_MEASURED, "noise_trace": NOISE_MEASURED,
    "noise_scale_samples": NOISE_MEASURED,
    "batch_size_step_cost": "train.batch_size_schedule=adaptive",
}

# Metrics whose better direction is known: a sweep ranking by one the other way is refused.
METRIC_MODES = {
    **dict.fromkeys(("val_accuracy", "train_accuracy", "samples_per_s", "worker_samples_per_s",
                     "tokens_per_s", "padding_efficiency"), "max"),
    **dict.fromkeys(("val_loss", "train_loss", "epoch_time_s", "startup_s", "data_wait_s",
                     "worker_rss_mib", "skipped_steps", "nonfinite_steps", "dropped"), "min"),
}


class ConfigError(ValueError):
    """Bad input (config, data, arguments): the CLI prints it as one line and exits 2."""


class DataUnreachable(OSError):
    """The data's storage could not be reached before the cluster (no network, a store down):
    not bad input, which a retry would not mend. The CLI prints it as one line and exits 1."""


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


# "1e-3" (a YAML string) still parses; .inf and .nan do not (an LR of inf passes `gt=0`)
Float = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]
# Sizes and counts: `true` is not 1, 64.0 is not 64; and below 2^31 (10**23 passed, then
# overflowed numpy's int64 in the planners: a traceback on the driver, or on the cluster).
MAX_COUNT = 2**31 - 1
Int = Annotated[StrictInt, Field(le=MAX_COUNT)]
Seed = StrictInt  # (bounded by what each seed feeds)
Bool = StrictBool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = Field("digits", description="embedded dataset (digits, digits_imbalanced, "
                      "sequences), or a label for the dataset at data.path")
    path: str | None = Field(None, min_length=1, description="Parquet/Arrow file or folder, local "
                             "path or URI (s3://, gs://, ...); unset: the embedded dataset data.name")
    feature_column: str | None = Field(None, description="one fixed-size numeric vector per "
                                       "sample; unset unless named (embedded digits: features)")
    label_column: str | None = Field("label", description="integer class id per sample (0..K-1)")
    sequence_column: str | None = Field(None, description="variable-length token ids per sample "
                                        "(list column; embedded sequences: tokens)")
    target_column: str | None = Field(None, description="per-token targets aligned with "
                                      "data.sequence_column (token_cross_entropy)")
    id_column: str | None = Field(None, description="stable sample id; the row position when unset")
    val_fraction: Float = Field(0.2, ge=0.0, lt=1.0, description="share of every class held out "
                                "for validation (0: no validation metrics)")
    split_seed: Seed = Field(0, ge=0, description="seed of the train/validation split")
    cache_dir: str | None = Field(None, min_length=1, description="where embedded datasets are "
                                  "written (default PIPELINE_DATA_DIR or ~/.cache/batch-pipeline/datasets)")
    mode: Literal["auto", "object_store", "streaming"] = Field(
        "auto", description="how rows reach the workers: object_store (every node holds the "
        "whole dataset; fastest for data that fits), streaming (each node holds its share of "
        "the blocks and every rank fetches only the rows of its batches), auto (streaming on a "
        "cluster of several nodes when the data fills more than a quarter of a node's object "
        "store; pipeline/blocks.py)")


# -- batching strategy options, typed per strategy (the keyword arguments of each planner in
# pipeline/data/strategies.py, and `difficulty`, read by pipeline/data/epochs.py) --------------
class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoOptions(_Options):
    """random, sequential, stratified, contrastive: no options."""


class BalancedOptions(_Options):
    epoch_samples: Int | None = Field(None, ge=1, description="samples per epoch (default: the "
                                      "training pool's size)")


class CurriculumOptions(_Options):
    pacing: Literal[PACINGS] = Field("root", description="competence function")
    c0: Float = Field(0.1, gt=0.0, le=1.0, description="initial share of the easiest samples")
    pacing_epochs: Float | None = Field(None, gt=0.0, description="epochs until the pool is whole "
                                 "(default train.epochs // 2, at least 1)")
    steps: Int = Field(4, ge=1, description="increments of step/exponential pacing")
    growth: Float = Field(2.0, ge=1.0, description="factor per increment of exponential pacing")
    difficulty: Literal["length"] | None = Field(None, description="scoring pass when "
                                                 "batching.difficulty_column is unset")


class HardMiningOptions(_Options):
    selection_pressure: Float = Field(100.0, ge=1.0, allow_inf_nan=False, description="how much "
                                      "likelier the hardest sample is than the easiest")


class LengthBucketOptions(_Options):
    bucket_size_multiplier: Int = Field(50, ge=1, description="mega-batch size in global batches")
    max_tokens: Int | None = Field(None, ge=1, description="token budget per global batch "
                                   "(unset: fixed-size batches)")


STRATEGY_OPTIONS: dict[str, type[_Options]] = {
    "random": NoOptions, "sequential": NoOptions, "stratified": NoOptions,
    "contrastive": NoOptions, "balanced": BalancedOptions, "curriculum": CurriculumOptions,
    "hard_mining": HardMiningOptions, "length_bucket": LengthBucketOptions,
}


class BatchingConfig(_Section):
    strategy: str = Field("random", description="how global batches are composed: "
                          + ", ".join(STRATEGIES))
    # below 2^32: numpy's SeedSequence([seed, epoch]) splits a larger seed into 32-bit words,
    # so (a + 2^32 b, epoch 0) drew the plan of (a, epoch b)
    seed: Seed = Field(0, ge=0, le=2**32 - 1, description="seed of the batch plans (with the "
                      "epoch), below 2^32")
    drop_last: Bool = Field(True, description="drop the last partial global batch (counted)")
    difficulty_column: str | None = Field(None, description="per-sample difficulty (curriculum)")
    max_length: Int | None = Field(None, ge=1, description="truncate sequences to this many tokens")
    pad_multiple_of: Int | None = Field(None, ge=1, description="pad sequence batches to a "
                                        "multiple of this")
    packing: Bool = Field(False, description="sequences: a micro-batch's samples concatenated "
                          "into rows with no padding between them; attention blocked between "
                          "samples, positions restarting per sample (model seq_transformer)")
    pack_tokens: Int | None = Field(None, ge=1, description="packing: at most this many tokens "
                                    "per row (first fit, longest first); null: one row per "
                                    "micro-batch")
    num_views: Int = Field(2, ge=2, description="augmented views per sample (train.loss=nt_xent)")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the strategy, "
                                    "typed per strategy (e.g. curriculum: pacing, c0)")
    # Options given of another strategy (a sweep over strategies, a config switched with --set):
    # left out of `options`, named at the job's start (`Config.unused_settings`).
    _other_options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; known: {', '.join(STRATEGIES)}")
        return v


# -- model keyword arguments, typed per built-in model (pipeline/engine/models.py) -------------
class _Kwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_outputs: Int | None = Field(None, ge=1, description="output size (default: number of "
                                    "classes or targets in the data)")
    embedding_dim: Int = Field(32, ge=2, description="embedding size (nt_xent; one dimension, "
                               "normalised, leaves every similarity at +-1)")


class DigitsCNNKwargs(_Kwargs):
    width: Int = Field(32, ge=1, description="channels of the first block")


class MLPKwargs(_Kwargs):
    hidden: Int = Field(128, ge=1, description="width of the hidden layers")
    depth: Int = Field(2, ge=1, description="number of hidden layers")


class SeqTransformerKwargs(_Kwargs):
    vocab_size: Int | None = Field(None, ge=1, description="embedding rows (default: largest "
                                   "token id + 1)")
    d_model: Int = Field(64, ge=1, description="model width")
    nhead: Int = Field(4, ge=1, description="attention heads (divides d_model)")
    num_layers: Int = Field(2, ge=1, description="encoder layers")
    dim_feedforward: Int = Field(128, ge=1, description="feed-forward width")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    attention: Literal["dense", "flex"] = Field(
        "dense", description="packed batches: dense (a boolean mask) or flex (FlexAttention "
        "block masks: skips blocks no sample spans; GPU only, no dropout)")

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> SeqTransformerKwargs:
        if self.d_model % self.nhead:
            raise ValueError(f"nhead={self.nhead} does not divide d_model={self.d_model} (each "
                             "head gets d_model / nhead dimensions)")
        return self


MODEL_KWARGS: dict[str, type[_Kwargs]] = {
    "digits_cnn": DigitsCNNKwargs, "mlp": MLPKwargs, "seq_transformer": SeqTransformerKwargs,
}
BATCHNORM_MODELS = ("digits_cnn",)  # built-in models with BatchNorm layers


def ghost_batch_size(micro_batch_size: int, workers: int, sync_batchnorm: bool) -> int:
    """The rows each BatchNorm normalises over (its ghost batch): a worker's micro-batch, times
    the workers under SyncBatchNorm (see `pipeline.engine.batchnorm`).

    >>> ghost_batch_size(8, 4, False), ghost_batch_size(8, 4, True), ghost_batch_size(8, 1, True)
    (8, 32, 8)
    """
    return micro_batch_size * (workers if sync_batchnorm and workers > 1 else 1)


def auto_micro_batchnorm_refusal(model_name: str) -> str:
    """Why `train.micro_batch_size: auto` is refused for a model with BatchNorm (the config for
    the built-in ones, the driver's checks and the workers for a user's `import:` model)."""
    return (f"train.micro_batch_size=auto would change the ghost-batch size of the BatchNorm "
            f"layers of model.name={model_name} on out-of-memory (another update); set a fixed "
            "train.micro_batch_size, or opt in with train.auto_micro_batchnorm=true")


_IMPORT = re.compile(r"import:[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class ModelConfig(_Section):
    name: str = Field("auto", description="auto (follows the data: seq_transformer for sequences, "
                      "digits_cnn for the embedded digits, mlp for other vectors), digits_cnn, "
                      "mlp, seq_transformer, or import:package.module:function")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the "
                                   "model builder, typed per built-in model")
    activation_checkpointing: Bool = Field(False, description="recompute activations in backward "
                                           "(less memory, same update)")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v != "auto" and v not in MODELS and not _IMPORT.fullmatch(v):
            raise ValueError(f"unknown model {v!r}; known: auto, {', '.join(MODELS)}, "
                             "import:package.module:function")
        return v


class TrainConfig(_Section):
    seed: Seed = Field(0, ge=0, le=2**64 - 1, description="seed of the initial weights (torch "
                      "takes seeds below 2^64)")
    epochs: Int = Field(10, ge=1, description="passes over the training pool")
    max_steps: Int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    global_batch_size: Int = Field(64, ge=1, description="samples per optimizer step, all "
                                   "workers together")
    micro_batch_size: Int | Literal["auto"] | None = Field(
        None, description="samples per worker per forward/backward (accumulation); auto: "
        "starts at the worker's share, halved on out-of-memory; unset: the worker's whole share")
    optimizer: Literal["sgd", "adamw", "lars", "lamb"] = Field("sgd", description="optimizer")
    base_lr: Float = Field(0.05, gt=0.0, description="learning rate at train.base_batch_size")
    base_batch_size: Int = Field(64, ge=1, description="batch size train.base_lr is tuned for")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "linear", description="LR scaling rule from train.base_batch_size to the global batch")
    warmup_epochs: Float = Field(0.0, ge=0.0, description="linear warmup from train.base_lr up "
                                 "to the scaled LR, in epochs (at most train.epochs; none where "
                                 "the scaled LR is not above train.base_lr)")
    schedule: Literal["constant", "cosine", "step"] = Field("constant", description="LR schedule "
                                                            "after warmup")
    momentum: Float = Field(0.9, ge=0.0, lt=1.0, description="momentum (sgd, lars) / beta1")
    weight_decay: Float = Field(5e-4, ge=0.0, description="weight decay (not on norms and biases)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, bf16 autocast, "
                                                       "or fp16 with a gradient scaler (GPU)")
    grad_clip: Float | None = Field(None, gt=0.0, description="clip the global gradient norm")
    sync_batchnorm: Bool = Field(False, description="BatchNorm statistics over all workers (GPU)")
    loss: Literal["cross_entropy", "token_cross_entropy", "nt_xent"] = Field(
        "cross_entropy", description="cross_entropy (data.label_column), token_cross_entropy "
        "(data.target_column), nt_xent (contrastive, data.feature_column)")
    nonfinite: Literal["skip", "stop"] = Field(
        "stop", description="on a non-finite loss or gradient: skip the step (counted) or stop "
        "the job (fp16: a non-finite loss, e.g. a forward overflow; its gradient overflows are "
        "the scaler's)")
    nonfinite_limit: Int = Field(0, ge=0, description="non-finite steps train.nonfinite=stop "
                                 "skips (counted) before it stops; 0: stop at the first")
    auto_micro_batchnorm: Bool = Field(False, description="let micro_batch_size=auto change the "
                                       "ghost-batch size of a BatchNorm model")
    noise_scale: Bool = Field(True, description="measure the gradient noise scale every step "
                              "(McCandlish et al. 2018) from the gradients the step computes anyway")
    noise_scale_ema: Float = Field(0.95, ge=0.0, lt=1.0, description="EMA factor per step of the "
                                   "noise scale's two components (smoothed before their ratio)")
    eval_every: Int | None = Field(
        None, ge=1, description="also evaluate on the validation split every this many optimizer "
        "steps (logged as step/val_accuracy, step/val_loss); unset: at each epoch's end only")
    batch_size_schedule: Literal["constant", "warmup", "adaptive"] = Field(
        "constant", description="the global batch per step: constant (train.global_batch_size); "
        "warmup (a linear ramp from train.batch_size_min); adaptive (follows the noise scale by "
        "goodput, between train.batch_size_min and train.global_batch_size)")
    batch_size_min: Int | None = Field(None, ge=1, description="warmup/adaptive: the smallest "
                                       "global batch, the unit every step's batch is a multiple of")
    batch_size_warmup_steps: Int | None = Field(None, ge=1, description="warmup: optimizer steps "
                                                "of the ramp to train.global_batch_size")
    batch_size_interval: Int = Field(10, ge=1, description="adaptive: optimizer steps between "
                                     "batch-size decisions")
    batch_size_step_cost: Float | None = Field(
        None, ge=0.0, description="adaptive: a step's fixed cost in samples' worth of compute "
        "(T(M) = b (c + M)); unset: measured in the run")
    batch_size_throughput: str | None = Field(
        None, description="adaptive: a find_batch_size.json whose step times give "
        "train.batch_size_step_cost (its per-worker step cost times scaling.num_workers), "
        "filled in before the job starts; unset: train.batch_size_step_cost or measured")

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_size(cls, v: Any) -> Any:
        ok = v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        if not ok:
            raise ValueError("must be an integer >= 1, 'auto' or null")
        return v

    def warmup_acts(self) -> bool:
        """Whether an LR warmup changes anything: it ramps from train.base_lr up to the LR
        scaled to the batch (the largest, `global_batch_size`), never down
        (`engine.schedule.lr_at`), and a decaying `schedule` starts after it either way.

        >>> TrainConfig(warmup_epochs=1).warmup_acts()  # (batch 64 = base_batch_size)
        False
        >>> TrainConfig(global_batch_size=256, lr_scaling="sqrt").warmup_acts()
        True
        >>> TrainConfig(warmup_epochs=1, schedule="cosine").warmup_acts()  # (the decay waits)
        True
        """
        return self.lr_ramps() or self.schedule != "constant"

    def lr_ramps(self) -> bool:
        """Whether an LR warmup has a ramp to climb (`warmup_acts`)."""
        return self.lr_scaling != "none" and self.global_batch_size > self.base_batch_size


class ScalingConfig(_Section):
    num_workers: Int = Field(2, ge=1, description="training workers (DDP ranks)")
    use_gpu: Bool = Field(False, description="one GPU per worker")
    cpus_per_worker: Float = Field(1.0, ge=0.0001, description="CPUs reserved per worker (Ray "
                                   "counts resources in steps of 0.0001)")
    max_failures: Int = Field(1, ge=0, description="worker-group restarts from the latest "
                              "checkpoint")

    def need(self) -> dict[str, float]:
        """The CPUs and GPUs the workers take in all.

        >>> ScalingConfig(num_workers=3, cpus_per_worker=2, use_gpu=True).need()
        {'CPU': 6.0, 'GPU': 3}
        """
        return {"CPU": self.num_workers * self.cpus_per_worker,
                "GPU": self.num_workers if self.use_gpu else 0}


class TuneConfig(_Section):
    search_space: dict[str, Any] = Field(default_factory=dict, description="dotted key -> "
                                         "{grid|choice|uniform|loguniform: [...]}")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha (early stopping) or fifo")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="search algorithm (optuna: extra batch-pipeline[optuna])")
    num_samples: Int = Field(1, ge=1, description="trials per grid point (grid) or in all")
    metric: str = Field("val_accuracy", description="per-epoch metric that ranks trials: "
                        + ", ".join((*ALWAYS_LOGGED, *SOMETIMES_LOGGED)))
    mode: Literal["max", "min"] = Field("max", description="whether tune.metric is maximised")
    max_concurrent: Int | None = Field(None, ge=1, description="cap on trials at once (default: "
                                       "what the cluster fits)")
    target_accuracy: Float | None = Field(
        0.9, gt=0.0, le=1.0, description="val_accuracy threshold of the steps-to-target analysis "
        "(always val_accuracy, whatever tune.metric ranks by); null: none")
    trial_runner: Literal["auto", "worker_group"] = Field(
        "auto", description="auto: a one-worker trial on the sweep's dataset trains in its own "
        "Tune actor (no worker group to start); worker_group: every trial runs a TorchTrainer")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI (default MLFLOW_TRACKING_URI, "
                            "else sqlite:///<cwd>/mlflow.db)")
    # (MLflow refuses an empty name and one over 500 characters: after the cluster work)
    experiment: str = Field("batch-pipeline", min_length=1, max_length=500,
                            description="MLflow experiment")
    run_name: str | None = Field(None, description="MLflow run name")
    log_model: Bool = Field(True, description="log the final model as an MLflow artifact")


def _first_error(err: ValidationError, prefix: str | None = None) -> str:
    """`key: message (got value)` for the first of pydantic's errors, keys under `prefix`
    when what was validated is a part of the config (a strategy's options)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    got = f" (got {first['input']!r})" if first["loc"] and not isinstance(first["input"], dict) else ""
    return f"{loc}: {msg}{got}" if loc else msg


def check_options(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """The strategy's options, typed; ValueError naming the option (and the known ones).

    >>> check_options("curriculum", {"pacing": "linear", "c0": 1})
    {'pacing': 'linear', 'c0': 1.0}
    >>> try:
    ...     check_options("hard_mining", {"selection_presure": 10})
    ... except ValueError as err:
    ...     print(str(err).split("; ")[1])
    known: selection_pressure
    """
    return _typed(STRATEGY_OPTIONS[strategy], options, "batching.options",
                  f"an option of batching.strategy={strategy}")


def _typed(model: type[BaseModel], values: dict[str, Any], where: str, owner: str) -> dict[str, Any]:
    """`values` checked against the fields of `model`: unknown names (listing the known ones)
    and wrong types raise ValueError naming `where.<name>`; returns the given keys, typed."""
    unknown = [k for k in values if k not in model.model_fields]
    if unknown:
        known = ", ".join(model.model_fields) or "none"
        raise ValueError(f"{where}.{unknown[0]}: not {owner}; known: {known}")
    try:
        return model.model_validate(values).model_dump(include=set(values))
    except ValidationError as err:
        raise ValueError(_first_error(err, where)) from None


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A built-in model's keyword arguments, typed (an imported model's are its own business).

    >>> try:
    ...     check_model_kwargs("mlp", {"hiden": 64})
    ... except ValueError as err:
    ...     print(err)
    model.kwargs.hiden: not an argument of model.name=mlp; known: num_outputs, embedding_dim, hidden, depth
    """
    model = MODEL_KWARGS.get(name)
    if model is None:
        return kwargs
    return _typed(model, kwargs, "model.kwargs", f"an argument of model.name={name}")


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset and its columns")
    batching: BatchingConfig = Field(default_factory=BatchingConfig,
                                     description="how global batches are composed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune sweeps")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")

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
        bt = self.batching
        if bt.packing and bt.pack_tokens and bt.pad_multiple_of and bt.pack_tokens % bt.pad_multiple_of:
            raise ValueError(f"batching.pack_tokens={bt.pack_tokens} is not a multiple of "
                             f"batching.pad_multiple_of={bt.pad_multiple_of}: a packed row padded "
                             "to the multiple would hold more than pack_tokens tokens")
        if (bt.max_length and bt.pad_multiple_of and bt.pad_multiple_of > bt.max_length
                and not bt.packing):  # (packed: it pads a row of several sequences)
            raise ValueError(f"batching.pad_multiple_of={bt.pad_multiple_of} is more than "
                             f"batching.max_length={bt.max_length}: every row would be padded "
                             f"to {bt.pad_multiple_of} slots for at most {bt.max_length} tokens")
        if t.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision=fp16 needs a CUDA device (scaling.use_gpu=false); use bf16 or fp32"
            )
        return self

    @model_validator(mode="after")
    def _typed_options_and_kwargs(self) -> Config:
        b, m = self.batching, self.model
        own = STRATEGY_OPTIONS[b.strategy].model_fields
        other = {k: v for k, v in b.options.items() if k not in own
                 and any(k in o.model_fields for o in STRATEGY_OPTIONS.values())}
        options = check_options(b.strategy, {k: v for k, v in b.options.items() if k not in other})
        b._other_options = other
        kwargs = check_model_kwargs(m.name, m.kwargs)
        # Store the typed values (c0: 1 -> 1.0); assignment bypasses validate_assignment loops.
        object.__setattr__(b, "options", options)
        object.__setattr__(m, "kwargs", kwargs)
        return self

    @model_validator(mode="after")
    def _run_length_and_models(self) -> Config:
        t = self.train
        if t.warmup_epochs > t.epochs:
            raise ValueError(f"train.warmup_epochs={t.warmup_epochs:g} is longer than the run "
                             f"(train.epochs={t.epochs})")
        if (t.micro_batch_size == "auto" and self.model.name in BATCHNORM_MODELS
                and not t.auto_micro_batchnorm):
            raise ValueError(auto_micro_batchnorm_refusal(self.model.name))
        if t.micro_batch_size == "auto" and self.scaling.num_workers > 1 and (
                t.loss == "nt_xent" or t.sync_batchnorm):
            culprit = "train.loss=nt_xent" if t.loss == "nt_xent" else "train.sync_batchnorm=true"
            raise ValueError(
                f"train.micro_batch_size=auto with scaling.num_workers={self.scaling.num_workers} "
                f"cannot shrink every rank together under {culprit} (collectives inside the "
                "forward pass); set a fixed train.micro_batch_size (python -m pipeline "
                "find-batch-size finds the largest that fits)")
        self._check_batch_schedule()
        if t.loss == "token_cross_entropy" and self.model.name in ("digits_cnn", "mlp"):
            raise ValueError(f"train.loss=token_cross_entropy needs a per-token model; "
                             f"model.name={self.model.name} gives one output per sample "
                             "(use seq_transformer)")
        if self.model.kwargs.get("attention") == "flex":
            culprit = ("batching.packing=false" if not self.batching.packing else
                       "scaling.use_gpu=false" if not self.scaling.use_gpu else
                       "model.kwargs.dropout" if self.model.kwargs.get("dropout") else None)
            if culprit:
                raise ValueError(
                    f"model.kwargs.attention=flex with {culprit}: FlexAttention serves packed "
                    "batches (batching.packing=true) on a GPU (PyTorch has no FlexAttention "
                    "backward on a CPU), without attention dropout")
        c0 = self.batching.options.get("c0", CurriculumOptions.model_fields["c0"].default)
        if (self.batching.strategy == "curriculum" and t.epochs == 1 and c0 < 1
                and self.batching.options.get("pacing") != "none"):
            raise ValueError(
                f"batching.strategy=curriculum with train.epochs=1: the pool widens from epoch to "
                f"epoch, so one epoch trains only the easiest share of it (batching.options.c0="
                f"{c0:g}); train 2 epochs or more (or take the whole pool: "
                "batching.options.pacing=none)")
        if t.loss == "nt_xent" and self.batching.strategy == "hard_mining":
            raise ValueError("batching.strategy=hard_mining ranks samples by their own loss; "
                             "train.loss=nt_xent has none (a sample's term depends on its batch)")
        if t.loss == "nt_xent" and self.batching.strategy == "balanced":
            raise ValueError("batching.strategy=balanced draws a rare class's samples again "
                             "within a batch, and train.loss=nt_xent would take a copy's views "
                             "(the same augmentations) for positives: use batching.strategy="
                             "contrastive, random or stratified")
        if t.loss == "nt_xent" and self.plan_batch_size() < 2:
            # two views of one sample: no negative, and the loss and its gradient are exactly 0
            key = ("train.global_batch_size" if t.batch_size_schedule == "constant"
                   else "train.batch_size_min")
            raise ValueError(f"train.loss=nt_xent contrasts each sample with the others of its "
                             f"batch: {key}={self.plan_batch_size()} has none (2 at least)")
        if t.loss == "nt_xent" and self.model.kwargs.get("num_outputs") is not None:
            raise ValueError("model.kwargs.num_outputs under train.loss=nt_xent would take the "
                             "place of the embedding size: set model.kwargs.embedding_dim")
        if t.loss == "nt_xent" and self.model.name == "seq_transformer":
            raise ValueError("train.loss=nt_xent augments feature vectors (data.feature_column); "
                             "model.name=seq_transformer reads token sequences")
        known = (*ALWAYS_LOGGED, *SOMETIMES_LOGGED)
        if self.tune.metric not in known:
            raise ValueError(f"tune.metric={self.tune.metric!r} is logged by no run; known: "
                             f"{', '.join(known)}")
        return self

    def _check_batch_schedule(self) -> None:
        t, workers = self.train, self.scaling.num_workers
        kind = f"train.batch_size_schedule={t.batch_size_schedule}"
        if t.batch_size_schedule == "constant":
            return
        m0 = t.batch_size_min
        if m0 is None:
            raise ValueError(f"{kind} needs train.batch_size_min (the smallest global batch)")
        if t.global_batch_size % m0:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} (the largest batch "
                             f"of {kind}) is not a multiple of train.batch_size_min={m0}")
        if m0 % workers:
            raise ValueError(f"train.batch_size_min={m0} is not divisible by "
                             f"scaling.num_workers={workers}")
        if t.batch_size_schedule == "warmup" and t.batch_size_warmup_steps is None:
            raise ValueError(f"{kind} needs train.batch_size_warmup_steps (the ramp's length)")
        if t.batch_size_schedule == "adaptive":
            if not t.noise_scale:
                raise ValueError(f"{kind} follows the gradient noise scale: set "
                                 "train.noise_scale=true")
            if t.loss == "nt_xent":  # one loss over the whole batch: no small-batch gradient
                raise ValueError(f"{kind} follows the gradient noise scale, which "
                                 "train.loss=nt_xent does not measure (its loss is not a sum "
                                 "over samples); use constant or warmup")
            micro = t.micro_batch_size
            if self.micro_batch_below() is not None and not (isinstance(micro, int)
                                                             and micro < m0):
                raise ValueError(
                    f"{kind} on one worker measures the noise scale from its first micro-batch: "
                    f"set train.micro_batch_size below train.batch_size_min={m0} (now {micro})")

    def micro_batch_below(self) -> int | None:
        """What a fixed train.micro_batch_size must stay below (None: only that it divides a
        worker's batch): train.batch_size_min for the adaptive schedule on one worker, which
        measures the noise scale from the first of several micro-batches."""
        t = self.train
        if t.batch_size_schedule == "adaptive" and self.scaling.num_workers == 1:
            return t.batch_size_min
        return None

    def unused_settings(self) -> list[str]:
        """Keys set for a feature this config leaves off, which it therefore ignores: said at
        a job's start (not refused: a sweep's config may hold the settings of a schedule it
        sweeps to, e.g. `jobs/configs/sweep_batch_schedule.yaml`).

        >>> Config().with_overrides({"train.batch_size_min": 32}).unused_settings()
        ['train.batch_size_min (train.batch_size_schedule=constant)']
        """
        t, b = self.train, self.batching
        uses = {"train.batch_size_min": ("warmup", "adaptive"),
                "train.batch_size_warmup_steps": ("warmup",),
                "train.batch_size_step_cost": ("adaptive",),
                "train.batch_size_throughput": ("adaptive",)}
        unused = [f"{key} (train.batch_size_schedule={t.batch_size_schedule})"
                  for key, kinds in uses.items()
                  if getattr(t, key.split(".")[1]) is not None
                  and t.batch_size_schedule not in kinds]
        if t.batch_size_interval != TrainConfig.model_fields["batch_size_interval"].default \
                and t.batch_size_schedule != "adaptive":
            unused.append(f"train.batch_size_interval (train.batch_size_schedule="
                          f"{t.batch_size_schedule})")
        if b.pack_tokens is not None and not b.packing:
            unused.append("batching.pack_tokens (batching.packing=false)")
        unused += [f"batching.options.{k} (batching.strategy={b.strategy})" for k in b._other_options]
        if b.strategy == "curriculum":  # options of a pacing other than the one chosen
            pacing = b.options.get("pacing", "root")
            unused += [f"batching.options.{k} ({why})" for k, off, why in (
                ("steps", pacing not in ("step", "exponential"), f"batching.options.pacing={pacing}"),
                ("growth", pacing != "exponential", f"batching.options.pacing={pacing}"),
                ("c0", pacing == "none", "batching.options.pacing=none"),
                ("pacing_epochs", pacing == "none", "batching.options.pacing=none"),
                ("difficulty", b.difficulty_column is not None,
                 f"batching.difficulty_column={b.difficulty_column}"),
            ) if k in b.options and b.options[k] is not None and off]

        def set_(section: BaseModel, name: str) -> bool:  # not at its default
            return getattr(section, name) != type(section).model_fields[name].default

        unused += [f"{key} ({why})" for key, is_set, off, why in (
            ("train.nonfinite_limit", set_(t, "nonfinite_limit"), t.nonfinite == "skip",
             "train.nonfinite=skip"),
            ("train.noise_scale_ema", set_(t, "noise_scale_ema"), not t.noise_scale,
             "train.noise_scale=false"),
            ("train.eval_every", set_(t, "eval_every"), self.data.val_fraction == 0,
             "data.val_fraction=0"),
            ("batching.num_views", set_(b, "num_views"), t.loss != "nt_xent",
             f"train.loss={t.loss}"),
            ("train.warmup_epochs", set_(t, "warmup_epochs"), not t.warmup_acts(),
             "the scaled LR is not above train.base_lr: nothing to ramp"),
            ("train.base_batch_size", set_(t, "base_batch_size"), t.lr_scaling == "none",
             "train.lr_scaling=none"),
            ("train.sync_batchnorm", t.sync_batchnorm, self.scaling.num_workers == 1,
             "scaling.num_workers=1"),
            ("train.auto_micro_batchnorm", t.auto_micro_batchnorm, t.micro_batch_size != "auto",
             f"train.micro_batch_size={'null' if t.micro_batch_size is None else t.micro_batch_size}"
             )) if is_set and off]
        return unused

    def plan_batch_size(self) -> int:
        """The global batch size epochs are planned with: the schedule's unit
        (train.batch_size_min) under a warmup or adaptive schedule, else the global batch."""
        t = self.train
        if t.batch_size_schedule != "constant" and t.batch_size_min is not None:
            return t.batch_size_min
        return t.global_batch_size

    def logged_metrics(self) -> tuple[str, ...]:
        """The per-epoch metrics a run of this (resolved) config reports, so Tune can rank by.

        >>> "val_accuracy" in Config().logged_metrics()
        True
        >>> "val_accuracy" in Config(data=DataConfig(val_fraction=0)).logged_metrics()
        False
        """
        when = {
            "data.val_fraction > 0": self.data.val_fraction > 0,
            "sequence data": self.data.sequence_column is not None,
            "train.precision=fp16": self.train.precision == "fp16",
            "batching.strategy=hard_mining": self.batching.strategy == "hard_mining",
            NOISE_MEASURED: self.train.noise_scale and self.train.loss != "nt_xent" and (
                self.scaling.num_workers > 1 or self.accumulation_steps() > 1),
            "train.batch_size_schedule=adaptive": self.train.batch_size_schedule == "adaptive",
        }
        return (*ALWAYS_LOGGED, *(k for k, cond in SOMETIMES_LOGGED.items() if when[cond]))

    def check_tune(self) -> None:
        """The sweep's checks on a resolved config: tune.metric is one this run logs, and
        tune.target_accuracy (a threshold on val_accuracy) has a val_accuracy to compare to and
        is not mistaken for a threshold on another accuracy. ConfigError otherwise."""
        tu, logged = self.tune, self.logged_metrics()
        if tu.metric not in logged:
            raise ConfigError(f"config error: tune.metric={tu.metric!r} is not logged by this run "
                              f"(only when {SOMETIMES_LOGGED[tu.metric]}); it logs "
                              f"{', '.join(logged)}")
        better = METRIC_MODES.get(tu.metric)
        if better is not None and tu.mode != better:  # ASHA would keep, the report crown, the worst
            raise ConfigError(f"config error: tune.metric={tu.metric} is better when "
                              f"{'higher' if better == 'max' else 'lower'}: set tune.mode={better} "
                              f"(now {tu.mode})")
        if tu.target_accuracy is None:
            return
        if "val_accuracy" not in logged:
            raise ConfigError(
                f"config error: tune.target_accuracy={tu.target_accuracy:g} is a val_accuracy "
                "threshold but this run logs no val_accuracy (data.val_fraction=0); set "
                "tune.target_accuracy=null or data.val_fraction > 0")
        if tu.metric != "val_accuracy" and tu.metric.endswith("accuracy"):
            raise ConfigError(
                f"config error: tune.target_accuracy={tu.target_accuracy:g} is compared to "
                f"val_accuracy, not to tune.metric={tu.metric}; set tune.metric=val_accuracy or "
                "tune.target_accuracy=null")

    # -- derived values -------------------------------------------------------------------
    def per_worker_batch(self) -> int:
        return self.train.global_batch_size // self.scaling.num_workers

    def accumulation_steps(self) -> int:
        """global = micro x workers x accumulation (1 when micro is None or auto at start)."""
        micro = self.train.micro_batch_size
        return self.per_worker_batch() // micro if isinstance(micro, int) else 1

    def tracking_uri(self) -> str:
        """Explicit `tracking.uri`, else MLFLOW_TRACKING_URI, else the store `mlflow ui` shows
        when started in the current directory (MLflow 3 defaults to sqlite:///mlflow.db). A
        relative sqlite path is made absolute here: the workers run in a directory of their
        own, where it would name another, empty database."""
        uri = (self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
        return absolute_sqlite(uri)

    def tracking_source(self) -> str:
        """Where `tracking_uri()` comes from, for a line that names it (`named_store`)."""
        return ("tracking.uri" if self.tracking.uri else "MLFLOW_TRACKING_URI"
                if os.environ.get("MLFLOW_TRACKING_URI") else DEFAULT_STORE)

    # -- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as data (options of another strategy included, as given: a trial that
        switches to that strategy gets them)."""
        raw = self.model_dump(mode="json")
        other = self.batching._other_options
        if other:
            raw["batching"]["options"] = {**raw["batching"]["options"], **other}
        return raw

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> string, for MLflow params (the whole resolved config). A mapping (e.g.
        `model.kwargs`) becomes one string, so its credential-named keys are masked first: the
        masking by name (`pipeline/redact.py`) cannot see them inside the string."""
        from pipeline.redact import redact

        return {k: "None" if v is None else str(redact(v, env_values=[]) if isinstance(v, dict)
                                                else v)
                for k, v in flatten(self.to_dict()).items()}

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with dotted-key overrides (used by Tune trials)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return validate(raw)


def describe(cfg: Config | None = None) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value in `cfg`, default, description) of every key, from the typed config
    itself (the value is the default when `cfg` is None): the config's reference as data, which
    tests/test_config.py checks is complete (`--print-config` writes it as YAML:
    `cli.config_yaml`).

    >>> rows = {key: rest for key, *rest in describe(Config(train=TrainConfig(epochs=3)))}
    >>> rows["train.epochs"]
    [3, 10, 'passes over the training pool']
    >>> rows["data.feature_column"][1] is None and all(desc for *_, desc in rows.values())
    True
    """
    cfg = cfg or Config()
    rows = []
    for section, info in Config.model_fields.items():
        values = getattr(cfg, section)
        for key, field in info.annotation.model_fields.items():
            default = field.get_default(call_default_factory=True)
            rows.append((f"{section}.{key}", getattr(values, key), default, field.description))
    return rows


def changed_keys(before: dict[str, Any], now: dict[str, Any],
                 may_change: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between two config dicts, but for those that start
    with one of `may_change` (a key, or a section with its dot).

    >>> changed_keys({"train": {"epochs": 2, "seed": 0}}, {"train": {"epochs": 4, "seed": 1}},
    ...              may_change=("train.epochs",))
    ['train.seed']
    """
    a, b = flatten(before), flatten(now)
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and not k.startswith(may_change))


# MLflow 3's tracking stores, by URI scheme (a database's may name its driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")
# MLflow's names of a remote workspace, written without a scheme
WORKSPACE_URIS = ("databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str, name: str = "tracking.uri") -> None:
    """ConfigError (one line, naming `name`: where the URI came from) for a tracking URI MLflow
    has no store for -- a typo such as `htp://` would otherwise pass the reachability probe
    (not http) and fail on the cluster.

    >>> check_tracking_uri("http://127.0.0.1:5000"), check_tracking_uri("postgresql+psycopg2://h/db")
    (None, None)
    >>> check_tracking_uri("htp://host:5000")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: config error: tracking.uri=htp://host:5000: MLflow has no store ...

    A path (or `file:`) is MLflow's file store, which MLflow 3 refuses unless
    MLFLOW_ALLOW_FILE_STORE is set: said here, with what was probably meant (it was MLflow's
    message, under tracking.experiment's name). The scheme is read as MLflow reads it.

    >>> check_tracking_uri("127.0.0.1:5000", "MLFLOW_TRACKING_URI")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: config error: MLFLOW_TRACKING_URI=127.0.0.1:5000: a path is ...
    """
    from urllib.parse import urlparse


    if uri in WORKSPACE_URIS:
        return
    named = named_store(uri, name)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # (a Windows drive letter: a path too)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
            return
        raise ConfigError(f"config error: {named}: a path is MLflow's file "
                          "store, which MLflow 3 refuses (MLFLOW_ALLOW_FILE_STORE=true opts in); "
                          "a tracking server is http://HOST:PORT, a local store sqlite:///PATH")
    from importlib.metadata import entry_points  # stores MLflow plugins add, by their scheme

    plugins = {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    if scheme.split("+", 1)[0] not in (*TRACKING_SCHEMES, *plugins):
        raise ConfigError(f"config error: {named}: MLflow has no store for "
                          f"{scheme!r} URIs (known: {', '.join(TRACKING_SCHEMES)})")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):  # (SQLAlchemy's ArgumentError,
        # after the cluster work)
        raise ConfigError(f"config error: {named}: a sqlite store is "
                          "sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db")
    if scheme == "sqlite" and (problem := sqlite_problem(uri)) is not None:
        raise ConfigError(f"config error: {named}: {problem}")


def named_store(uri: str, name: str) -> str:
    """A store as a refusal names it, masked: KEY=URI (`name`: where the URI came from, e.g.
    tracking.uri or a run.json's field); where none is set, "the default store (...) URI"."""
    from pipeline.redact import redact_text

    return f"{name}{' ' if name == DEFAULT_STORE else '='}{redact_text(uri)}"


DEFAULT_STORE = "the default store (tracking.uri and MLFLOW_TRACKING_URI unset)"  # its name in
# a refusal (`check_tracking_uri`): mlflow.db in the current folder (`Config.tracking_uri`)


def sqlite_problem(uri: str) -> str | None:
    """Why the sqlite store at `uri` cannot be opened or made here (MLflow would fail on it
    after the cluster work, with sqlite's "unable to open database file"), or None.

    >>> import tempfile; root = tempfile.mkdtemp()
    >>> sqlite_problem(f"sqlite:///{root}/mlflow.db") is None
    True
    >>> sqlite_problem("sqlite:///:memory:").startswith("an in-memory store lives in one process")
    True
    >>> sqlite_problem(f"sqlite:///{root}/no/mlflow.db").endswith("/no does not exist")
    True
    >>> sqlite_problem(f"sqlite:///{root}")
    'it is a folder, not a database file'
    """
    path = sqlite_file(uri)
    if not path:
        return None
    if path.startswith(":memory:") or "mode=memory" in uri.partition("?")[2]:  # (a worker's
        # metrics went to a store of its own: MLflow refused them as an unknown run, and
        # nothing outlived the command)
        return ("an in-memory store lives in one process: the workers' metrics and the MLflow "
                "UI cannot reach it, and it is gone when the command ends; give a file")
    db = Path(path)
    if db.is_dir():
        return "it is a folder, not a database file"
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        return f"{db} is not writable"
    folder = db.parent
    if not folder.is_dir():
        return f"the folder {folder.absolute()} does not exist"
    # (sqlite writes its journal beside the database: the folder must be writable too)
    return None if os.access(folder, os.W_OK | os.X_OK) else f"the folder {folder} is not writable"


def absolute_sqlite(uri: str) -> str:
    """A sqlite URI with a relative path (three slashes) as one with the absolute path (four)
    from the current directory; any other URI as it is.

    >>> absolute_sqlite("sqlite:////srv/mlflow.db"), absolute_sqlite("http://h:5000")
    ('sqlite:////srv/mlflow.db', 'http://h:5000')
    >>> absolute_sqlite("sqlite:///runs/mlflow.db") == f"sqlite:///{Path.cwd()}/runs/mlflow.db"
    True
    """
    head = "sqlite:///"
    path = uri[len(head):] if uri.startswith(head) else ""
    if not path or path.startswith(("/", ":")):  # absolute, or `:memory:`
        return uri
    return head + str(Path.cwd() / path)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as {dotted key: value}, one level deep: the sections' keys; a mapping
    inside a section (batching.options, model.kwargs, tune.search_space) stays one value.

    >>> flatten({"train": {"epochs": 3}, "model": {"kwargs": {"hidden": 8}}})
    {'train.epochs': 3, 'model.kwargs': {'hidden': 8}}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; the section and key must already exist (except inside
    free-form dict fields such as batching.options). A whole section given a mapping
    (`train={epochs: 3}`) is merged into it, as a config file's section is (it replaced the
    section, every other key back to its default). Below `tune.search_space` the rest of the
    key is one name, a swept key (`tune.search_space.train.base_lr={grid: [0.1, 0.2]}`).

    >>> raw = {"train": {"epochs": 1, "seed": 0}, "tune": {"search_space": {}}}
    >>> set_dotted(raw, "train", {"epochs": 3}); raw["train"]
    {'epochs': 3, 'seed': 0}
    >>> set_dotted(raw, "tune.search_space.train.seed", {"grid": [1, 2]})
    >>> raw["tune"]["search_space"]
    {'train.seed': {'grid': [1, 2]}}
    """
    parts = key.split(".")
    if len(parts) == 1 and isinstance(raw.get(key), dict) and isinstance(value, dict):
        raw[key] = {**raw[key], **value}
        return
    if parts[:2] == ["tune", "search_space"] and len(parts) > 3 \
            and isinstance(raw.get("tune"), dict) and isinstance(raw["tune"].get("search_space"), dict):
        raw["tune"]["search_space"][".".join(parts[2:])] = value
        return
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
    """The config's first error in one line, counting the others."""
    more = len(err.errors()) - 1
    return f"config error: {_first_error(err)}" + (f" [+{more} more]" if more else "")


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _text_field(key: str) -> bool:
    """Whether the dotted key names a field of text (`str` or `str | None`)."""
    section, _, name = key.partition(".")
    model = Config.model_fields.get(section)
    field = None if model is None else model.annotation.model_fields.get(name)  # type: ignore[union-attr]
    return field is not None and field.annotation in (str, str | None)


def sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite store's URI; None for another store.

    >>> sqlite_file("sqlite:////data/mlflow.db?timeout=5"), sqlite_file("http://h:5000")
    ('/data/mlflow.db', None)
    """
    return uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else None


def missing_resumed_store(run_id: str, uri: str) -> ConfigError | None:
    """The refusal of a --resume whose run's sqlite store file is gone (moved, deleted): MLflow
    would make an empty one and fail on the run after the cluster work. None otherwise."""
    local = sqlite_file(uri)
    if local is None or Path(local).exists():
        return None
    from pipeline.redact import redact_text

    return ConfigError(f"argument error: --resume: MLflow run {run_id} is in {redact_text(uri)}, "
                       "and that database file is missing (moved or deleted?)")


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value). A field of text keeps the text as given,
    stripped (`tracking.experiment=2024`, `run_name=12:30`, `run_name=run #1`: not YAML's int,
    base-60 number or comment), unless it is YAML's null (`null`, `~`) or quoted. No value at
    all is refused: `--set data.path=$DATA` with DATA unset would train the embedded dataset.

    >>> parse_override("data.path=null"), parse_override("train.epochs= 3")
    (('data.path', None), ('train.epochs', 3))
    >>> parse_override("data.path=")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: config error: --set data.path= gives no value ...
    """
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: expected dotted.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not text.strip():
        raise ConfigError(f"config error: --set {key}= gives no value (an unset shell variable?): "
                          f"give {key}=null to unset the key")
    if _text_field(key) and text.strip() not in ("~", "null", "Null", "NULL"):
        try:
            value = yaml.load(text, Loader=_Loader)
        except (yaml.YAMLError, ValueError, TypeError):  # (a bad `!!int` tag, say: kept as text)
            value = None
        quoted = text.strip()[:1] in ("'", '"') and isinstance(value, str)
        return key, value if quoted else text.strip()  # as typed, a `#` and all
    try:
        value = yaml.load(text, Loader=_Loader)
    except _Refused as err:
        raise ConfigError(f"config error: --set {key}={text.strip()}: {err}") from None
    except yaml.YAMLError:
        value = text
    except (ValueError, TypeError) as err:  # a tag PyYAML cannot build: `!!int x`
        raise ConfigError(f"config error: --set {key}={text.strip()}: not a value YAML can "
                          f"read ({err})") from None
    return key, value


# YAML 1.1's surprises, which PyYAML follows: a leading zero is octal (010 = 8), colons base 60
# (1:30 = 90). `train.seed=010` trained with seed 8.
_YAML11_NUMBER = re.compile(r"[-+]?0[0-7_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


class _Refused(yaml.YAMLError):
    """YAML that PyYAML reads, but not as meant (said in one line: see `_Loader`)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would read without a word but not as meant: a
    key given twice in one mapping (PyYAML keeps the last: a section written twice lost the
    first one's settings), and YAML 1.1's octal and base-60 numbers (`seed: 010` is 8, `1:30`
    is 90), in a config file and in a --set value, nested ones too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<`: merged (and overridden) later
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _Refused(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error, below
                continue
        return super().construct_mapping(node, deep)

    def _number(self, node: yaml.ScalarNode, read: Any) -> Any:
        value = read(self, node)
        if _YAML11_NUMBER.fullmatch(node.value.strip()):
            raise _Refused(f"{node.value} reads as {value!r} in YAML 1.1 (an octal or base-60 "
                           "number); write the number you mean")
        return value


_Loader.add_constructor("tag:yaml.org,2002:int",
                        lambda ld, n: ld._number(n, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float",
                        lambda ld, n: ld._number(n, yaml.SafeLoader.construct_yaml_float))
# A date or time stays its text (`run_name: 2024-06-30`): no setting takes a date, and PyYAML
# raised a bare ValueError on one that is not a day (`2024-02-30`).
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or defaults when path is None), apply `--set` overrides, validate."""
    raw: dict[str, Any] = Config().to_dict()
    if path is not None:
        p = Path(path).expanduser()
        try:
            kind = "a folder" if p.is_dir() else "absent" if not p.exists() else (
                "not a regular file" if not p.is_file() else None)
        except OSError as err:  # a name too long, say
            raise ConfigError(f"config error: cannot read {p} ({err.strerror or err})") from None
        if kind == "absent":
            raise ConfigError(f"config error: no such config file: {p}")
        if kind is not None:
            raise ConfigError(f"config error: the config file {p} is {kind}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except _Refused as err:
            raise ConfigError(f"config error: {p}: {err}") from None
        except yaml.YAMLError as err:
            mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error: {p} is not valid YAML ({err.__class__.__name__}"
                              f"{': ' + problem if problem else ''}{where})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {p} is not UTF-8 text") from None
        except (ValueError, TypeError) as err:  # a tag PyYAML cannot build: `epochs: !!int x`
            raise ConfigError(f"config error: {p}: not a config YAML can read ({err})") from None
        except OSError as err:
            raise ConfigError(f"config error: cannot read {p} ({err.strerror})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: {p} must hold a mapping of sections")
        for section, values in loaded.items():
            if section not in raw:
                raise ConfigError(f"config error: unknown section {section!r} in {p}")
            if values is None:  # `tune:` with every key commented out
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config error: section {section!r} must be a mapping")
            # a mapping's field with every entry commented out (`options:` alone) is an empty
            # one, as a section is
            raw[section].update({k: {} if v is None and isinstance(raw[section].get(k), dict)
                                 else v for k, v in values.items()})
    for item in overrides:  # (a key given twice: the last wins, as a script's default and
        key, value = parse_override(item)  # the user's own after it mean)
        set_dotted(raw, key, value)
    t = raw["train"] if isinstance(raw["train"], dict) else {}  # not a mapping: validate says so
    if (t.get("batch_size_throughput") is not None and t.get("batch_size_step_cost") is not None
            and not _step_cost_from_file(t, raw["scaling"])):
        # two sources of c: resolve fills the step cost from the file, so a run's resolved
        # config (MLflow's config.yaml) holds both, in agreement, and is taken back as it is
        raise ConfigError(_two_step_costs(t, raw["scaling"]))
    return validate(raw)


def _two_step_costs(train: dict[str, Any], scaling: Any) -> str:
    """The line for a step cost that is not the one train.batch_size_throughput's file gives
    for the config's workers: where it is the file's for another worker count (a run's resolved
    config given back with other `scaling.num_workers`), it says so."""
    from pipeline.find_batch_size import step_cost_from

    try:
        per_worker = step_cost_from(str(train["batch_size_throughput"]), 1)
        workers = float(train["batch_size_step_cost"]) / per_worker
    except (ConfigError, TypeError, ValueError, KeyError, ZeroDivisionError):
        workers = math.nan
    if math.isfinite(workers) and workers >= 1 and math.isclose(workers, round(workers),
                                                                 rel_tol=1e-9):
        now = scaling.get("num_workers") if isinstance(scaling, dict) else None
        return (f"config error: train.batch_size_step_cost={train['batch_size_step_cost']} is "
                f"train.batch_size_throughput's step cost for {round(workers)} worker(s) "
                f"({per_worker:g} per worker), not for scaling.num_workers={now}: set it to "
                "null to take the file's for this run's workers")
    return ("config error: train.batch_size_step_cost and train.batch_size_throughput are both "
            "set: set one (the other null)")


def _step_cost_from_file(train: dict[str, Any], scaling: Any) -> bool:
    """Whether train.batch_size_step_cost is the one train.batch_size_throughput's file gives
    for the config's workers (as `resolve` fills it)."""
    from pipeline.find_batch_size import step_cost_from

    try:
        workers = scaling["num_workers"]
        return math.isclose(float(train["batch_size_step_cost"]),
                            step_cost_from(str(train["batch_size_throughput"]), workers),
                            rel_tol=1e-9)
    except (ConfigError, TypeError, ValueError, KeyError):
        return False
