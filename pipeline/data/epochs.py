"""The batches of one epoch as a training job sees them (pure numpy; shared by the Ray Train
worker and `inspect-batches`, so what is inspected is exactly what is trained)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data import strategies as _strategies  # noqa: F401  (registers the planners)
from pipeline.data.batches import SampleTable
from pipeline.data.plan import EpochPlan, SampleMeta, plan_epoch


@dataclass(frozen=True)
class EpochBatches:
    plan: EpochPlan
    batches: list[np.ndarray]  # global batches every rank can take a share of
    dropped: int  # plan drops + batches too small to give every rank a sample


def planner_options(cfg: Config) -> dict[str, Any]:
    opts = {k: v for k, v in cfg.batching.options.items() if k != "difficulty"}
    if cfg.batching.strategy == "curriculum":
        opts.setdefault("pacing_epochs", max(1, cfg.train.epochs // 2))
    return opts


def pool_meta(cfg: Config, st: SampleTable, train_pos: np.ndarray,
              sample_losses: np.ndarray | None) -> SampleMeta:
    """Planner input. Curriculum difficulty: `batching.difficulty_column`, else a scoring pass
    named by `batching.options.difficulty` (`length`: longer sequences are harder)."""
    meta = st.meta(train_pos, sample_losses)
    if meta.difficulty is None and cfg.batching.options.get("difficulty") == "length":
        if meta.lengths is None:
            raise ValueError("batching.options.difficulty=length needs a sequence column")
        meta = SampleMeta(ids=meta.ids, labels=meta.labels, lengths=meta.lengths,
                          difficulty=meta.lengths.astype(np.float64), weights=meta.weights)
    return meta


def epoch_batches(cfg: Config, st: SampleTable, train_pos: np.ndarray, epoch: int,
                  world_size: int, sample_losses: np.ndarray | None = None) -> EpochBatches:
    b = cfg.batching
    plan = plan_epoch(b.strategy, pool_meta(cfg, st, train_pos, sample_losses), seed=b.seed,
                      epoch=epoch, global_batch_size=cfg.train.global_batch_size,
                      drop_last=b.drop_last, **planner_options(cfg))
    keep = [x for x in plan.batches if len(x) >= world_size]  # every rank needs >= 1 sample
    short = sum(len(x) for x in plan.batches if len(x) < world_size)
    return EpochBatches(plan=plan, batches=keep, dropped=plan.dropped + short)
