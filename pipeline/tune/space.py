"""A sweep's search space, checked before any cluster work (no Ray, no MLflow here).

`tune.search_space` maps dotted config keys to one spec each: `{grid: [...]}`, `{choice: [...]}`,
`{uniform: [low, high]}` or `{loguniform: [low, high]}`. `check_trials` builds every trial's
config from it and runs the same checks a job gets, so `python -m pipeline tune` refuses a bad
trial (exit 2, one line) before Ray starts; `pipeline/tune/sweep.py` turns the space into Tune's.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from typing import Any

from pipeline.config import Config, ConfigError, DataUnreachable, flatten
from pipeline.data.datasets import DatasetInfo, absolute_path, as_given, refill, resolve
from pipeline.redact import redact

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
MAX_CHECKED_COMBINATIONS = 4096  # beyond, pairs of two keys' values, or one key's (`_to_check`)


# Keys that name a file or folder: a trial runs in Tune's trial folder, so a relative one would
# name another place there (every trial failed, after the sweep had started).
PATH_KEYS = ("data.path", "data.cache_dir", "train.batch_size_throughput")


def _absolute(key: str, value: Any) -> Any:
    return absolute_path(value) if key in PATH_KEYS and isinstance(value, str) else value


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with its paths (`PATH_KEYS`, set or swept) made absolute from this working
    directory, as `resolve` reads them here: what the sweep's trials are given.

    >>> from pipeline.config import load_config
    >>> cfg = with_absolute_paths(load_config(None, ["data.path=d/a.parquet",
    ...     'tune.search_space={"data.path": {"grid": ["d/b.parquet", "s3://x/c"]}}']))
    >>> cfg.data.path == absolute_path("d/a.parquet") != "d/a.parquet"
    True
    >>> cfg.tune.search_space["data.path"]["grid"][1]
    's3://x/c'
    """
    flat = flatten(cfg.to_dict())
    fixed: dict[str, Any] = {k: _absolute(k, flat[k]) for k in PATH_KEYS
                             if flat.get(k) is not None}
    space = {key: ({kind: [_absolute(key, v) for v in values]
                    for kind, values in spec.items()}
                   if key in PATH_KEYS and isinstance(spec, dict)
                   and all(isinstance(v, list) for v in spec.values()) else spec)
             for key, spec in cfg.tune.search_space.items()}
    if space != cfg.tune.search_space:
        fixed["tune.search_space"] = space
    return cfg.with_overrides({k: v for k, v in fixed.items() if flat.get(k) != v})


def parse_search_space(cfg: Config) -> dict[str, tuple[str, list[Any]]]:
    """`tune.search_space` as {dotted key: (kind, values)}; ConfigError naming the culprit for
    an unknown kind, a malformed spec, or a key the config does not have (no Ray needed). A grid
    or choice value is taken as its key's type gives it (YAML 1.1 reads `1e-4` as text, which
    the config reads as 0.0001: [1e-4, 0.0001] is one value twice)."""
    known = flatten(cfg.to_dict())
    out: dict[str, tuple[str, list[Any]]] = {}
    for key, spec in cfg.tune.search_space.items():
        where = f"config error: tune.search_space.{key}"
        if key.startswith("tune.") or key.startswith("tracking."):
            raise ConfigError(f"{where}: the {key.split('.')[0]} section cannot be swept")
        if key not in known and not any(key.startswith(k + ".") and isinstance(v, dict)
                                        for k, v in known.items()):
            raise ConfigError(f"config error: unknown key {key!r} in tune.search_space")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SPEC_KINDS)}: [...]}} "
                              f"(got {spec!r})")
        (kind, values), = spec.items()
        if kind not in SPEC_KINDS:
            raise ConfigError(f"{where}: unknown spec kind {kind!r}; known: "
                              f"{', '.join(SPEC_KINDS)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list (got {values!r})")
        if kind in ("uniform", "loguniform"):
            values = [_number(v) for v in values]  # YAML reads 1e-4 (no point) as text
            ok = (len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in values) and values[0] < values[1])
            if not ok or (kind == "loguniform" and values[0] <= 0):
                raise ConfigError(f"{where}.{kind}: expected [low, high] with "
                                  f"{'0 < ' if kind == 'loguniform' else ''}low < high "
                                  f"(got {values!r})")
        else:
            values = [_typed(cfg, key, v) for v in values]
        out[key] = (kind, values)
    return out


def _typed(cfg: Config, key: str, value: Any) -> Any:
    """`value` as the config holds it under `key` (as given where the config refuses it: the
    trial's checks say why) -- also under a mapping (`batching.options.*`, a built-in model's
    `model.kwargs.*`), which `flatten` keeps whole: "1e2" and 100.0 are one value there too
    (an `import:` model's kwargs are not typed by the config: as given).

    >>> from pipeline.config import load_config
    >>> mining = load_config(None, ["batching.strategy=hard_mining"])
    >>> _typed(mining, "batching.options.selection_pressure", "1e2")
    100.0
    >>> _typed(mining, "train.base_lr", "1e-4")
    0.0001
    """
    try:
        tree = cfg.with_overrides({key: value}).to_dict()
    except ConfigError:
        return value
    typed = _dotted(tree, key)
    return value if typed is None else typed


def _number(value: Any) -> Any:
    """A bound written `1e-4` (a string to YAML 1.1) as the float it means; anything else as
    it is."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


# Keys whose change needs the trial's own ingest: the data, and the difficulty column, which
# the streaming mode's small columns (taken once per sweep, for its config) would not hold.
DATA_KEYS = ("data.", "batching.difficulty_column")


def changes_data(overrides: dict[str, Any]) -> bool:
    """Whether a trial's overrides change `data.*` (or `batching.difficulty_column`): it
    resolves and ingests its own dataset."""
    return any(k.startswith(DATA_KEYS) for k in overrides)


def trial_config(cfg: Config, info: DatasetInfo, overrides: dict[str, Any]
                 ) -> tuple[Config, DatasetInfo]:
    """The config a trial trains, and its dataset: the sweep's config as given (`as_given`:
    what `resolve` filled in undone) with the trial's overrides, filled again for them -- a
    trial of 2 workers gets the step cost of 2, one of `model.name: auto` the model of its data,
    one of another `data.name` that dataset's columns. Resolved in full (its data read) when the
    overrides change `data.*`; else `refill`, from the sweep's dataset (`check_trials` ran the
    full checks on every trial's config before the sweep)."""
    trial = as_given(cfg, info).with_overrides(overrides)
    if changes_data(overrides):
        return resolve(trial)
    return refill(trial, info), info


def check_trials(cfg: Config, info: DatasetInfo | None = None) -> list[Config]:
    """Validate the trial configs before any cluster work: every combination of the discrete
    values and of the continuous bounds and middles (beyond MAX_CHECKED_COMBINATIONS, fewer:
    `_to_check`) goes through `with_overrides` and the dataset checks, so e.g. a batch
    size the workers cannot split fails fast with exit 2. Returns them. `info`: the sweep's
    dataset as `resolve` gave it with `cfg` (its `filled` keys are filled again per trial:
    `trial_config`)."""
    if cfg.tune.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("config error: tune.search=optuna needs Optuna: "
                          "pip install 'batch-pipeline[optuna]'")
    parsed = parse_search_space(cfg)
    if not parsed:
        raise ConfigError("config error: tune.search_space is empty: a sweep varies at least one "
                          "key (python -m pipeline train runs one config)")
    if (cfg.tune.num_samples > 1 and cfg.tune.search == "grid"
            and all(kind == "grid" for kind, _ in parsed.values())):
        raise ConfigError(
            f"config error: tune.num_samples={cfg.tune.num_samples} repeats each grid point "
            "with the same seeds, and training is deterministic: the repeats would train the "
            "same weights; sweep the seeds instead (e.g. train.seed and batching.seed: "
            "{grid: [0, 1, 2]}) or draw values (choice, uniform, loguniform)")
    # Draws with replacement (random, optuna: every key; grid: the choice keys at each grid
    # point) of discrete values only: more trials than distinct combinations repeat one for
    # certain (a choice may list a value twice to draw it more often: counted once)
    drawn = [k for k, (kind, _) in parsed.items()
             if kind == "choice" or (kind == "grid" and cfg.tune.search != "grid")]
    if drawn and all(kind in ("grid", "choice") for kind, _ in parsed.values()):
        distinct = math.prod(len({json.dumps(v, sort_keys=True, default=str)
                                  for v in parsed[k][1]}) for k in drawn)
        if cfg.tune.num_samples > distinct:
            each = " at each grid point" if cfg.tune.search == "grid" else ""
            raise ConfigError(
                f"config error: tune.num_samples={cfg.tune.num_samples} draws more trials"
                f"{each} than the {distinct} distinct combination(s) of {', '.join(drawn)}: "
                "some would train the same weights (training is deterministic): at most "
                f"num_samples={distinct}, the keys as grids under tune.search=grid, or sweep the "
                "seeds")
    for key, (kind, values) in parsed.items():  # (deterministic training: the same weights)
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if kind == "grid" and repeated:  # (a choice repeats a value to draw it more often)
            raise ConfigError(f"config error: tune.search_space.{key} lists {repeated[0]!r} more "
                              "than once: its trials would train the same weights")
    given = as_given(cfg, info) if info is not None else cfg
    cost, model = "train.batch_size_step_cost", "train.batch_size_throughput"
    if (cost in parsed and (model in parsed or given.train.batch_size_throughput is not None)
            or model in parsed and given.train.batch_size_step_cost is not None):
        # (the file's cost replaced the swept one in every trial: trials of the same weights)
        raise ConfigError(f"config error: tune.search_space.{cost if cost in parsed else model}: "
                          f"{model} gives every trial its step cost (its file's, for the "
                          f"trial's workers): sweep or set one of {cost} and {model}, the other "
                          "null")
    keys = list(parsed)
    # a continuous range draws floats between its bounds: one of them is checked too (an integer
    # key given a range of integers would fail in every trial)
    # (not the upper bound itself, which Tune never draws: a range [0.8, 1.0) of a key below 1)
    lists = [[values[0], _between(kind, values), math.nextafter(values[1], values[0])]
             if kind in ("uniform", "loguniform") else values for kind, values in parsed.values()]
    combos = _to_check(keys, lists)
    checked = []
    for combo in combos or [{}]:
        try:
            trial = resolve(given.with_overrides(combo))[0]
            trial.check_tune()  # tune.metric is logged, target_accuracy compares to val_accuracy
            checked.append(trial)
        except (ConfigError, DataUnreachable) as err:  # (a swept secret masked)
            shown = ", ".join(f"{k}={v}" for k, v in redact(combo).items())
            raise type(err)(f"{err} [tune.search_space trial {shown}]") from None
    default = Config().to_dict()
    every = math.prod(len(v) for v in lists) <= MAX_CHECKED_COMBINATIONS  # (else some unseen)
    for key in keys if every else []:  # a swept key no trial uses: the same weights in each
        why = [next((u for u in trial.unused_settings() if u.startswith(f"{key} (")), None)
               for trial in checked]
        # (a trial at the key's default is not called unused: it is set to nothing)
        at_default = [_dotted(trial.to_dict(), key) == _dotted(default, key) for trial in checked]
        if any(why) and all(w or d for w, d in zip(why, at_default, strict=True)):
            why = [w for w in why if w]
            raise ConfigError(f"config error: tune.search_space.{key}: no trial uses it "
                              f"({why[0].split(' (', 1)[1].rstrip(')')}), so its values would "
                              "train the same weights: sweep what the trials use")
    return checked


def _dotted(tree: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a config tree (None where there is none: an option no
    strategy was given).

    >>> _dotted({"batching": {"options": {"c0": 0.5}}}, "batching.options.c0")
    0.5
    >>> _dotted({"batching": {"options": {}}}, "batching.options.c0") is None
    True
    """
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _to_check(keys: list[str], lists: list[list[Any]]) -> list[dict[str, Any]]:
    """The combinations of the keys' values to check, each a trial's: all of them up to
    MAX_CHECKED_COMBINATIONS; beyond, every pair of values of every two keys (a batch the swept
    worker count cannot split, say; a failure that needs three keys' values together is met in
    its trial), while those pairs are within the limit; else each key's values alone, and the
    swept `scaling.*` keys at their largest together: the trials' concurrency is sized from the
    checked trials' largest need (`trial_concurrency`), which two keys make. The keys a check
    does not vary are at their first values -- never at the config's, which no trial has (a
    worker count the sweep replaces refused a valid sweep, and sized its concurrency).

    >>> big = [list(range(70))] * 3  # 70^3 combinations, 3 x 70^2 pairs: each key alone
    >>> _to_check(["scaling.num_workers", "scaling.cpus_per_worker", "train.seed"], big)[-1]
    {'scaling.num_workers': 69, 'scaling.cpus_per_worker': 69, 'train.seed': 0}
    """
    if math.prod(len(v) for v in lists) <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*lists)]
    first = {k: values[0] for k, values in zip(keys, lists, strict=True)}
    pairs = list(itertools.combinations(range(len(keys)), 2))
    if pairs and sum(len(lists[i]) * len(lists[j]) for i, j in pairs) <= MAX_CHECKED_COMBINATIONS:
        return [{**first, keys[i]: vi, keys[j]: vj}
                for i, j in pairs for vi in lists[i] for vj in lists[j]]
    largest = {k: max(numbers) for k, values in zip(keys, lists, strict=True)
               if k in ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.use_gpu")
               and (numbers := [v for v in values if isinstance(v, (int, float))])}
    return ([{**first, k: v} for k, values in zip(keys, lists, strict=True) for v in values]
            + ([{**first, **largest}] if len(largest) > 1 else []))


def _between(kind: str, bounds: list[float]) -> float:
    """A value a continuous spec draws: the middle of its range (on a log scale for loguniform).

    >>> _between("uniform", [1, 5]), _between("loguniform", [0.01, 1])
    (3.0, 0.1)
    """
    low, high = bounds
    return float(math.sqrt(low * high) if kind == "loguniform" else (low + high) / 2)


def trial_concurrency(cluster: dict[str, float], trials: list[Config], cap: int | None = None,
                      *, in_actors: bool = False, most: dict[str, float] | None = None
                      ) -> int | None:
    """How many trials run at once (None: as many as Tune finds resources for).

    `in_actors` (every trial trains in its Tune actor): Tune reserves each trial's CPUs (and
    GPU) and starts those that fit; the others wait, and on an autoscaling cluster their
    requests bring nodes up. Only `cap` (`tune.max_concurrent`) limits them. Otherwise a
    trial's workers are not reserved through Tune (their TorchTrainer asks Ray for them), so
    each trial's workers (the largest over the search space) must fit beside every other
    running trial's, in the cluster as it can grow: `most`, the autoscaler's maximum resources
    where one is configured (`cluster.yaml`'s head has no CPU and its GPU workers start at 0),
    else the cluster as it is."""
    if in_actors:
        return cap
    cpus = max(c.scaling.need()["CPU"] for c in trials)
    gpus = max(c.scaling.need()["GPU"] for c in trials)
    most = most or {}

    def at_most(key: str) -> float:
        return max(cluster.get(key, 0), most.get(key, 0))

    fits = [int(at_most("CPU") // cpus)]
    if gpus:
        fits.append(int(at_most("GPU") // gpus))
    n = max(1, min(fits))
    return min(n, cap) if cap else n


def count_trials(cfg: Config) -> int:
    """Trials the sweep will run (grid: grid points x num_samples)."""
    grid = [len(v) for kind, v in parse_search_space(cfg).values() if kind == "grid"]
    if cfg.tune.search == "grid":
        return math.prod(grid) * cfg.tune.num_samples
    return cfg.tune.num_samples
