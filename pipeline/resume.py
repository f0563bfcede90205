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
# shape, micro-batch or data mode (the global batches depend on none of them -- but for what
# `moved_ghost_batch` and `moved_batches` warn of: a model with BatchNorm normalises over the
# micro-batch, the adaptive schedule's k's follow a noise scale measured from each rank's
# share, hard mining scores its pool in chunks of the micro-batch), whether the model is
# logged, and a sweep's settings (`train` reads none); and `train.max_steps`, not below the
# steps trained (a run it stopped goes on). Anything else makes the resumed run another
# training than the one its checkpoints and MLflow run belong to.
RESUME_MAY_CHANGE = ("train.epochs", "train.eval_every", "scaling.", "train.micro_batch_size",
                     "tracking.log_model", "data.mode", "tune.", "train.max_steps")


def resume_point(cfg: Config, storage: Path, started: dict[str, Any],
                 on_skip: Callable[[Path, str], None] | None = None, checksum: bool = True,
                 data: dict[str, Any] | None = None, finished: bool = False
                 ) -> tuple[Config, Path, dict[str, Any]]:
    """Where a --resume of the run `started` (its run.json) goes on from: (the config as it
    resumes, the latest checkpoint under `storage`, the keys it changes and their new values);
    ConfigError (exit 2) when there is no checkpoint, the config changed more than a resume
    may (`RESUME_MAY_CHANGE`) or the data changed (`data`: its `data_fingerprint` now, against
    the one run.json kept), or the run `finished` (its result.json written) at its
    `train.max_steps`, which the resume keeps. `checksum=False`: a quick look
    (`find_latest_checkpoint`)."""
    from pipeline.data.datasets import data_change

    if data is not None and started.get("data") is not None:  # (before the checkpoints' lines)
        change = data_change(started["data"], data)
        if change:
            raise ConfigError(f"data error: --resume: the data changed since the run started: "
                              f"{change}; its checkpoints belong to the data it had (train it "
                              "afresh, without --resume, on the new data)")
    from pipeline.engine.checkpoint import (  # (torch: not for --help)
        epochs_done,
        find_latest_checkpoint,
        steps_done,
    )

    resume_from = find_latest_checkpoint(storage, on_skip=on_skip, checksum=checksum)
    if resume_from is None:
        raise ConfigError(f"argument error: --resume: no checkpoint under {storage}")
    done = epochs_done(resume_from)
    if cfg.train.epochs < done:  # (it ended at once, "done after" the checkpoint's epochs)
        raise ConfigError(f"argument error: --resume: train.epochs={cfg.train.epochs} is fewer "
                          f"than the {done} epochs the run has trained ({resume_from.name}): a "
                          "resume goes on to more epochs (the same number ends it there)")
    cap = cfg.train.max_steps
    if cap is not None and (steps := steps_done(resume_from)) >= cap and (finished or
                                                                      steps > cap):  # (it
        # would train nothing and report the checkpoint's metrics as the resumed run's, with a
        # cap below what it trained; one that stopped before its end at the same cap, in
        # log_model say, ends at that checkpoint)
        raise ConfigError(f"argument error: --resume: the run has trained {steps} steps "
                          f"({resume_from.name}), train.max_steps={cap}: raise train.max_steps "
                          "(or unset it) to train on")
    if not started:
        return cfg, resume_from, {}
    # (a run.json of an earlier version lacks the keys added since: at their defaults, not
    # "changed", or no run of it could be resumed after an upgrade)
    before = _with_defaults(started.get("config") or cfg.to_dict())
    was = before["train"].get("max_steps")
    if (was is not None and (steps := steps_done(resume_from)) >= was and done >= cfg.train.epochs
            and (cap is None or cap > steps)):  # a higher cap, and no epoch left to go on in
        raise ConfigError(f"argument error: --resume: the run stopped at its train.max_steps="
                          f"{was} in its last epoch ({done} of {cfg.train.epochs}): a resume "
                          "goes on from the next epoch's start, so it would train nothing; "
                          "raise train.epochs too")
    cfg = keep_pacing(cfg, before)  # a curriculum's pool widens as it started to
    every = changed_keys(with_pacing(before), cfg.to_dict())
    changed = [k for k in every if not k.startswith(RESUME_MAY_CHANGE)]
    if (cfg.train.batch_size_throughput is not None and "train.batch_size_throughput" not in every
            and "train.batch_size_step_cost" in changed and _same_cost_per_worker(before, cfg)):
        changed.remove("train.batch_size_step_cost")  # the file's, for the new workers
    if changed:
        raise ConfigError(
            f"argument error: --resume: the config differs from the run's in "
            f"{', '.join(changed)} (a resume may change only "
            f"{', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)})")
    now = cfg.flat_params()
    return cfg, resume_from, {k: now[k] for k in every if k in now}


def relaid_schedule(cfg: Config, resumed_with: dict[str, Any]) -> str | None:
    """The warning a --resume with another `train.epochs` gets under a decaying LR schedule
    (`step`, `cosine`), which is laid over the new length from the step it resumes at: the LR
    moves there, and the run is neither the first length's nor an uninterrupted run of the
    new one. None otherwise.

    >>> from pipeline.config import load_config
    >>> cosine = load_config(None, ["train.schedule=cosine", "train.epochs=8"])
    >>> relaid_schedule(cosine, {"train.epochs": 8})[:62]
    'warning: train.epochs is now 8: the cosine LR schedule is laid'
    >>> relaid_schedule(load_config(None, ["train.epochs=8"]), {"train.epochs": 8}) is None
    True
    """
    if cfg.train.schedule == "constant":
        return None
    if "train.max_steps" in resumed_with:  # (the schedule ends at the cap where one is set)
        cap = cfg.train.max_steps
        return (f"warning: train.max_steps is now {cap if cap is not None else 'unset'}: the "
                f"{cfg.train.schedule} LR schedule is laid over the new length from the step "
                "the run resumes at, so the LR moves there (the steps before followed the first "
                "length's)")
    if "train.epochs" not in resumed_with:
        return None
    return (f"warning: train.epochs is now {cfg.train.epochs}: the {cfg.train.schedule} LR "
            f"schedule is laid over {cfg.train.epochs} epochs from the step the run resumes at, "
            "so the LR moves there (the steps before followed the first length's)")


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with every section's keys it lacks at their defaults.

    >>> filled = _with_defaults({"train": {"epochs": 3}})["train"]
    >>> filled["epochs"], filled["nonfinite"]
    (3, 'stop')
    """
    defaults = Config().to_dict()
    return {**config, **{section: {**values, **config.get(section, {})}
                         for section, values in defaults.items()
                         if isinstance(config.get(section, {}), dict)}}  # (else as stored:
    # a damaged section is a difference, not a default)


def cut_epoch(started: dict[str, Any], resume_from: Path, resumed_with: dict[str, Any]
              ) -> str | None:
    """The warning a --resume with another `train.max_steps` gets where the run's cap stopped
    it: a run resumes at the epoch after its checkpoint's, so what the cap left of that epoch
    is not trained. None otherwise."""
    from pipeline.engine.checkpoint import epochs_done, steps_done

    cap = ((started.get("config") or {}).get("train") or {}).get("max_steps")
    if "train.max_steps" not in resumed_with or cap is None or steps_done(resume_from) < cap:
        return None
    epoch = epochs_done(resume_from)
    return (f"warning: the run stopped at its train.max_steps={cap} in epoch {epoch}: it goes "
            f"on from epoch {epoch + 1} (what the cap left of epoch {epoch} is not trained)")


def moved_ghost_batch(cfg: Config, started: dict[str, Any]) -> str | None:
    """The warning a --resume gets when the batch each BatchNorm normalises over (its ghost
    batch: a worker's micro-batch, times the workers under SyncBatchNorm) is not the run's: a
    resume may change the cluster shape and the micro-batch, and for a model with BatchNorm
    that makes the resumed steps another update than the uninterrupted run's. None otherwise
    (no built-in BatchNorm model, an `auto` micro-batch, a batch-size schedule).

    >>> from pipeline.config import load_config
    >>> run = {"config": load_config(None, ["model.name=digits_cnn", "scaling.num_workers=2"]).to_dict()}
    >>> moved_ghost_batch(load_config(None, ["model.name=digits_cnn", "scaling.num_workers=4"]), run)[:56]
    'warning: each BatchNorm now normalises over 16 samples ('
    >>> moved_ghost_batch(load_config(None, ["model.name=digits_cnn", "scaling.num_workers=2"]), run)
    """
    from pipeline.config import BATCHNORM_MODELS, ghost_batch_size

    if cfg.model.name not in BATCHNORM_MODELS or (started_cfg := _started_config(started)) is None:
        return None

    def ghost(c: Config) -> int | None:
        t, workers = c.train, c.scaling.num_workers
        if t.batch_size_schedule != "constant" or t.micro_batch_size == "auto":
            return None
        return ghost_batch_size(t.micro_batch_size or c.per_worker_batch(), workers, t.sync_batchnorm)

    was = ghost(started_cfg)
    now = ghost(cfg)
    if was is None or now is None or was == now:
        return None
    return (f"warning: each BatchNorm now normalises over {now} samples ({was} when the run "
            "started: its workers or micro-batch changed), so the resumed steps are not the "
            "uninterrupted run's")


def moved_batches(cfg: Config, started: dict[str, Any]) -> str | None:
    """The warning a --resume gets when the batches it trains from here may not be the
    uninterrupted run's, though every key it changed may change: the adaptive schedule's k's
    follow a noise scale measured from each rank's share (the small batch: on one worker, the
    first micro-batch), so another worker count -- or micro-batch, on one worker -- measures
    another; hard mining scores its pool in chunks of the micro-batch dealt to the ranks, so
    another micro-batch (or worker count, with the micro-batch global / workers: unset or
    `auto`) scores to other rounding, which moves its rank-based draws. None otherwise.

    >>> from pipeline.config import load_config
    >>> sets = ["train.batch_size_schedule=adaptive", "train.batch_size_min=32", "train.micro_batch_size=16"]
    >>> run = {"config": load_config(None, [*sets, "scaling.num_workers=2"]).to_dict()}
    >>> moved_batches(load_config(None, [*sets, "scaling.num_workers=4"]), run)[:61]
    "warning: the adaptive schedule's noise scale is measured from"
    >>> moved_batches(load_config(None, [*sets, "scaling.num_workers=2", "train.epochs=9"]), run)
    """
    was = _started_config(started)
    if was is None:
        return None
    workers = was.scaling.num_workers != cfg.scaling.num_workers
    micro = was.train.micro_batch_size != cfg.train.micro_batch_size
    if cfg.train.batch_size_schedule == "adaptive" and (
            workers or (micro and cfg.scaling.num_workers == 1)):
        return ("warning: the adaptive schedule's noise scale is measured from each rank's "
                "share of a step (on one worker, its first micro-batch), which the new "
                f"{'workers' if workers else 'micro-batch'} change: the batch sizes it "
                "chooses from here may differ from the uninterrupted run's")
    if cfg.batching.strategy == "hard_mining" and (  # (auto: the share, or what it shrank to)
            micro or (workers and cfg.train.micro_batch_size in (None, "auto"))):
        return ("warning: hard_mining scores its pool in chunks of the micro-batch, which the "
                f"new {'micro-batch' if micro else 'workers'} change: the losses it draws by "
                "differ in rounding, so the later epochs' batches may differ from the "
                "uninterrupted run's")
    return None


def _started_config(started: dict[str, Any]) -> Config | None:
    """The config a run started with (its run.json, `started`), keys added since at their
    defaults; None where there is none, or one this version does not read (nothing to
    compare)."""
    before = started.get("config")
    if not before:
        return None
    try:
        return Config.model_validate(_with_defaults(before))
    except ValueError:
        return None


def resume_folder(started: dict[str, Any]) -> str:
    """The folder under ray_results/ of a resumed run's checkpoints, named in its run.json
    (`started`); "" (the whole of ray_results/) for a run.json written before it was kept."""
    return started.get("checkpoints") or ""


def _same_cost_per_worker(before: dict[str, Any], cfg: Config) -> bool:
    """Whether a step cost filled from `train.batch_size_throughput` (the file's per-worker
    cost times the workers) changed only with the workers: the file read again may hold
    another measurement, which would change c mid-run.

    >>> from pipeline.config import load_config
    >>> now = load_config(None, ["scaling.num_workers=4", "train.batch_size_step_cost=40"])
    >>> before = {"train": {"batch_size_step_cost": 20.0}, "scaling": {"num_workers": 2}}
    >>> _same_cost_per_worker(before, now)
    True
    >>> _same_cost_per_worker({**before, "train": {"batch_size_step_cost": 24.0}}, now)
    False
    """
    import math

    try:
        was = float(before["train"]["batch_size_step_cost"]) / before["scaling"]["num_workers"]
    except (KeyError, TypeError, ZeroDivisionError):
        return False
    now = cfg.train.batch_size_step_cost
    return now is not None and math.isclose(was, now / cfg.scaling.num_workers, rel_tol=1e-9)
