"""Bad input is refused before the cluster: `python -m pipeline train|tune|inspect-batches`
exits 2 with one line on stderr naming the culprit, and never reaches Ray or MLflow.

Every case runs the CLI in-process (`pipeline.cli.run`) with the three cluster entry points
(`pipeline.launch`, `pipeline.inspect`, `pipeline.tune.sweep`) replaced by modules whose
functions raise, and with `import ray` / `import mlflow` made to raise: a case that is not
refused before the cluster fails the test instead of starting a job.
"""

from __future__ import annotations

import importlib.abc
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.data.batches import split_train_val
from tests.conftest import REPO

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")
CLUSTER_MODULES = ("pipeline.launch", "pipeline.inspect", "pipeline.tune.sweep")


class _Reached(AssertionError):
    pass


def _cluster_module(name: str) -> types.ModuleType:
    def reached(*_: object, **__: object) -> None:
        raise _Reached(f"{name} was reached: the input was not refused before the cluster")

    mod = types.ModuleType(name)
    for fn in ("run_training", "inspect_batches", "print_summary", "run_sweep", "print_sweep"):
        setattr(mod, fn, reached)
    for interrupted in ("SweepInterrupted", "TrainingInterrupted"):
        setattr(mod, interrupted, type(interrupted, (KeyboardInterrupt,), {}))
    return mod


class _NoClusterImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise _Reached(f"import {name} before the input was refused")
        return None


def refused(argv: list[str], capsys, monkeypatch, cwd=None) -> str:
    """Run the CLI in-process with the cluster unreachable; assert exit 2, exactly one
    non-empty stderr line and, when `cwd` (an empty folder) is given, that the run left nothing
    there (no run folder, no sqlite MLflow store: the defaults are relative to it); return the
    line."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    for name in CLUSTER_MODULES:
        monkeypatch.setitem(sys.modules, name, _cluster_module(name))
    # Other test files imported Ray and MLflow already: `import ray` would find them in
    # sys.modules without asking the finder below; None there makes that import raise.
    for name in [m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "meta_path", [_NoClusterImports(), *sys.meta_path])
    capsys.readouterr()
    rc = cli.run(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    reached = [ln for ln in lines if ln.startswith(f"{__name__}._Reached: ")]
    if rc == 1 and reached:  # (the CLI prints an unexpected failure's traceback, exit 1)
        raise _Reached(reached[-1].split(": ", 1)[1])
    imported = [ln for ln in lines if ln.startswith(("ModuleNotFoundError: ", "ImportError: "))]
    if rc == 1 and imported:  # an import of Ray or MLflow before the cluster (masked traceback)
        raise ImportError(imported[-1])
    assert rc == 2, err
    assert len(lines) == 1, err
    if cwd is not None:
        assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())
    return lines[0]


def test_the_harness_catches_a_case_that_reaches_the_cluster(capsys, monkeypatch, data_dir):
    """A valid config is not refused: the fake launcher is reached, and says so."""
    with pytest.raises(_Reached, match="pipeline.launch"):
        refused(["train", "--config", DIGITS, "--set", "train.epochs=1"], capsys, monkeypatch)


def test_the_harness_catches_an_import_of_ray_or_mlflow(capsys, monkeypatch, data_dir):
    """Imported already (by another test file) or not, Ray and MLflow cannot be imported while
    a case runs: an import of either fails the case."""
    import importlib

    importlib.import_module("mlflow")  # in sys.modules, as in a whole session

    def importing(_cfg: object) -> None:
        import mlflow  # noqa: F401

    monkeypatch.setattr("pipeline.data.datasets.resolve", importing)
    with pytest.raises(ImportError, match="mlflow"):
        refused(["train", "--config", DIGITS, "--set", "train.epochs=1"], capsys, monkeypatch)


# -- small Parquet files -------------------------------------------------------------------------
N = 120  # rows of every file: labels 0..3, 30 each


def _labels() -> np.ndarray:
    return np.arange(N) % 4


def _vectors(width: int, ragged: bool = False) -> pa.Array:
    rng = np.random.default_rng(0)
    lengths = np.full(N, width) - (ragged & (np.arange(N) % 7 == 3))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets),
                                    pa.array(rng.random(offsets[-1]).astype(np.float32)))


def _sequences(first_token: int = 0) -> tuple[pa.Array, pa.Array]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 20, N)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    tokens = rng.integers(0, 30, lengths.sum())
    tokens[0] = first_token
    targets = tokens % 5
    return (pa.ListArray.from_arrays(offsets, pa.array(tokens)),
            pa.ListArray.from_arrays(offsets, pa.array(targets)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("refusals")
    tokens, targets = _sequences()
    bad_tokens, _ = _sequences(first_token=-3)
    huge_tokens, huge_targets = _sequences(first_token=10**12)  # (target: 10**12 % 5 = 0)
    huge_targets = pa.ListArray.from_arrays(huge_targets.offsets, pa.array(
        [10**9, *huge_targets.values.to_pylist()[1:]]))
    short_targets = pa.array([t[:-1] for t in targets.to_pylist()])
    ignored = pa.array([[-100] * len(t) for t in targets.to_pylist()])  # nothing to learn
    head_ignored = pa.array([[-100, -100, *t[2:]] for t in targets.to_pylist()])  # (lengths >= 3)
    label = pa.array(_labels())
    # the longest sequence (40 tokens) a validation row's; the training rows' at most 19
    _, val = split_train_val(N, _labels(), 0.2, seed=0)
    long_val = pa.array([list(range(40)) if i == val[0] else t
                         for i, t in enumerate(tokens.to_pylist())])
    tables = {
        "vec16": {"x": _vectors(16), "y": label, "name": pa.array([f"s{i}" for i in range(N)])},
        "ragged": {"x": _vectors(16, ragged=True), "y": label},
        "scalar": {"x": pa.array(np.arange(N, dtype=np.float64)), "y": label},
        "seq": {"tokens": tokens, "targets": targets, "y": label},
        "long_val_seq": {"tokens": long_val, "y": label},
        "both": {"x": _vectors(16), "tokens": tokens, "y": label},
        "neg_token": {"tokens": bad_tokens, "y": label},
        "huge_token": {"tokens": huge_tokens, "y": label},
        "huge_target": {"tokens": tokens, "targets": huge_targets, "y": label},
        "misaligned": {"tokens": tokens, "targets": short_targets, "y": label},
        "ignored_targets": {"tokens": tokens, "targets": ignored, "y": label},
        "head_ignored": {"tokens": tokens, "targets": head_ignored, "y": label},
        "beyond_float32": {"x": pa.ListArray.from_arrays(  # float64: finite, inf as float32
            pa.array(np.arange(N + 1, dtype=np.int32) * 2),
            pa.array([1e39 if i == 7 else 0.5 for i in range(2 * N)])), "y": label},
        "half_labels": {"x": _vectors(16), "y": pa.array(_labels() + 0.5)},
        "neg_labels": {"x": _vectors(16), "y": pa.array(_labels() - 1)},
        "text_labels": {"x": _vectors(16), "y": pa.array([f"c{k}" for k in _labels()])},
        "null_labels": {"x": _vectors(16), "y": pa.array([None, *_labels()[1:].tolist()])},
        "three": {"x": _vectors(16).slice(0, 3), "y": pa.array([0, 1, 2])},
        "one_of_class_2": {"x": _vectors(16).slice(0, 40),
                           "y": pa.array([0] * 20 + [1] * 19 + [2])},
        "empty": {"x": _vectors(16).slice(0, 0), "y": label.slice(0, 0)},
        "nan_features": {"x": pa.ListArray.from_arrays(
            pa.array(np.arange(N + 1, dtype=np.int32) * 2),
            pa.array([float("nan") if i == 7 else 0.5 for i in range(2 * N)])), "y": label},
        "empty_features": {"x": pa.array([[]] * N, pa.list_(pa.float32())), "y": label},
        "ids": {"x": _vectors(16), "y": label, "int_id": pa.array(np.arange(N) * 3),
                "dup_id": pa.array(np.arange(N) % (N - 1)), "float_id": pa.array(np.arange(N) / 10),
                "null_id": pa.array([None, *range(1, N)], pa.int64())},
        "nan_difficulty": {"x": _vectors(16), "y": label,
                           "h": pa.array([float("nan") if i == 5 else i / N for i in range(N)])},
    }
    out = {}
    for name, columns in tables.items():
        out[name] = str(root / f"{name}.parquet")
        pq.write_table(pa.table(columns), out[name])
    damaged = bytearray(Path(out["vec16"]).read_bytes())  # its first page header overwritten:
    damaged[4:60] = b"\xff" * 56  # the footer (schema, row count) still reads
    (root / "damaged_page.parquet").write_bytes(bytes(damaged))
    out["damaged_page"] = str(root / "damaged_page.parquet")
    (root / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")  # an unclosed list
    (root / "list.yaml").write_text("- train\n- data\n")  # YAML, but not a mapping
    (root / "latin1.yaml").write_bytes("data:\n  name: digits  # d\xe9j\xe0\n".encode("latin-1"))
    (root / "a_folder").mkdir()
    (root / "started").mkdir()  # an --out folder with no run in it
    (root / "dup.yaml").write_text("train:\n  epochs: 3\ntrain:\n  seed: 4\n")
    (root / "damaged" / "ray_results").mkdir(parents=True)  # a run.json cut short
    (root / "damaged" / "run.json").write_text('{"config": ')
    (root / "typed" / "ray_results").mkdir(parents=True)  # a run.json whose URI is a number
    (root / "typed" / "run.json").write_text('{"config": {}, "tracking_uri": 5}')
    (root / "text_config" / "ray_results").mkdir(parents=True)  # a run.json whose config is text
    (root / "text_config" / "run.json").write_text('{"config": "x"}')
    (root / "loop").symlink_to(root / "loop")  # a symlink to itself
    (root / "tagged.yaml").write_text("train:\n  epochs: !!int x\n")  # a tag PyYAML cannot build
    (root / "sweep_elsewhere" / "ray_results").mkdir(parents=True)  # a sweep's own store
    (root / "sweep_elsewhere" / "sweep.json").write_text(
        '{"name": "s", "config": {}, "tracking_uri": "sqlite:////nowhere/s/mlflow.db"}')
    out.update(bad_yaml=str(root / "bad.yaml"), list_yaml=str(root / "list.yaml"),
               latin1_yaml=str(root / "latin1.yaml"),
               folder=str(root / "a_folder"), started=str(root / "started"),
               dup_yaml=str(root / "dup.yaml"), damaged=str(root / "damaged"),
               sweep_elsewhere=str(root / "sweep_elsewhere"), typed=str(root / "typed"),
               text_config=str(root / "text_config"),
               loop=str(root / "loop"), tagged_yaml=str(root / "tagged.yaml"),
               long_name=str(root / ("a" * 300)))
    return out


SWEEP = 'tune.search_space={"train.base_lr": {"grid": [0.01, 0.1]}}'
VEC = ["--set", "data.path={vec16}", "--set", "data.feature_column=x", "--set",
       "data.label_column=y"]
SEQ = ["--set", "data.path={seq}", "--set", "data.sequence_column=tokens", "--set",
       "data.label_column=y"]


def fill(args: list[str], files: dict[str, str]) -> list[str]:
    """Replace `{name}` by the path of files[name]."""
    out = []
    for a in args:
        for name, path in files.items():
            a = a.replace("{" + name + "}", path)
        out.append(a)
    return out


def s(*items: str) -> list[str]:
    """`--set` each item."""
    return [a for item in items for a in ("--set", item)]


# (id, argv after the command, culprit in the line); {name} is the path of files[name].
CASES = [
    # -- config: values, types, keys
    ("gbs-zero", ["--config", DIGITS, *s("train.global_batch_size=0")], "train.global_batch_size"),
    ("micro-zero", ["--config", DIGITS, *s("train.micro_batch_size=0")], "train.micro_batch_size"),
    ("not-divisible", ["--config", DIGITS, *s("train.global_batch_size=60")],
     "train.micro_batch_size=32"),  # 60 % (32 x 2)
    ("epochs-text", ["--config", DIGITS, *s("train.epochs=abc")], "train.epochs"),
    ("epochs-float", ["--config", DIGITS, *s("train.epochs=2.5")], "train.epochs"),
    ("unknown-key", ["--config", DIGITS, *s("train.nosuchkey=1")], "train.nosuchkey"),
    ("unknown-section", ["--config", DIGITS, *s("nosection.x=1")], "nosection"),
    ("lr-scaling", ["--config", DIGITS, *s("train.lr_scaling=cubic")], "train.lr_scaling"),
    ("val-fraction", ["--config", DIGITS, *s("data.val_fraction=1.5")], "data.val_fraction"),
    # negative seeds: NumPy's SeedSequence refuses them deep in the planners or the split
    ("curriculum-one-epoch", ["--config", DIGITS, *s("data.name=sequences", "batching.strategy=curriculum",
                                                     "batching.options.difficulty=length",
                                                     "train.epochs=1")],
     "train.epochs=1"),  # one epoch: only the easiest c0 share of the pool is ever trained
    ("split-seed", ["--config", DIGITS, *s("data.split_seed=-1")], "data.split_seed"),
    ("batching-seed", ["--config", DIGITS, *s("batching.seed=-1")], "batching.seed"),
    # (numpy's SeedSequence splits it into 32-bit words: seed 2^32 + 5 drew seed 5's epoch 1)
    ("batching-seed-2-32", ["--config", DIGITS, *s("batching.seed=4294967296")], "batching.seed"),
    ("train-seed", ["--config", DIGITS, *s("train.seed=-1")], "train.seed"),
    # torch takes seeds below 2^64: refused here, not on the cluster
    ("train-seed-huge", ["--config", DIGITS, *s("train.seed=18446744073709551616")], "train.seed"),
    ("cpus-tiny", ["--config", DIGITS, *s("scaling.cpus_per_worker=0.00001")],
     "scaling.cpus_per_worker"),  # below Ray's resource step of 0.0001
    ("strategy", ["--config", DIGITS, *s("batching.strategy=bogus")], "batching.strategy"),
    ("model-name", ["--config", DIGITS, *s("model.name=resnet")], "model.name"),
    ("nonfinite", ["--config", DIGITS, *s("train.nonfinite=maybe")], "train.nonfinite"),
    ("nonfinite-limit", ["--config", DIGITS, *s("train.nonfinite_limit=-1")],
     "train.nonfinite_limit"),
    # -- bools are not sizes
    ("micro-true", ["--config", DIGITS, *s("train.micro_batch_size=true")],
     "train.micro_batch_size"),
    ("gbs-true", ["--config", DIGITS, *s("train.global_batch_size=true")],
     "train.global_batch_size"),
    ("workers-true", ["--config", DIGITS, *s("scaling.num_workers=true")], "scaling.num_workers"),
    ("lr-true", ["--config", DIGITS, *s("train.base_lr=true")], "train.base_lr"),
    ("noise-ema-false", ["--config", DIGITS, *s("train.noise_scale_ema=false")],
     "train.noise_scale_ema"),
    # -- the device
    ("fp16-cpu", ["--config", DIGITS, *s("train.precision=fp16")], "train.precision"),
    ("syncbn-cpu", ["--config", DIGITS, *s("train.sync_batchnorm=true")], "train.sync_batchnorm"),
    # -- strategy options, typed per strategy
    ("option-typo", ["--config", DIGITS, *s("batching.strategy=hard_mining",
                                            "batching.options.selection_presure=10")],
     "batching.options.selection_presure"),
    ("option-pacing", ["--config", DIGITS, *s("batching.strategy=curriculum",
                                              "batching.options.difficulty=length",
                                              "batching.options.pacing=cubic")],
     "batching.options.pacing"),
    ("option-c0", ["--config", DIGITS, *s("batching.strategy=curriculum",
                                          "batching.options.c0=0")], "batching.options.c0"),
    ("option-bool", ["--config", DIGITS, *s("batching.strategy=length_bucket",
                                            "batching.options.max_tokens=true")],
     "batching.options.max_tokens"),
    ("strategy-on-data", ["--config", DIGITS, *s("batching.strategy=curriculum")],
     "batching.strategy=curriculum"),  # no difficulty on digits
    # -- model arguments
    ("kwarg-typo", ["--config", DIGITS, *s("model.name=mlp", "model.kwargs.hiden=64")],
     "model.kwargs.hiden"),
    ("kwarg-bool", ["--config", DIGITS, *s("model.kwargs.width=true")], "model.kwargs.width"),
    # -- the run's length
    ("warmup-too-long", ["--config", DIGITS, *s("train.warmup_epochs=9")], "train.warmup_epochs"),
    # -- micro_batch_size auto changes a BatchNorm model's ghost batch
    ("auto-batchnorm", ["--config", DIGITS, *s("train.micro_batch_size=auto")],
     "train.auto_micro_batchnorm"),
    ("auto-batchnorm-picked", s("train.micro_batch_size=auto"), "model.name=digits_cnn"),
    # -- micro_batch_size auto cannot shrink every rank together around collectives in forward
    ("auto-nt-xent", ["--config", DIGITS, *s("train.micro_batch_size=auto", "train.loss=nt_xent",
                                             "model.name=mlp")], "train.loss=nt_xent"),
    ("auto-sync-bn", ["--config", DIGITS, *s("train.micro_batch_size=auto", "scaling.use_gpu=true",
                                             "train.sync_batchnorm=true",
                                             "train.auto_micro_batchnorm=true")],
     "train.sync_batchnorm=true"),
    # SyncBatchNorm's collective in each forward: ranks with different micro-batch counts in a
    # step would hang on a GPU cluster. 1,438 training rows in batches of 48 on 3 workers: the
    # last batch is 46, shares 16, 15, 15, micro-batches of 1.
    ("sync-bn-short-last-batch", ["--config", DIGITS, *s(
        "scaling.use_gpu=true", "train.sync_batchnorm=true", "batching.drop_last=false",
        "scaling.num_workers=3", "train.global_batch_size=48", "train.micro_batch_size=1")],
     "train.sync_batchnorm=true: epoch 1 has a batch of 46 samples, which is 15 or 16 "
     "micro-batches of 1 per worker on 3"),
    # token budgets on sequences (a user's BatchNorm model): batches of 60 to 481 samples, one
    # of 65 on 2 workers is 33 and 32 samples, 2 and 1 micro-batches of the share (32) -- with
    # the micro-batch left unset, which a check by micro < share let through
    ("sync-bn-token-budget", ["--config", DIGITS, *s(
        "data.name=sequences", "model.name=import:tests.builders:fails_when_built",
        "scaling.use_gpu=true", "train.sync_batchnorm=true", "train.micro_batch_size=null",
        "batching.strategy=length_bucket", "batching.options.max_tokens=8192")],
     "micro-batches of 32 per worker on 2; SyncBatchNorm's collective in every forward pass "
     "needs as many micro-batches on every worker, or they wait on each other for good: use "
     "fixed-size batches (no batching.options.max_tokens)"),
    # -- columns and files
    ("no-label-column", ["--config", DIGITS, *s("data.label_column=nolabel")], "data.label_column"),
    ("no-difficulty-column", ["--config", DIGITS, *s("batching.difficulty_column=nodiff")],
     "batching.difficulty_column"),
    ("text-difficulty", [*VEC, *s("batching.strategy=curriculum",
                                  "batching.difficulty_column=name")], "batching.difficulty_column"),
    ("no-file", ["--config", DIGITS, *s("data.path=/no/such/file.parquet")], "data.path"),
    ("no-dataset", ["--config", DIGITS, *s("data.name=nosuchset")], "data.name"),
    ("batch-too-large", ["--config", DIGITS, *s("train.global_batch_size=4096",
                                                "train.micro_batch_size=null")],
     "train.global_batch_size"),
    ("no-columns", s("data.path={vec16}", "data.label_column=y"), "data.feature_column"),
    # -- what a column holds
    ("ragged-vectors", s("data.path={ragged}", "data.feature_column=x", "data.label_column=y"),
     "data.feature_column='x'"),
    ("scalar-features", s("data.path={scalar}", "data.feature_column=x", "data.label_column=y"),
     "data.feature_column='x'"),
    ("half-labels", s("data.path={half_labels}", "data.feature_column=x", "data.label_column=y"),
     "data.label_column='y'"),
    ("negative-labels", s("data.path={neg_labels}", "data.feature_column=x",
                          "data.label_column=y"), "data.label_column='y'"),
    ("text-labels", s("data.path={text_labels}", "data.feature_column=x", "data.label_column=y"),
     "data.label_column='y'"),
    ("null-labels", s("data.path={null_labels}", "data.feature_column=x", "data.label_column=y"),
     "data.label_column='y'"),
    ("negative-token", s("data.path={neg_token}", "data.sequence_column=tokens",
                         "data.label_column=y"), "data.sequence_column='tokens'"),
    # a vocabulary of 10**12 + 1 (an embedding of 256 TB, on every worker) or a head of 10**9
    ("huge-token", s("data.path={huge_token}", "data.sequence_column=tokens",
                     "data.label_column=y"),
     "data.sequence_column='tokens' holds the token id 1000000000000; the model's vocabulary "
     "is ids 0..V-1, V at most 16,777,216"),
    ("huge-target", [*SEQ, *s("data.path={huge_target}", "data.target_column=targets",
                              "train.loss=token_cross_entropy")],
     "data.target_column='targets' holds the target 1000000000"),
    # OSError: Couldn't deserialize thrift, a traceback (exit 1)
    ("damaged-page", [*VEC, *s("data.path={damaged_page}")],
     "damaged_page.parquet could not be read (Couldn't deserialize thrift"),
    # OverflowError (numpy int64) in the planners, a traceback
    ("max-length-huge", ["--config", DIGITS, *s("batching.max_length=100000000000000000000000")],
     "batching.max_length: Input should be less than or equal to 2147483647"),
    # two views of one sample: the loss and every gradient exactly 0, each step a no-op
    ("nt-xent-batch-of-one", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "batching.strategy=contrastive", "model.name=mlp",
        "train.global_batch_size=1", "train.micro_batch_size=null", "scaling.num_workers=1")],
     "train.loss=nt_xent contrasts each sample with the others of its batch: "
     "train.global_batch_size=1 has none (2 at least)"),
    # a loss over no element: every step skipped, a run that "succeeds" training nothing (or,
    # with no target at all, a traceback sizing the model's outputs)
    ("no-target-to-learn", [*SEQ, *s("data.path={ignored_targets}", "data.target_column=targets",
                                     "train.loss=token_cross_entropy")],
     "data.target_column='targets' holds no target to learn from: every one is -100"),
    ("truncation-keeps-no-target", [*SEQ, *s(
        "data.path={head_ignored}", "data.target_column=targets", "train.loss=token_cross_entropy",
        "batching.max_length=2")], "batching.max_length=2 keeps no target"),
    ("features-beyond-float32", [*VEC, *s("data.path={beyond_float32}")],
     "data.feature_column='x' holds a value of magnitude 1e+39, beyond float32's range"),
    ("misaligned-targets", [*SEQ, *s("data.path={misaligned}", "data.target_column=targets",
                                     "train.loss=token_cross_entropy")],
     "data.target_column='targets'"),
    ("no-rows", [*VEC, *s("data.path={empty}")], "no rows"),
    ("class-missing-from-validation", [*VEC, *s("data.path={one_of_class_2}")],
     "missing from the validation split"),
    ("balanced-classes-not-dividing", [*VEC, *s("batching.strategy=balanced",
                                               "train.global_batch_size=10",
                                               "train.micro_batch_size=null")], "divisible"),
    # a schedule the run ends before it acts: the smallest batch throughout, without a word
    ("batch-warmup-past-the-run", ["--config", DIGITS, *s(
        "train.batch_size_schedule=warmup", "train.batch_size_min=32", "train.epochs=2",
        "train.global_batch_size=256", "train.batch_size_warmup_steps=100000")],
     "train.batch_size_warmup_steps=100000: the run ends after 88 optimizer steps "
     "(train.epochs=2), before the ramp grows the batch from train.batch_size_min=32"),
    ("adaptive-interval-past-the-run", ["--config", DIGITS, *s(
        "train.batch_size_schedule=adaptive", "train.batch_size_min=32", "train.max_steps=9",
        "train.global_batch_size=256", "train.batch_size_interval=10")],
     "train.batch_size_interval=10 is the run's length or more (train.max_steps=9: at most 9 "
     "steps): the adaptive schedule would never decide"),
    # refused under a constant batch (warmup-past-max-steps); accepted under a schedule before
    ("warmup-past-max-steps-under-a-schedule", ["--config", DIGITS, *s(
        "train.batch_size_schedule=warmup", "train.batch_size_min=32",
        "train.global_batch_size=256", "train.batch_size_warmup_steps=2",
        "train.warmup_epochs=2", "train.max_steps=3")],  # the ramp's k: 1, 4, 8
     "train.warmup_epochs=2 is 88 batches of train.batch_size_min=32 here, but "
     "train.max_steps=3 (its first 3 steps take 13 of those batches) ends the run first"),
    ("warmup-past-max-steps-under-adaptive", ["--config", DIGITS, *s(
        "train.batch_size_schedule=adaptive", "train.batch_size_min=32",
        "train.global_batch_size=256", "train.batch_size_interval=2",
        "train.warmup_epochs=2", "train.max_steps=3")],
     "train.warmup_epochs=2 is 88 batches of train.batch_size_min=32 here, but "
     "train.max_steps=3 steps take 24 at most"),
    # the cosine's end placed at every epoch's units: max_steps cut it at 0.72 of the peak LR
    ("decay-past-max-steps-under-adaptive", ["--config", DIGITS, *s(
        "train.batch_size_schedule=adaptive", "train.batch_size_min=32",
        "train.global_batch_size=256", "train.schedule=cosine", "train.max_steps=30")],
     "train.max_steps=30 under train.batch_size_schedule=adaptive ends the run after a number "
     "of samples decided during training, so train.schedule=cosine cannot place its decay"),
    # said "global_batch_size (32)" of a config whose train.global_batch_size is 320
    ("balanced-unit-batch-not-dividing", ["--config", DIGITS, *s(
        "batching.strategy=balanced", "train.batch_size_schedule=warmup",
        "train.batch_size_min=32", "train.global_batch_size=320",
        "train.batch_size_warmup_steps=10")],
     "(the batch planned is train.batch_size_min=32 under train.batch_size_schedule=warmup)"),
    ("empty-train-split", s("data.path={three}", "data.feature_column=x", "data.label_column=y",
                            "data.val_fraction=0.6", "train.global_batch_size=2",
                            "batching.drop_last=false"), "data.val_fraction"),
    # -- a model that cannot take the data
    ("cnn-on-sequences", s("data.name=sequences", "model.name=digits_cnn"),
     "model.name=digits_cnn"),
    ("mlp-on-sequences", [*SEQ, *s("model.name=mlp")], "model.name=mlp"),
    ("transformer-on-vectors", [*VEC, *s("model.name=seq_transformer")],
     "model.name=seq_transformer"),
    ("cnn-on-16-features", [*VEC, *s("model.name=digits_cnn")], "model.name=digits_cnn"),
    ("import-no-module", s("model.name=import:no_such_package:build"),
     "model.name=import:no_such_package:build: ModuleNotFoundError"),
    ("import-no-function", s("model.name=import:os:no_such_model"),
     "model.name=import:os:no_such_model: AttributeError"),
    ("import-not-a-function", s("model.name=import:os:sep"), "model.name=import:os:sep: TypeError"),
    # a builder that cannot take the builders' arguments failed on every worker, after the
    # cluster work (and the run made in MLflow)
    ("import-wrong-signature", s("model.name=import:os:getcwd"),
     "model.name=import:os:getcwd cannot take the keyword arguments it is called with "
     "(activation_checkpointing, input_dim, num_outputs, per_token, vocab_size; model.kwargs "
     "included): got an unexpected keyword argument 'activation_checkpointing'"),
    # a user's model with BatchNorm: refused on the workers, after the cluster work
    ("import-batchnorm-auto-micro", [*VEC, *s("model.name=import:tests.builders:batchnorm_mlp",
                                              "train.micro_batch_size=auto")],
     "train.micro_batch_size=auto would change the ghost-batch size of the BatchNorm layers of "
     "model.name=import:tests.builders:batchnorm_mlp"),
    ("import-kwarg-typo", s("model.name=import:tests.builders:small_mlp", "model.kwargs.hiden=8"),
     "got an unexpected keyword argument 'hiden'"),
    ("space-import-no-function", ["--config", DIGITS, *s(
        'tune.search_space={"model.name": {"grid": ["digits_cnn", "import:os:no_such_model"]}}')],
     "model.name=import:os:no_such_model: AttributeError"),
    ("too-few-classes", [*VEC, *s("model.kwargs.num_outputs=3")], "model.kwargs.num_outputs"),
    ("too-small-vocab", [*SEQ, *s("model.kwargs.vocab_size=10")], "model.kwargs.vocab_size"),
    ("auto-cannot-choose", s("data.path={both}", "data.feature_column=x",
                             "data.sequence_column=tokens", "data.label_column=y"), "model.name"),
    ("packing-on-vectors", ["--config", DIGITS, *s("batching.packing=true")], "batching.packing"),
    ("flex-without-packing", [*SEQ, *s("model.name=seq_transformer",
                                       "model.kwargs.attention=flex")], "batching.packing=false"),
    ("flex-on-cpu", [*SEQ, *s("model.name=seq_transformer", "model.kwargs.attention=flex",
                              "batching.packing=true")], "scaling.use_gpu=false"),
    # -- a loss whose columns are missing
    ("token-loss-no-targets", [*SEQ, *s("train.loss=token_cross_entropy")], "data.target_column"),
    ("token-loss-vector-model", ["--config", DIGITS, *s("train.loss=token_cross_entropy")],
     "train.loss=token_cross_entropy"),
    ("hard-mining-contrastive", ["--config", DIGITS, *s("batching.strategy=hard_mining",
                                                        "train.loss=nt_xent", "model.name=mlp")],
     "batching.strategy=hard_mining"),
    ("balanced-contrastive", ["--config", DIGITS, *s("batching.strategy=balanced",
                                                     "train.loss=nt_xent", "model.name=mlp")],
     "batching.strategy=balanced draws a rare class's samples again within a batch"),
    ("contrastive-on-sequences", [*SEQ, *s("train.loss=nt_xent")], "train.loss=nt_xent"),
    # a sample alone has no other to contrast with: a last batch of 1 (loss 0, yet a step),
    # a validation split of 1 (val_accuracy 1.0)
    # a classifier's output size taking the embedding's place: 1-d embeddings, said nowhere
    ("contrastive-num-outputs", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "model.kwargs.num_outputs=1")],
     "model.kwargs.num_outputs under train.loss=nt_xent"),
    ("contrastive-one-dimension", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "model.kwargs.embedding_dim=1")],
     "model.kwargs.embedding_dim"),
    ("contrastive-last-batch-of-one", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "scaling.num_workers=1",
        "train.global_batch_size=3", "train.micro_batch_size=null", "batching.drop_last=false")],
     "train.loss=nt_xent: epoch 1 has a batch of 1 sample"),
    # the same last unit batch of 1, a step alone while a batch-size ramp is at one unit
    ("contrastive-ramp-step-of-one", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "scaling.num_workers=1",
        "train.global_batch_size=6", "train.micro_batch_size=null", "batching.drop_last=false",
        "train.batch_size_schedule=warmup", "train.batch_size_min=3",
        "train.batch_size_warmup_steps=600", "train.epochs=2")],
     "train.loss=nt_xent: epoch 1 has a step of 1 sample"),
    # every row 2**31 slots wide: out of memory on the workers
    ("pad-past-max-length", [*SEQ, *s("batching.max_length=16", "batching.pad_multiple_of=4096")],
     "batching.pad_multiple_of=4096 is more than batching.max_length=16"),
    ("contrastive-validation-of-one", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "data.label_column=null",
        "data.val_fraction=0.0001")],
     "data.val_fraction=0.0001 holds out 1 sample"),
    # training met it as a "non-finite loss" (blaming itself) or skipped its steps each epoch
    ("features-nan", s("data.path={nan_features}", "data.feature_column=x", "data.label_column=y"),
     "data.feature_column='x' holds NaN or infinite values"),
    # (it said "NaN or infinite values": Arrow's all() of no values is null)
    ("features-empty", s("data.path={empty_features}", "data.feature_column=x",
                         "data.label_column=y"), "data.feature_column='x' holds empty vectors"),
    # inspect-batches counts coverage and duplicates by sample id: a null read as -2**63
    ("id-null", [*VEC, *s("data.path={ids}", "data.id_column=null_id")],
     "data.id_column='null_id' has 1 null id(s)"),
    ("id-float", [*VEC, *s("data.path={ids}", "data.id_column=float_id")],
     "data.id_column='float_id' is a double column; sample ids are integers"),
    ("id-repeated", [*VEC, *s("data.path={ids}", "data.id_column=dup_id")],
     "data.id_column='dup_id' holds the id 0 more than once (1 repeat(s))"),
    ("difficulty-nan", [*s("data.path={nan_difficulty}", "data.feature_column=x",
                           "data.label_column=y", "batching.strategy=curriculum",
                           "batching.difficulty_column=h")], "row 5 has no finite difficulty"),
    ("pack-tokens-below-longest", [*SEQ, *s("model.name=seq_transformer", "batching.packing=true",
                                            "batching.pack_tokens=10")],
     "batching.pack_tokens=10 is shorter than the longest training sequence (19 tokens)"),
    # validation is packed too: a longer sequence there got a row wider than pack_tokens
    ("pack-tokens-below-a-validation-sequence", [
        *s("data.path={long_val_seq}", "data.sequence_column=tokens", "data.label_column=y",
           "model.name=seq_transformer", "batching.packing=true", "batching.pack_tokens=24")],
     "batching.pack_tokens=24 is shorter than the longest validation sequence (40 tokens)"),
    ("pack-tokens-not-a-multiple", [*SEQ, *s("model.name=seq_transformer", "batching.packing=true",
                                             "batching.pack_tokens=30", "batching.pad_multiple_of=8")],
     "batching.pack_tokens=30 is not a multiple"),
    ("token-budget-below-the-longest", [*SEQ, *s("batching.strategy=length_bucket",
                                                 'batching.options={"max_tokens": 18}')],
     "batching.options.max_tokens=18 is less than the longest training sequence (19 tokens)"),
    ("contrastive-without-its-loss", ["--config", DIGITS, *s("batching.strategy=contrastive")],
     "batching.strategy=contrastive"),
    ("adaptive-contrastive", ["--config", DIGITS, *s(
        "train.loss=nt_xent", "model.name=mlp", "train.batch_size_schedule=adaptive",
        "train.batch_size_min=32")], "train.loss=nt_xent does not measure"),
    ("ce-without-labels", [*VEC, *s("data.label_column=null")], "data.label_column"),
    # -- tune
    ("tune-metric-typo", ["--config", DIGITS, *s("tune.metric=val_acc")], "tune.metric"),
    ("space-metric-not-logged", ["--config", DIGITS, *s(SWEEP, "data.val_fraction=0")],
     "tune.metric='val_accuracy'"),
    ("space-metric-not-logged-here", ["--config", DIGITS, *s(SWEEP, "tune.metric=tokens_per_s")],
     "tune.metric='tokens_per_s'"),
    ("space-metric-noise-off", ["--config", DIGITS, *s(SWEEP, "tune.metric=noise_scale",
                                                      "train.noise_scale=false")],
     "tune.metric='noise_scale'"),
    ("space-target-other-accuracy", ["--config", DIGITS, *s(SWEEP, "tune.metric=train_accuracy")],
     "tune.target_accuracy"),
    ("space-unknown-key", ["--config", DIGITS,
                           *s('tune.search_space={"train.nosuch": {"grid": [1, 2]}}')],
     "train.nosuch"),
    ("space-uniform-on-an-integer", ["--config", DIGITS,
                                     *s('tune.search_space={"train.epochs": {"uniform": [1, 5]}}')],
     "train.epochs: Input should be a valid integer (got 3.0)"),
    ("space-repeated-value", ["--config", DIGITS,
                              *s('tune.search_space={"train.base_lr": {"grid": [0.1, 0.1]}}')],
     "tune.search_space.train.base_lr lists 0.1 more than once"),
    ("space-empty-grid", ["--config", DIGITS, *s('tune.search_space={"train.base_lr": {"grid": []}}')],
     "train.base_lr"),
    ("space-bad-value", ["--config", DIGITS,
                         *s('tune.search_space={"train.global_batch_size": {"grid": [32, 0]}}')],
     "train.global_batch_size"),
    # -- the config file and the arguments
    ("config-malformed", ["--config", "{bad_yaml}"], "bad.yaml"),
    ("config-not-mapping", ["--config", "{list_yaml}"], "list.yaml"),
    ("config-folder", ["--config", "{folder}"], "a_folder"),
    ("config-missing", ["--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
    ("config-not-utf8", ["--config", "{latin1_yaml}"], "latin1.yaml is not UTF-8 text"),
    ("set-a-section-to-a-value", ["--config", DIGITS, *s("train=1")], "train: Input should be"),
    ("lr-infinite", ["--config", DIGITS, *s("train.base_lr=.inf")], "train.base_lr"),
    ("decay-infinite", ["--config", DIGITS, *s("train.weight_decay=1e400")],
     "train.weight_decay"),
    ("heads-do-not-divide", [*SEQ, *s("model.name=seq_transformer", "model.kwargs.nhead=3")],
     "nhead=3 does not divide d_model=64"),
    ("warmup-past-max-steps", ["--config", DIGITS, *s("train.max_steps=4", "train.warmup_epochs=1",
                                                      "train.global_batch_size=128")],
     "train.max_steps=4 ends the run first"),
    ("cache-dir-a-file", [*s("data.name=digits", "data.cache_dir={bad_yaml}")],
     "data.cache_dir"),
    ("set-without-equals", ["--config", DIGITS, "--set", "train.epochs"], "train.epochs"),
    ("resume-nothing", ["--config", DIGITS, "--out", "{started}", "--resume"], "--resume"),
    # a traceback (JSONDecodeError) before
    ("resume-damaged-state", ["--config", DIGITS, "--out", "{damaged}", "--resume"],
     "/damaged/run.json is not a run's state (Expecting value"),
    # the tracking URI was read as text: a traceback (TypeError) before
    ("resume-typed-state", ["--config", DIGITS, "--out", "{typed}", "--resume"],
     "/typed/run.json is not a run's state (its tracking_uri is not text)"),
    # (a traceback: TypeError, 'str' object is not a mapping)
    ("resume-config-not-a-mapping", ["--config", DIGITS, "--out", "{text_config}", "--resume"],
     "/text_config/run.json is not a run's state (its config is not a mapping)"),
    # each of these an unmasked traceback before (OSError, RuntimeError, ValueError)
    ("out-name-too-long", ["--config", DIGITS, "--out", "{long_name}"], "File name too long"),
    ("out-symlink-loop", ["--config", DIGITS, "--out", "{loop}/x"], "--out"),
    ("config-name-too-long", ["--config", "{long_name}"], "File name too long"),
    ("data-path-name-too-long", [*s("data.path={long_name}")], "data.path /"),
    ("data-path-symlink-loop", [*s("data.path={loop}/d.parquet")], "data error: data.path /"),
    ("cache-dir-name-too-long", [*s("data.name=digits", "data.cache_dir={long_name}")],
     "data.cache_dir: cannot write the embedded dataset 'digits'"),
    ("config-bad-tag", ["--config", "{tagged_yaml}"], "tagged.yaml: not a config YAML can read"),
    ("set-bad-tag", ["--config", DIGITS, *s("train.epochs=!!int x")],
     "--set train.epochs=!!int x: not a value YAML can read"),
    # (tune) the sweep's store is in its sweep.json (run.json was read: a sweep has none)
    ("space-resume-own-store", ["--config", DIGITS, *s(SWEEP), "--out", "{sweep_elsewhere}",
                                "--resume"],
     "/sweep_elsewhere/sweep.json: tracking_uri=sqlite:////nowhere/s/mlflow.db: the folder "
     "/nowhere/s does not exist"),
    # PyYAML kept the last: the first section's settings were lost without a word
    ("config-duplicate-key", ["--config", "{dup_yaml}"], "dup.yaml: duplicate key 'train' (line 3)"),
    ("config-is-a-folder", ["--config", "{folder}"], "a_folder is a folder"),
    # read as the column of each key: a traceback (KeyError: Field "label" exists 2 times)
    ("same-column-twice", ["--config", DIGITS, *s("batching.difficulty_column=label")],
     "data.label_column and batching.difficulty_column name the same column 'label'"),
    # YAML 1.1 reads 010 as octal: seed 8
    ("set-octal", ["--config", DIGITS, *s("train.seed=010")], "010 reads as 8 in YAML 1.1"),
    # SQLAlchemy's "Invalid SQLite URL", after the cluster work
    ("tracking-sqlite-two-slashes", ["--config", DIGITS, *s("tracking.uri=sqlite://mlflow.db")],
     "a sqlite store is sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db"),
    # the workers' metrics went to a store of their own (refused as an unknown run): the run
    # was empty, and gone when the command ended
    ("tracking-sqlite-in-memory", ["--config", DIGITS, *s("tracking.uri=sqlite:///:memory:")],
     "tracking.uri=sqlite:///:memory:: an in-memory store lives in one process"),
    ("out-is-a-file", ["--config", DIGITS, "--out", "{bad_yaml}"], "is a file, not a folder"),
    # said before the data's checks, which read the data (seconds, or minutes from s3)
    ("out-before-data", ["--config", DIGITS, *s("data.path=/nowhere/d.parquet"), "--out",
                         "{bad_yaml}"], "is a file, not a folder"),
    ("tracking-before-data", ["--config", DIGITS, *s("data.path=/nowhere/d.parquet",
                                                     "tracking.uri=htp://127.0.0.1:5000")],
     "MLflow has no store for 'htp' URIs"),
    # `--set data.path=$DATA` with DATA unset trained the embedded dataset
    ("set-no-value", ["--config", DIGITS, *s("data.path=")],
     "--set data.path= gives no value (an unset shell variable?): give data.path=null"),
    # (it was mkdir's NotADirectoryError, a traceback: after the whole search, for find-batch-size)
    ("out-under-a-file", ["--config", DIGITS, "--out", "{bad_yaml}/runs"], "is a file, not a folder"),
    # a typo'd scheme passes no reachability probe (not http) and failed on the cluster
    ("tracking-scheme", ["--config", DIGITS, *s("tracking.uri=htp://127.0.0.1:5000")],
     "tracking.uri=htp://127.0.0.1:5000: MLflow has no store for 'htp' URIs"),
    # a host:port without http:// is a path to MLflow (its file store, which MLflow 3 refuses:
    # its message came under tracking.experiment's name)
    ("tracking-no-scheme", ["--config", DIGITS, *s("tracking.uri=127.0.0.1:5000")],
     "tracking.uri=127.0.0.1:5000: a path is MLflow's file store"),
    # ASHA kept the highest-loss trials and the report tagged the worst trial best
    ("space-mode-against-the-metric", ["--config", DIGITS, *s(SWEEP, "tune.metric=val_loss")],
     "tune.metric=val_loss is better when lower: set tune.mode=min (now max)"),
    # MLflow failed on it after the ingest ("unable to open database file", a traceback)
    ("tracking-sqlite-no-folder", ["--config", DIGITS, *s("tracking.uri=sqlite:////nowhere/x/m.db")],
     "tracking.uri=sqlite:////nowhere/x/m.db: the folder /nowhere/x does not exist"),
    ("space-target-no-val-accuracy", ["--config", DIGITS, *s(SWEEP, "data.val_fraction=0",
                                                       "tune.metric=train_loss",
                                                       "tune.mode=min")],
     "tune.target_accuracy"),
]


@pytest.mark.parametrize(("case", "args", "culprit"), CASES, ids=[c[0] for c in CASES])
def test_refused_before_the_cluster(case, args, culprit, files, capsys, monkeypatch, data_dir,
                                    tmp_path):
    """`train`, or `tune` for a search-space case (only a sweep reads tune.search_space)."""
    argv = ["tune" if case.startswith("space-") else "train", *fill(args, files)]
    assert culprit in refused(argv, capsys, monkeypatch, cwd=tmp_path)


@pytest.mark.parametrize("command", ["tune", "inspect-batches"])
@pytest.mark.parametrize("case", ["micro-true", "ragged-vectors", "cnn-on-sequences",
                                  "option-typo", "tune-metric-typo", "config-malformed",
                                  "resume-nothing"])
def test_every_command_refuses(command, case, files, capsys, monkeypatch, data_dir, tmp_path):
    _, args, culprit = next(c for c in CASES if c[0] == case)
    argv = [command, *fill(args, files)]
    assert culprit in refused(argv, capsys, monkeypatch, cwd=tmp_path)


def test_enough_cases():
    assert len(CASES) > 100 and len({c[0] for c in CASES}) == len(CASES)  # (README: over 100)


def test_refusals_name_the_known_values(files, capsys, monkeypatch, data_dir):
    line = refused(["train", "--config", DIGITS, *s("batching.strategy=hard_mining",
                                                    "batching.options.selection_presure=10")],
                   capsys, monkeypatch)
    assert line.endswith("known: selection_pressure")
    line = refused(["train", *s("data.path=" + files["ragged"], "data.feature_column=x",
                                "data.label_column=y")], capsys, monkeypatch)
    assert "(15 to 16 values)" in line  # the lengths found in the column
    line = refused(["train", *fill(VEC, files), *s("model.name=digits_cnn")], capsys, monkeypatch)
    assert "holds 16" in line
    line = refused(["train", *fill(VEC, files), *s("model.kwargs.num_outputs=3")], capsys,
                   monkeypatch)
    assert "label 3" in line  # labels 0..3 need 4 outputs


def test_auto_micro_batch_with_batchnorm_opt_in_is_accepted(capsys, monkeypatch, data_dir):
    """The opt-in lets the same config through to the (fake) cluster."""
    with pytest.raises(_Reached):
        refused(["train", "--config", DIGITS, *s("train.micro_batch_size=auto",
                                                  "train.auto_micro_batchnorm=true")],
                capsys, monkeypatch)


def test_sweep_checks_only_apply_to_sweeps(capsys, monkeypatch, data_dir):
    """val_fraction 0 is fine for a plain training run whose tune section is not used."""
    with pytest.raises(_Reached):
        refused(["train", "--config", DIGITS, *s("data.val_fraction=0")], capsys, monkeypatch)
    with pytest.raises(_Reached):
        refused(["tune", "--config", DIGITS, *s(SWEEP, "data.val_fraction=0",
                                                 "tune.metric=train_loss", "tune.mode=min",
                                                 "tune.target_accuracy=null")],
                capsys, monkeypatch)


def test_the_default_store_is_named_as_such(capsys, monkeypatch, data_dir, tmp_path):
    """Neither tracking.uri nor MLFLOW_TRACKING_URI set: the store is mlflow.db in the current
    folder, and a refusal of it names that, not a variable the user never set (it said
    "MLFLOW_TRACKING_URI=sqlite:////.../mlflow.db")."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").mkdir()  # a folder where the store would be
    monkeypatch.chdir(tmp_path)
    line = refused(["train", "--config", DIGITS], capsys, monkeypatch)
    assert line == ("config error: the default store (tracking.uri and MLFLOW_TRACKING_URI "
                    f"unset) sqlite:///{tmp_path}/mlflow.db: it is a folder, not a database file")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert refused(["train", "--config", DIGITS], capsys, monkeypatch).startswith(
        f"config error: MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/mlflow.db: it is a folder")


def test_sync_batchnorm_is_refused_only_where_micro_batch_counts_can_differ(capsys, monkeypatch,
                                                                            data_dir):
    """The checks pass (the job goes on to the cluster) where every worker runs as many
    micro-batches in every step: digits' last batch of 30 on 2 workers (15 each), one
    micro-batch per worker (micro = share), balanced batches, a model without BatchNorm, hard
    mining and contrastive batches (sized as random ones), and a run whose train.max_steps ends
    it before its first uneven batch. (Which batches a job trains: the strategies' counters,
    as the workers' LR schedule counts them; the micro-batches: `rank_slice`, `micro_slices`.)"""
    class Reached(BaseException):  # (not an Exception: the CLI prints those, exit 1)
        pass

    def cluster(*_a, **_k):
        raise Reached

    monkeypatch.setattr("pipeline.launch.connect", cluster)
    gpu = ("scaling.use_gpu=true", "train.sync_batchnorm=true", "batching.drop_last=false")
    for extra in [(), ("train.micro_batch_size=8",),
                  ("scaling.num_workers=3", "train.global_batch_size=48",
                   "train.micro_batch_size=16"),  # = the share
                  ("batching.strategy=balanced", "train.global_batch_size=80",
                   "train.micro_batch_size=8"),
                  ("model.name=mlp", "scaling.num_workers=3", "train.global_batch_size=48",
                   "train.micro_batch_size=1"),
                  # hard mining and contrastive batches split as random ones do (30: 15 and 15)
                  ("batching.strategy=hard_mining", "train.micro_batch_size=8"),
                  ("batching.strategy=contrastive", "train.loss=nt_xent", "train.micro_batch_size=8"),
                  # the uneven batch of 46 is step 30 of epoch 1: 5 steps never reach it
                  ("scaling.num_workers=3", "train.global_batch_size=48",
                   "train.micro_batch_size=1", "train.max_steps=5")]:
        argv = ["train", "--config", DIGITS, *s(*gpu, *extra)]
        with pytest.raises(Reached):
            cli.run(argv)


def test_a_sweeps_own_settings_do_not_refuse_a_job_of_its_config(data_dir):
    """`train` and `inspect-batches` run a sweep's config as one job (a note says its search
    space is not used): a tune.metric that job does not log is no reason to refuse it (it was:
    "tune.metric='val_accuracy' is not logged by this run"); `tune` still refuses it."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    cfg, _ = resolve(load_config(DIGITS, [SWEEP, "data.val_fraction=0"]))
    assert cfg.data.val_fraction == 0 and cfg.tune.search_space


def test_token_level_data_needs_no_label_column(files):
    """A dataset of tokens and per-token targets has no `label` column, and a token-level
    loss reads none: the default `data.label_column: label` is left unset for it (it was
    refused as "not a column"); a loss or a strategy that reads labels still refuses it."""
    import pyarrow.dataset as pads

    from pipeline.config import ConfigError, load_config
    from pipeline.data.datasets import resolve

    tokens_only = Path(files["seq"]).with_name("tokens_only.parquet")
    pq.write_table(pads.dataset(files["seq"]).to_table(columns=["tokens", "targets"]), tokens_only)
    sets = [f"data.path={tokens_only}", "data.sequence_column=tokens",
            "data.target_column=targets", "model.name=seq_transformer"]
    cfg, info = resolve(load_config(None, [*sets, "train.loss=token_cross_entropy"]))
    assert cfg.data.label_column is None and info.filled == {"data.label_column": "label"}
    # a sweep's trial, filled again from the config as given: none either (the sweep's blocks
    # hold no such column)
    from pipeline.tune.space import trial_config

    assert trial_config(cfg, info, {"train.base_lr": 0.2})[0].data.label_column is None
    for reads_labels in ("train.loss=cross_entropy", "batching.strategy=stratified"):
        with pytest.raises(ConfigError, match="data.label_column='label' is not a column"):
            resolve(load_config(None, [*sets, "train.loss=token_cross_entropy", reads_labels]))


def test_a_batch_size_ramp_the_run_cuts_short_is_said_and_one_that_never_grows_refused():
    """Each step takes k unit batches of the ramp (an epoch's last what is left): 2 epochs of
    44 batches of 32 end after 40 steps of a ramp of 80, at a batch of 128 of 256 -- a note at
    the job's start, as `sweep_batch_schedule.yaml`'s warmup to 512 ends at 416 after 84 steps
    of 12 epochs; a ramp of 100,000 steps never leaves 32 (refused, above); and one unit (the
    smallest batch is the batch) has nothing to grow: said too."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    ramp = ["train.batch_size_schedule=warmup", "train.batch_size_min=32"]
    _, info = resolve(load_config(DIGITS, [*ramp, "train.global_batch_size=256",
                                           "train.batch_size_warmup_steps=80", "train.epochs=2"]))
    assert info.notes == ["train.batch_size_warmup_steps=80: the run ends after 40 optimizer "
                          "steps (train.epochs=2), with the ramp at a batch of 128, short of "
                          "train.global_batch_size=256"]
    _, info = resolve(load_config(DIGITS, [*ramp, "train.global_batch_size=512",
                                           "train.batch_size_warmup_steps=100", "train.epochs=12"]))
    assert "after 84 optimizer steps (train.epochs=12), with the ramp at a batch of 416" in \
        info.notes[0]
    _, info = resolve(load_config(DIGITS, [*ramp, "train.global_batch_size=32", "train.epochs=2",
                                           "train.micro_batch_size=16",
                                           "train.batch_size_warmup_steps=100000"]))
    assert info.notes == ["train.batch_size_schedule=warmup has one batch size to take: "
                          "train.batch_size_min=32 is train.global_batch_size: it trains as "
                          "constant"]


def test_an_adaptive_run_too_short_to_choose_by_the_noise_scale_is_said():
    """With its step cost measured the adaptive schedule times its first interval at 1 unit
    batch and its second at 4, and first chooses by goodput at step 2 x interval: a run that
    ends before (here 15 steps, or 2 epochs of 44 units with an interval of 10) trained at the
    explored 4 units whatever the noise scale said, without a word. A note at the start; a
    step cost given (no timing), or a run long enough, none."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    adaptive = ["train.batch_size_schedule=adaptive", "train.batch_size_min=16"]
    _, info = resolve(load_config(DIGITS, [*adaptive, "train.max_steps=15"]))
    assert info.notes == [
        "train.batch_size_interval=10: the adaptive schedule times its first two intervals (the "
        "second at 4 unit batches) to measure its step cost and first chooses by the noise "
        "scale at step 20, which the run (train.max_steps=15) does not reach: it trains at 64 "
        "from step 10 on; decide more often, train longer, or set train.batch_size_step_cost"]
    _, info = resolve(load_config(DIGITS, [*adaptive, "train.batch_size_min=32",
                                           "train.epochs=2"]))  # 88 units, 10 + 40 < 88
    assert info.notes == []
    _, info = resolve(load_config(DIGITS, [*adaptive, "train.max_steps=15",
                                           "train.batch_size_step_cost=100"]))
    assert info.notes == []


def test_a_curriculum_the_run_ends_before_its_pool_is_whole_is_said():
    """The pool grows to the whole training split by `pacing_epochs`: a run whose last epoch
    comes before -- by train.epochs, or by train.max_steps ending it in its first epoch (it
    trained the easiest 10% only, without a word) -- gets a note; one that gets there, none."""
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    curriculum = ["data.name=sequences", "batching.strategy=curriculum",
                  "batching.options.difficulty=length", "train.epochs=10"]
    _, info = resolve(load_config(None, [*curriculum, "train.max_steps=5"]))
    assert info.notes == ["train.max_steps=5 ends the run in epoch 1 of 10: its last epoch "
                          "trains on the easiest 10% of the training split only "
                          "(batching.options.pacing_epochs=5)"]
    _, info = resolve(load_config(None, [*curriculum, "batching.options.pacing_epochs=20"]))
    assert info.notes[0].startswith("batching.options.pacing_epochs=20 with train.epochs=10: "
                                    "the pool would be whole from epoch 21, after the run; its "
                                    "last epoch trains on the easiest ")
    _, info = resolve(load_config(None, curriculum))
    assert info.notes == []
