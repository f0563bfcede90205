"""Where a `--resume` of a job goes on from, checked before any cluster work: the run's latest
checkpoint, and a config that still describes the training the checkpoints belong to (pure:
the CLI refuses a bad --resume with exit 2 before a line of the run's setup is printed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, changed_keys
from pipeline.data.epochs import keep_pacing, with_pacing

# What a `--resume` may change: more epochs, validation more or less often, another cluster
# shape or data mode (the batches depend on neither) and whether the model is logged. Anything
# else makes the resumed run another training than the one its checkpoints and MLflow run
# belong to.
RESUME_MAY_CHANGE = ("train.epochs", "train.eval_every", "scaling.", "tracking.log_model",
                     "data.mode")


def resume_point(cfg: Config, storage: Path, started: dict[str, Any],
                 on_skip: Callable[[Path, str], None] | None = None, checksum: bool = True
                 ) -> tuple[Config, Path, dict[str, Any]]:
    """Where a --resume of the run `started` (its run.json) goes on from: (the config as it
    resumes, the latest checkpoint under `storage`, the keys it changes and their new values);
    ConfigError (exit 2) when there is no checkpoint or the config changed more than a resume
    may (`RESUME_MAY_CHANGE`). `checksum=False`: a quick look (`find_latest_checkpoint`)."""
    from pipeline.engine.checkpoint import epochs_done, find_latest_checkpoint  # (torch: not
    # for --help)

    resume_from = find_latest_checkpoint(storage, on_skip=on_skip, checksum=checksum)
    if resume_from is None:
        raise ConfigError(f"argument error: --resume: no checkpoint under {storage}")
    done = epochs_done(resume_from)
    if cfg.train.epochs < done:  # (it ended at once, "done after" the checkpoint's epochs)
        raise ConfigError(f"argument error: --resume: train.epochs={cfg.train.epochs} is fewer "
                          f"than the {done} epochs the run has trained ({resume_from.name}): a "
                          "resume goes on to more epochs (the same number ends it there)")
    if not started:
        return cfg, resume_from, {}
    before = started.get("config") or cfg.to_dict()
    cfg = keep_pacing(cfg, before)  # a curriculum's pool widens as it started to
    every = changed_keys(with_pacing(before), cfg.to_dict())
    changed = [k for k in every if not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise ConfigError(
            f"argument error: --resume: the config differs from the run's in "
            f"{', '.join(changed)} (a resume may change only "
            f"{', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)})")
    now = cfg.flat_params()
    return cfg, resume_from, {k: now[k] for k in every if k in now}


def resume_folder(started: dict[str, Any]) -> str:
    """The folder under ray_results/ of a resumed run's checkpoints, named in its run.json
    (`started`); "" (the whole of ray_results/) for a run.json written before it was kept."""
    return started.get("checkpoints") or ""
