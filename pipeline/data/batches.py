"""From an Arrow table to numpy batches (no Ray): columns, the validation split, gathers.

Each worker holds the dataset's Arrow blocks (zero-copy from Ray's object store) and gathers
the samples of its slice of each global batch straight from the Arrow buffers: fixed-size
features as one fancy-indexing gather, sequences as ragged (values, lengths) that the padded
collate turns into [B, L] arrays.

The column checks (`vector_width`, `label_ids`, `check_sequences`) run on the driver before
any cluster work (`pipeline.data.datasets.resolve`); each raises ConfigError with one line
naming the config key and column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError
from pipeline.data.padding import IGNORE_INDEX, collate_sequences, ragged_from_arrow
from pipeline.data.plan import SampleMeta

LIST_OFFSETS_MAX = 2**31 - 1  # a list<> column's int32 offsets: values it can hold in one array


def one_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one array; one of a single chunk is taken as it is (Arrow's combine_chunks
    copies even that). Lists whose values together outgrow int32 offsets (2**31 - 1 tokens of
    a token column over several blocks) become a large_list (Arrow refused to combine them).

    >>> col = pa.chunked_array([pa.array([[1, 2]]), pa.array([[3]])])
    >>> one_array(col).type, LIST_OFFSETS_MAX > 3
    (ListType(list<item: int64>), True)
    """
    if isinstance(col, pa.Array):
        return col
    if col.num_chunks == 1:
        return col.chunk(0)
    if pa.types.is_list(col.type):
        values = sum(int(pc.sum(pc.list_value_length(c)).as_py() or 0) for c in col.chunks)
        if values > LIST_OFFSETS_MAX:
            col = col.cast(pa.large_list(col.type.value_field))
    return col.combine_chunks()


def column_to_numpy(col: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """A numeric or fixed-size-list column -> numpy ([N] or [N, D]) without Python loops
    (without a copy for one chunk of numbers without nulls: read-only then). `width`: D of a
    plain list column with no rows, which has none to read it from (a streamed empty share).

    >>> column_to_numpy(pa.array([[1.0, 2.0]]).slice(0, 0), width=2).shape
    (0, 2)
    """
    arr = one_array(col)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths == lengths[0]).all():  # equal-length lists: a matrix
            return pc.list_flatten(arr).to_numpy(zero_copy_only=False).reshape(len(arr), -1)
        if not len(lengths) and width is not None:
            return np.zeros((0, width), dtype=arr.type.value_type.to_pandas_dtype())
        raise ValueError("variable-length list column used as fixed-size features")
    return arr.to_numpy(zero_copy_only=False)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


FLOAT32_MAX = float(np.finfo(np.float32).max)  # features are trained as float32


def vector_width(chunks: Iterable[pa.Array], key: str) -> int:
    """The length of the fixed-size numeric vectors of a feature column given as chunks (the
    column may be streamed); ConfigError naming `key` when it holds anything else: scalars,
    non-numbers, nulls, or vectors of different lengths (ragged: that is a sequence column).

    >>> vector_width([pa.array([[1.0, 2.0], [3.0, 4.0]])], "data.feature_column='x'")
    2
    >>> halves = pa.array([[1.0, 2.0]], pa.list_(pa.float16()))  # (no Arrow kernel takes them)
    >>> vector_width([halves], "x"), label_ids(pa.array(np.ones(2, np.float16)), "y").tolist()
    (2, [1, 1])
    >>> vector_width([pa.array([[1.0, 2.0], [3.0]])], "data.feature_column='x'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: ... holds vectors of different lengths (1 to 2 values)...
    >>> vector_width([pa.array([[1.0, float("nan")]])], "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: x holds NaN or infinite values
    >>> vector_width([pa.array([[1.0]]), pa.array([[], []], pa.list_(pa.float64()))], "x")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: x holds vectors of different lengths (0 to 1 values)...
    """
    lo = hi = None
    for arr in chunks:
        if not _is_list(arr.type) or not _is_number(arr.type.value_type):
            raise ConfigError(f"data error: {key} is a {arr.type} column; features are one "
                              "fixed-size vector of numbers per sample (a list column)")
        if arr.null_count or pc.list_flatten(arr).null_count:
            raise ConfigError(f"data error: {key} has null vectors or null values")
        if len(arr) == 0:
            continue
        values = pc.list_flatten(arr)
        if pa.types.is_float16(values.type):  # (Arrow's compute kernels take no half floats)
            values = values.cast(pa.float32())
        if (len(values) and pa.types.is_floating(values.type)  # (all() of no values is null)
                and not pc.all(pc.is_finite(values)).as_py()):
            # (training met it as a "non-finite loss", blaming itself, or skipped its steps)
            raise ConfigError(f"data error: {key} holds NaN or infinite values")
        if len(values) and pa.types.is_floating(values.type):  # (any integer fits float32)
            top = pc.max(pc.abs(values)).as_py()  # trained as float32: beyond it, inf there
            if top > FLOAT32_MAX:
                raise ConfigError(f"data error: {key} holds a value of magnitude {top:g}, beyond "
                                  f"float32's range ({FLOAT32_MAX:.4g}), in which features are "
                                  "trained")
        lengths = pc.min_max(pc.list_value_length(arr)).as_py()
        lo = lengths["min"] if lo is None else min(lo, lengths["min"])
        hi = lengths["max"] if hi is None else max(hi, lengths["max"])
    if lo != hi:
        raise ConfigError(f"data error: {key} holds vectors of different lengths ({lo} to {hi} "
                          "values); features are one fixed-size vector per sample")
    if lo == 0:
        raise ConfigError(f"data error: {key} holds empty vectors; features are one fixed-size "
                          "vector of numbers per sample")
    return int(lo or 0)


def sample_ids(col: pa.ChunkedArray | pa.Array, key: str) -> np.ndarray:
    """Sample ids as int64; ConfigError naming `key` for a column of other than integers, nulls,
    ids beyond int64, or an id given twice (inspect-batches counts coverage and duplicates by
    them: a null read as -2**63, 0.2 and 0.7 as 0).

    >>> sample_ids(pa.array([10, 11, 12]), "data.id_column='id'")
    array([10, 11, 12])
    >>> sample_ids(pa.array([10, 11, 10]), "data.id_column='id'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: data.id_column='id' holds the id 10 more than once...
    """
    if not pa.types.is_integer(col.type):
        raise ConfigError(f"data error: {key} is a {col.type} column; sample ids are integers")
    if col.null_count:
        raise ConfigError(f"data error: {key} has {col.null_count} null id(s)")
    values = column_to_numpy(col)
    if len(values) and values.max() > np.iinfo(np.int64).max:
        raise ConfigError(f"data error: {key} holds the id {values.max()}, beyond int64")
    ids = values.astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) < len(ids):
        raise ConfigError(f"data error: {key} holds the id {unique[counts > 1][0]} more than once "
                          f"({len(ids) - len(unique)} repeat(s)); ids name one sample each")
    return ids


def label_ids(col: pa.ChunkedArray | pa.Array, key: str) -> np.ndarray:
    """Class ids as int64; ConfigError naming `key` for nulls, non-integers (1.5, text) or
    negative values. Floats that are whole numbers (1.0) are ids.

    >>> label_ids(pa.array([0.0, 2.0, 1.0]), "data.label_column='y'")
    array([0, 2, 1])
    >>> label_ids(pa.array([0, -1]), "data.label_column='y'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: data.label_column='y' holds a negative label (-1)...
    >>> label_ids(pa.array([2**63 + 5], pa.uint64()), "y")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: y holds the label 9223372036854775813; labels are class ids...
    """
    if col.null_count:
        raise ConfigError(f"data error: {key} has {col.null_count} null label(s)")
    if not _is_number(col.type):
        raise ConfigError(f"data error: {key} is a {col.type} column; labels are integer class "
                          "ids 0..K-1")
    values = column_to_numpy(col)
    if values.dtype == np.float16:  # (compared with 2**24 below: beyond float16's range)
        values = values.astype(np.float32)
    whole = np.isfinite(values) & (values == np.round(values)) if values.dtype.kind == "f" else None
    if whole is not None and not whole.all():
        raise ConfigError(f"data error: {key} holds a non-integer label "
                          f"({values[~whole][0].item()!r}); labels are integer class ids 0..K-1")
    if len(values) and values.min() < 0:
        raise ConfigError(f"data error: {key} holds a negative label ({values.min():g}); labels "
                          "are class ids 0..K-1")
    if len(values) and values.max() >= MAX_CLASSES:  # (before the cast: 1e300 or a uint64
        # of 2**63 and more would turn negative in int64)
        raise ConfigError(f"data error: {key} holds the label {values.max().item()}; labels are class "
                          f"ids 0..K-1 (the model has K outputs), K at most {MAX_CLASSES:,}")
    return values.astype(np.int64)


MAX_CLASSES = 2**24  # labels 0..K-1: the classifier's head has K outputs


def _integer_lists(col: pa.ChunkedArray | pa.Array, key: str, what: str) -> pa.Array:
    """`col` as one array of integer lists; ConfigError naming `key` (and saying `what` is
    expected) for any other type."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (_is_list(col.type) and pa.types.is_integer(col.type.value_type)):
        raise ConfigError(f"data error: {key} is a {col.type} column; {what}")
    return col


def first_misaligned(tokens: pa.Array | pa.ChunkedArray, targets: pa.Array | pa.ChunkedArray
                     ) -> int | None:
    """The first row whose list of targets is not as long as its list of tokens (a null list
    counts as misaligned), or None: token-level targets are one per token.

    >>> first_misaligned(pa.array([[1, 2], [3]]), pa.array([[0, 1], [0, 1]]))
    1
    >>> first_misaligned(pa.array([[1, 2]]), pa.array([[0, 1]])) is None
    True
    >>> first_misaligned(pa.array([[1, 2], None]), pa.array([[0, 1], None]))
    1
    """
    n_tok, n_tgt = (pc.list_value_length(a).fill_null(fill).to_numpy(zero_copy_only=False)
                    for a, fill in ((tokens, -1), (targets, -2)))  # (a null never matches)
    off = np.flatnonzero(n_tok != n_tgt)
    return int(off[0]) if len(off) else None


def check_sequences(batches: Iterable[pa.RecordBatch | pa.Table], key: str,
                    target_key: str | None = None) -> tuple[int, int | None]:
    """Check token sequences (column 0 of each batch) and, with `target_key`, their per-token
    targets (column 1); return (largest token id, largest target or None). ConfigError naming
    the key for: not a list of integers, null or empty sequences, negative token ids, targets
    not aligned with their sequence, negative targets (other than the ignore index -100).

    >>> t = pa.table({"tok": [[3, 1], [2]], "tgt": [[0, 1], [-100]]})
    >>> check_sequences([t], "data.sequence_column='tok'", "data.target_column='tgt'")
    (3, 1)
    >>> bad = pa.table({"tok": [[3, 1]], "tgt": [[0]]})
    >>> check_sequences([bad], "sequences", "targets")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: data error: targets is not aligned with sequences (one target per token...
    """
    max_token, max_target = -1, None
    for batch in batches:
        tokens = _integer_lists(batch.column(0), key, "sequences are lists of integer token ids")
        lengths = pc.list_value_length(tokens)
        values = pc.list_flatten(tokens)
        if tokens.null_count or values.null_count:
            raise ConfigError(f"data error: {key} has null sequences or null token ids")
        if len(tokens) and pc.min(lengths).as_py() == 0:
            raise ConfigError(f"data error: {key} has empty sequences (no token to attend to)")
        if len(values):
            lo, hi = pc.min_max(values).values()
            if lo.as_py() < 0:
                raise ConfigError(f"data error: {key} holds a negative token id ({lo.as_py()})")
            if hi.as_py() >= MAX_CLASSES:  # (the embedding has a row per id up to the largest)
                raise ConfigError(f"data error: {key} holds the token id {hi.as_py()}; the "
                                  f"model's vocabulary is ids 0..V-1, V at most {MAX_CLASSES:,}")
            max_token = max(max_token, hi.as_py())
        if target_key is None:
            continue
        targets = _integer_lists(batch.column(1), target_key,
                                 "targets are lists of integer class ids, one per token")
        t_values = pc.list_flatten(targets)
        if targets.null_count or t_values.null_count or first_misaligned(tokens, targets) is not None:
            raise ConfigError(f"data error: {target_key} is not aligned with {key} (one target "
                              "per token, no nulls)")
        real = pc.filter(t_values, pc.not_equal(t_values, IGNORE_INDEX))
        if len(real):
            lo, hi = pc.min_max(real).values()
            if lo.as_py() < 0:
                raise ConfigError(f"data error: {target_key} holds a negative target "
                                  f"({lo.as_py()}); only {IGNORE_INDEX} (ignored) may be negative")
            if hi.as_py() >= MAX_CLASSES:  # (the output head has a row per class)
                raise ConfigError(f"data error: {target_key} holds the target {hi.as_py()}; "
                                  f"targets are class ids 0..K-1, K at most {MAX_CLASSES:,}")
            max_target = max(max_target if max_target is not None else -1, hi.as_py())
    return int(max_token), max_target


@dataclass
class SampleTable:
    """The dataset as numpy columns, indexed by position (the sample's table position)."""

    ids: np.ndarray  # stable sample ids (id column, else the position)
    labels: np.ndarray | None
    features: np.ndarray | None  # [N, D] float32
    tokens: pa.Array | None  # list<int> column (ragged)
    targets: pa.Array | None  # list<int> per-token targets
    lengths: np.ndarray | None
    difficulty: np.ndarray | None

    @classmethod
    def from_table(cls, table: pa.Table, *, feature_column: str | None, label_column: str | None,
                   sequence_column: str | None = None, target_column: str | None = None,
                   id_column: str | None = None, difficulty_column: str | None = None,
                   feature_width: int | None = None) -> SampleTable:
        n = table.num_rows

        def col(name: str | None, width: int | None = None) -> np.ndarray | None:
            return None if name is None else column_to_numpy(table.column(name), width)

        tokens = one_array(table.column(sequence_column)) if sequence_column else None
        return cls(
            ids=(sample_ids(table.column(id_column), f"data.id_column={id_column!r}") if id_column
                 else np.arange(n, dtype=np.int64)),
            labels=None if label_column is None
            else label_ids(table.column(label_column), f"data.label_column={label_column!r}"),
            features=None if feature_column is None
            else col(feature_column, feature_width).astype(np.float32, copy=False),  # float32 as is
            tokens=tokens,
            targets=one_array(table.column(target_column)) if target_column else None,
            lengths=None if tokens is None else pc.list_value_length(tokens).to_numpy().astype(np.int64),
            difficulty=None if difficulty_column is None else col(difficulty_column).astype(np.float64),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def meta(self, positions: np.ndarray, weights: np.ndarray | None = None) -> SampleMeta:
        """Planner input for the pool at these positions (ids in the plan are positions)."""
        def at(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[positions]

        return SampleMeta(ids=positions.astype(np.int64), labels=at(self.labels),
                          lengths=at(self.lengths), difficulty=at(self.difficulty),
                          weights=None if weights is None else weights[positions])

    def gather(self, positions: np.ndarray, *, max_length: int | None = None,
               pad_multiple_of: int | None = None, packing: bool = False,
               pack_tokens: int | None = None) -> dict[str, np.ndarray]:
        """The collated batch of these positions (padded, or packed, when the dataset has
        sequences: `collate_sequences`)."""
        batch: dict[str, np.ndarray] = {"sample_id": self.ids[positions]}
        if self.labels is not None:
            batch["label"] = self.labels[positions]
        if self.features is not None:
            batch["features"] = self.features[positions]
        if self.tokens is not None:
            idx = pa.array(positions)
            batch["tokens_values"], batch["tokens_lengths"] = ragged_from_arrow(self.tokens.take(idx))
            if self.targets is not None:
                batch["targets_values"], batch["targets_lengths"] = ragged_from_arrow(
                    self.targets.take(idx))
            batch = collate_sequences(batch, max_length=max_length, multiple_of=pad_multiple_of,
                                      packing=packing, pack_tokens=pack_tokens)
        return batch


def split_train_val(n: int, labels: np.ndarray | None, val_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic hold-out: per class (stratified when labels exist) a seeded random
    round(count x val_fraction) go to validation -- at least one and at most count - 1 when the
    class has two or more samples, so every such class is in both splits. Returns sorted
    (train, val) positions.

    >>> tr, va = split_train_val(10, None, 0.2, seed=0)
    >>> len(tr), len(va), sorted(set(tr) | set(va)) == list(range(10))
    (8, 2, True)
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == k)
                                                     for k in np.unique(labels)]
    def n_val(count: int) -> int:
        k = int(round(count * val_fraction))
        return min(max(k, 1), count - 1) if val_fraction > 0 and count >= 2 else k

    val = [g[rng.permutation(len(g))[: n_val(len(g))]] for g in groups]
    val_pos = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_pos = np.setdiff1d(np.arange(n), val_pos)
    return train_pos.astype(np.int64), val_pos.astype(np.int64)


def micro_slices(positions: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    """Consecutive micro-batches of at most micro_batch_size (the last may be shorter)."""
    size = max(1, int(micro_batch_size))
    return [positions[i : i + size] for i in range(0, len(positions), size)] or [positions]
