"""The per-worker function of Ray Train: shard -> batches -> engine (Ray lives here).

Every worker receives the dataset's Arrow blocks (object refs: zero-copy from the node's object
store), builds the same epoch plan from (data, seed, epoch, global batch size), takes its slice
of each global batch, and steps the pure-PyTorch engine. Rank 0 logs metrics to MLflow and
writes one checkpoint per epoch, reported to Ray Train (which keeps it in run storage).
"""

from __future__ import annotations

import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from pipeline import console
from pipeline.config import Config, ConfigError
from pipeline.data.batches import SampleTable, micro_slices, split_train_val
from pipeline.data.epochs import epoch_batches, schedule_steps, steps_per_epoch
from pipeline.data.plan import rank_slice
from pipeline.data.views import make_views
from pipeline.engine.batchnorm import has_batchnorm
from pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from pipeline.engine.loop import LoopState, NonFiniteError, assert_finite_weights, train_epoch
from pipeline.engine.models import build_model
from pipeline.engine.noise import NoiseScale, attach_local_norm
from pipeline.engine.optim import build_optimizer
from pipeline.engine.schedule import lr_at, scale_lr
from pipeline.engine.step import evaluate, to_torch
from pipeline.files import write_json
from pipeline.tracking import MetricLogger


def load_table(cfg: Config, refs: list[Any]) -> SampleTable:
    table = pa.concat_tables(ray.get(refs))
    d = cfg.data
    return SampleTable.from_table(
        table, feature_column=d.feature_column, label_column=d.label_column,
        sequence_column=d.sequence_column, target_column=d.target_column,
        id_column=d.id_column, difficulty_column=cfg.batching.difficulty_column)


def model_spec(cfg: Config, st: SampleTable) -> dict[str, Any]:
    """Everything needed to rebuild the model (kept in checkpoints for the final artifact)."""
    per_token = cfg.train.loss == "token_cross_entropy"
    if cfg.train.loss == "nt_xent":
        outputs = int(cfg.model.kwargs.get("embedding_dim", 32))
    elif per_token:
        outputs = int(pa.compute.max(pa.compute.list_flatten(st.targets)).as_py()) + 1
    else:
        outputs = int(st.labels.max()) + 1
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "embedding_dim"}
    return {
        "name": cfg.model.name,
        "input_dim": None if st.features is None else int(st.features.shape[1]),
        "num_outputs": outputs,
        "vocab_size": None if st.tokens is None
        else int(pa.compute.max(pa.compute.list_flatten(st.tokens)).as_py()) + 1,
        "per_token": per_token,
        "activation_checkpointing": cfg.model.activation_checkpointing,
        **kwargs,
    }


FATAL = "fatal_error"  # metric of a deterministic failure, reported instead of raised; rank 0
# writes the message to `loop_config["fatal_file"]` (under --out) for the driver


def train_func(loop_config: dict[str, Any]) -> None:
    """Train, or end at once on a deterministic failure (bad input, non-finite training): every
    rank meets it at the same point, reports `fatal_error` and returns, so Ray Train does not
    restart the worker group to meet it again; the driver turns it into the job's error."""
    try:
        _train(loop_config)
    except (ConfigError, NonFiniteError) as err:  # bad input the driver could not see, or NaN
        kind = "input" if isinstance(err, ConfigError) else "nonfinite"
        if ray.train.get_context().get_world_rank() == 0 and loop_config.get("fatal_file"):
            write_json(Path(loop_config["fatal_file"]), {"kind": kind, "message": str(err)})
        ray.train.report({FATAL: 1.0})


def _train(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    try:
        st = load_table(cfg, loop_config["table_refs"])
    except ConfigError:  # the table's own checks (pipeline.data.batches) name the culprit
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError, TypeError) as err:
        # The driver checked the data; it changed since, or a check missed it.
        raise ConfigError(f"data error: {cfg.data.path or cfg.data.name}: {err}") from None
    train_pos, val_pos = split_train_val(len(st), st.labels, cfg.data.val_fraction,
                                         cfg.data.split_seed)
    spec = model_spec(cfg, st)
    try:
        model = build_model(**spec)
    except ValueError as err:  # e.g. a model that cannot take this data
        raise ConfigError(f"config error: model.name={cfg.model.name}: {err}") from None
    batchnorm = has_batchnorm(model)
    if batchnorm and cfg.train.micro_batch_size == "auto" and not cfg.train.auto_micro_batchnorm:
        raise ConfigError(
            "config error: train.micro_batch_size=auto would change the ghost-batch size of the "
            f"BatchNorm layers of model.name={cfg.model.name} on out-of-memory; set a fixed size "
            "or train.auto_micro_batchnorm=true")
    if cfg.train.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    # The noise scale's small batch with several workers: each rank's own gradient, read by a
    # DDP communication hook just before the all-reduce (pipeline/engine/noise.py).
    noise_probe = (attach_local_norm(model) if cfg.train.noise_scale and world > 1
                   and isinstance(model, torch.nn.parallel.DistributedDataParallel) else None)
    t = cfg.train
    optimizer = build_optimizer(t.optimizer, model, lr=t.base_lr, weight_decay=t.weight_decay,
                                momentum=t.momentum)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    G = t.global_batch_size
    # The schedule's length from the plans themselves: curriculum, balanced, hard-mining and
    # token-budget epochs have their own step counts (pure and cheap: no gather, no shuffle).
    try:
        total_steps, warmup = schedule_steps(steps_per_epoch(cfg, st, train_pos, world),
                                             t.warmup_epochs, t.max_steps)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    peak = scale_lr(t.base_lr, t.base_batch_size, G, t.lr_scaling)

    def lr_fn(step: int) -> float:
        return lr_at(step, base_lr=t.base_lr, peak_lr=peak, warmup_steps=warmup,
                     total_steps=total_steps, schedule=t.schedule)

    per_worker = G // world
    state = LoopState(micro_batch_size=t.micro_batch_size
                      if isinstance(t.micro_batch_size, int) else per_worker,
                      noise=NoiseScale(beta=t.noise_scale_ema) if t.noise_scale else None)
    sample_losses: np.ndarray | None = None
    ckpt = ray.train.get_checkpoint()
    resume_dir = None
    if ckpt is not None:
        resume_dir = ckpt.to_directory()
    elif loop_config.get("resume_from"):
        resume_dir = loop_config["resume_from"]
    if resume_dir is not None:
        s = load_checkpoint(resume_dir, map_location=device)
        _unwrap(model).load_state_dict(s["model"])
        optimizer.load_state_dict(s["optimizer"])
        if scaler is not None and s.get("scaler"):
            scaler.load_state_dict(s["scaler"])
        state.step, state.epoch = int(s["step"]), int(s["epoch"]) + 1
        state.skipped_steps = int(s.get("skipped_steps", 0))
        state.nonfinite_steps = int(s.get("nonfinite_steps", 0))
        if state.noise is not None and s.get("noise"):
            state.noise.load_state_dict(s["noise"])
        state.micro_batch_size = int(s.get("micro_batch_size", state.micro_batch_size))
        sample_losses = s.get("sample_losses")
    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    b = cfg.batching

    def collate(part: np.ndarray, key: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Gather + padded collate; contrastive: V augmented views per sample, seeded by key."""
        nb = st.gather(part, max_length=b.max_length, pad_multiple_of=b.pad_multiple_of)
        if t.loss == "nt_xent":  # views keyed by (seed, epoch, sample, view): split-independent
            nb = make_views(nb, num_views=b.num_views, key=key, sample_keys=part,
                            image_shape=(8, 8) if spec["name"] == "digits_cnn" else None)
            nb["view_to_sample"] = part[nb["view_to_sample"]]  # unique across the global batch
            nb.pop("view_index", None)
        return nb

    def step_batches(mine: np.ndarray, key: tuple[int, ...], pad_stats: dict[str, int]) -> Any:
        """This rank's share of one global batch, cut into micro-batches on demand (the size
        can shrink on out-of-memory)."""

        def micro(size: int) -> list[dict[str, torch.Tensor]]:
            out = []
            for part in micro_slices(mine, size):
                nb = collate(part, key)
                if "attention_mask" in nb:
                    pad_stats["real"] += int(nb["attention_mask"].sum())
                    pad_stats["padded"] += int(nb["attention_mask"].size)
                out.append(to_torch(nb, device))
            return out

        return micro

    my_val = rank_slice(val_pos, rank, world)
    for epoch in range(state.epoch, t.epochs):
        state.epoch = epoch
        if t.max_steps is not None and state.step >= t.max_steps:
            break
        eb = epoch_batches(cfg, st, train_pos, epoch, world, sample_losses)
        if rank == 0 and eb.plan.note:
            console.say(eb.plan.note)
        plan, batches, dropped = eb.plan, eb.batches, eb.dropped
        pad_stats = {"real": 0, "padded": 0}

        steps_log: list[tuple[int, dict[str, float]]] = []
        bar = None  # a progress bar within the epoch, drawn on the driver's terminal
        if rank == 0 and loop_config.get("progress_bar"):
            from ray.experimental.tqdm_ray import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{t.epochs}", unit="step")
        start = time.perf_counter()
        metrics = train_epoch(
            model, optimizer,
            (step_batches(rank_slice(x, rank, world), (b.seed, epoch, 0), pad_stats) for x in batches),
            state, lr_fn=lr_fn, loss=t.loss, precision=t.precision, scaler=scaler,
            grad_clip=t.grad_clip, auto_micro=t.micro_batch_size == "auto", max_steps=t.max_steps,
            on_step=partial(_record_step, steps_log, bar), seed=t.seed, rank=rank,
            nonfinite=t.nonfinite, nonfinite_limit=t.nonfinite_limit, noise_probe=noise_probe,
            on_event=console.say if rank == 0 else None)
        wall = time.perf_counter() - start
        if bar is not None:
            bar.close()
        eval_batches = (to_torch(collate(p, (b.seed, epoch, 1)), device)
                        for p in micro_slices(my_val, per_worker))
        if len(val_pos):
            metrics.update(evaluate(model, eval_batches, loss=t.loss, precision=t.precision))
        if b.strategy == "hard_mining":
            sample_losses = _score_pool(model, st, train_pos, rank, world, per_worker, cfg, device)
            pool_losses = sample_losses[train_pos]
            metrics.update({"hard_mining/loss_mean": float(pool_losses.mean()),
                            "hard_mining/loss_p90": float(np.quantile(pool_losses, 0.9))})
        trained = int(metrics["steps"]) and sum(len(x) for x in batches[: int(metrics["steps"])])
        metrics.update({
            "epoch": epoch + 1, "step": state.step, "samples_per_s": trained / wall,
            "epoch_time_s": wall, "dropped": float(dropped), "pool_size": float(plan.pool_size),
            "skipped_steps": float(state.skipped_steps),
            "nonfinite_steps": float(state.nonfinite_steps),
            "global_batch_size": float(G),
            "micro_batch_size": float(state.micro_batch_size),
        })
        if batchnorm:  # micro-batching is Ghost BatchNorm: the rows each BN normalises over
            metrics["ghost_batch_size"] = float(state.micro_batch_size * (
                world if cfg.train.sync_batchnorm and world > 1 else 1))
        if pad_stats["padded"]:
            metrics["padding_efficiency"] = pad_stats["real"] / pad_stats["padded"]
            metrics["tokens_per_s"] = pad_stats["real"] * world / wall
        if scaler is not None:
            metrics["loss_scale"] = float(scaler.get_scale())
        if logger is not None:
            for step, rec in steps_log:
                logger.add({f"step/{k}": v for k, v in rec.items() if math.isfinite(v)}, step)
            logger.add({k: v for k, v in metrics.items()
                        if k not in ("epoch", "step") and math.isfinite(v)}, epoch + 1)
            logger.flush()
        _report(metrics, model, optimizer, scaler, state, spec, sample_losses, rank)


def _record_step(log: list[tuple[int, dict[str, float]]], bar: Any, state: LoopState,
                 record: dict[str, float]) -> None:
    log.append((state.step, record))
    if bar is not None:
        bar.update(1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _score_pool(model: torch.nn.Module, st: SampleTable, train_pos: np.ndarray, rank: int,
                world: int, batch: int, cfg: Config, device: torch.device) -> np.ndarray:
    """Per-sample training losses (hard-example mining): each rank scores its share of the pool;
    an all-reduce gives every rank the full vector, indexed by table position."""
    import torch.distributed as dist
    import torch.nn.functional as F

    losses = torch.zeros(len(st), dtype=torch.float64, device=device)
    model.eval()
    for part in micro_slices(rank_slice(train_pos, rank, world), batch):
        nb = to_torch(st.gather(part, max_length=cfg.batching.max_length), device)
        out = model(nb).float()
        if cfg.train.loss == "token_cross_entropy":
            per_tok = F.cross_entropy(out.flatten(0, 1), nb["token_targets"].flatten(),
                                      ignore_index=-100, reduction="none").view(out.shape[:2])
            mask = (nb["token_targets"] != -100).float()
            per = (per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)
        else:
            per = F.cross_entropy(out, nb["label"], reduction="none")
        losses[torch.as_tensor(part, device=device)] = per.double()
    if dist.is_initialized() and world > 1:
        dist.all_reduce(losses)
    return losses.cpu().numpy()


def _report(metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, state: LoopState, spec: dict[str, Any], sample_losses: np.ndarray | None,
            rank: int) -> None:
    """One checkpoint per epoch: rank 0 writes it, every rank reports (report is a barrier).
    Weights that are not finite are never written (every rank checks: DDP replicas are equal,
    so all of them stop together)."""
    assert_finite_weights(_unwrap(model), f"at the end of epoch {state.epoch + 1}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(tmp, {
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": state.step, "epoch": state.epoch, "skipped_steps": state.skipped_steps,
                "nonfinite_steps": state.nonfinite_steps,
                "noise": state.noise.state_dict() if state.noise is not None else None,
                "micro_batch_size": state.micro_batch_size, "model_spec": spec,
                "sample_losses": sample_losses, "metrics": metrics,
            })
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
