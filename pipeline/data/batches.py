"""From an Arrow table to numpy batches (no Ray): columns, the validation split, gathers.

Each worker holds the dataset's Arrow blocks (zero-copy from Ray's object store) and gathers
the samples of its slice of each global batch straight from the Arrow buffers: fixed-size
features as one fancy-indexing gather, sequences as ragged (values, lengths) that the padded
collate turns into [B, L] arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.padding import collate_sequences, ragged_from_arrow
from pipeline.data.plan import SampleMeta


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric or fixed-size-list column -> numpy ([N] or [N, D]) without Python loops."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths == lengths[0]).all():  # equal-length lists: a matrix
            return pc.list_flatten(arr).to_numpy(zero_copy_only=False).reshape(len(arr), -1)
        raise ValueError("variable-length list column used as fixed-size features")
    return arr.to_numpy(zero_copy_only=False)


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
                   id_column: str | None = None, difficulty_column: str | None = None
                   ) -> SampleTable:
        n = table.num_rows

        def col(name: str | None) -> np.ndarray | None:
            return None if name is None else column_to_numpy(table.column(name))

        tokens = table.column(sequence_column).combine_chunks() if sequence_column else None
        return cls(
            ids=col(id_column).astype(np.int64) if id_column else np.arange(n, dtype=np.int64),
            labels=None if label_column is None else col(label_column).astype(np.int64),
            features=None if feature_column is None else col(feature_column).astype(np.float32),
            tokens=tokens,
            targets=table.column(target_column).combine_chunks() if target_column else None,
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
               pad_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        """The collated batch of these positions (padded when the dataset has sequences)."""
        batch: dict[str, np.ndarray] = {"sample_id": self.ids[positions]}
        if self.labels is not None:
            batch["label"] = self.labels[positions]
        if self.features is not None:
            batch["features"] = self.features[positions]
        if self.tokens is not None:
            idx = pa.array(positions)
            batch["tokens_values"], batch["tokens_lengths"] = ragged_from_arrow(self.tokens.take(idx))
            if self.targets is not None:
                batch["targets_values"], _ = ragged_from_arrow(self.targets.take(idx))
            batch = collate_sequences(batch, max_length=max_length, multiple_of=pad_multiple_of)
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
