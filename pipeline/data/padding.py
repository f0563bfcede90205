"""Padding of ragged (variable-length) token sequences into dense batches (pure numpy).

A ragged batch of B sequences is stored as two flat arrays, the layout Arrow list columns
already use: ``values`` (the concatenation of all sequences, 1-D) and ``lengths`` (B,).
Everything here is vectorised: one boolean mask ``np.arange(L) < lengths[:, None]`` selects
the real-token slots of the dense ``[B, L]`` array and fancy indexing fills them, with no
Python loop over samples or tokens.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
"""Target value on padding positions (the default ``ignore_index`` of torch's cross-entropy)."""

_RAGGED_KEYS = ("tokens_values", "tokens_lengths", "targets_values", "targets_lengths")


def _check_positive(name: str, value: int | None, *, allow_zero: bool) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound} or None, got {value}")


def _truncated_lengths(lengths: np.ndarray, max_length: int | None) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.min() < 0:
        raise ValueError("lengths must be non-negative")
    return lengths if max_length is None else np.minimum(lengths, max_length)


def pad_ragged(
    values: np.ndarray,
    lengths: np.ndarray,
    *,
    pad_value: int = 0,
    max_length: int | None = None,
    multiple_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad the B sequences stored as ``(values, lengths)`` into a dense ``[B, L]`` array.

    Each sequence is truncated to its first ``max_length`` tokens (if given); ``L`` is the
    longest truncated length, rounded up to a multiple of ``multiple_of`` (if given). Empty
    sequences are allowed; for B = 0 the result has shape ``(0, 0)``.

    Returns ``(padded, mask)``: ``padded`` has the dtype of ``values`` with ``pad_value`` after
    each sequence's end, ``mask`` is bool and True exactly on real tokens.

    >>> values = np.array([1, 2, 3, 4, 5, 6])
    >>> padded, mask = pad_ragged(values, np.array([3, 0, 2, 1]))
    >>> padded
    array([[1, 2, 3],
           [0, 0, 0],
           [4, 5, 0],
           [6, 0, 0]])
    >>> mask.astype(int)
    array([[1, 1, 1],
           [0, 0, 0],
           [1, 1, 0],
           [1, 0, 0]])
    >>> pad_ragged(values, np.array([3, 0, 2, 1]), max_length=2, multiple_of=4, pad_value=-1)[0]
    array([[ 1,  2, -1, -1],
           [-1, -1, -1, -1],
           [ 4,  5, -1, -1],
           [ 6, -1, -1, -1]])
    """
    _check_positive("max_length", max_length, allow_zero=True)
    _check_positive("multiple_of", multiple_of, allow_zero=False)
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    full = np.asarray(lengths, dtype=np.int64).reshape(-1)
    kept = _truncated_lengths(full, max_length)
    if int(full.sum()) != values.shape[0]:
        raise ValueError(
            f"sum(lengths) = {int(full.sum())} does not match len(values) = {values.shape[0]}"
        )
    b = full.shape[0]
    if b == 0:
        return np.empty((0, 0), dtype=values.dtype), np.empty((0, 0), dtype=bool)

    length = round_up(int(kept.max()), multiple_of)
    positions = np.arange(length, dtype=np.int64)
    mask = positions < kept[:, None]  # [B, L]
    starts = np.cumsum(full) - full  # offset of each sequence in `values`
    padded = np.full((b, length), pad_value, dtype=values.dtype)
    # Row-major order of `mask` visits the kept tokens in the order they sit in `values`.
    padded[mask] = values[(starts[:, None] + positions)[mask]]
    return padded, mask


def round_up(width, multiple_of: int | None):
    """`width` (an int or an integer array) rounded up to a multiple of `multiple_of`; as is
    when None.

    >>> round_up(17, 8), round_up(16, 8), round_up(17, None), round_up(np.array([1, 9]), 8).tolist()
    (24, 16, 17, [8, 16])
    """
    return -(-width // multiple_of) * multiple_of if multiple_of else width


def pack_rows(lengths: np.ndarray, budget: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Where each sequence goes when the batch is packed: (row, offset) per sequence.

    `budget=None`: one row, the sequences one after the other in batch order. Otherwise first
    fit decreasing: longest first, each into the first row with room for it within `budget`
    tokens (a sequence longer than the budget gets a row of its own).

    >>> pack_rows(np.array([3, 1, 2]), None)
    (array([0, 0, 0]), array([0, 3, 4]))
    >>> pack_rows(np.array([3, 1, 2, 2]), 4)  # 3+1 | 2+2
    (array([0, 0, 1, 1]), array([0, 3, 0, 2]))
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if budget is None:
        return np.zeros(len(lengths), np.int64), np.cumsum(lengths) - lengths
    row, offset = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    used: list[int] = []  # tokens placed in each row so far
    for i in np.argsort(-lengths, kind="stable"):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= budget), len(used))
        if r == len(used):
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += int(lengths[i])
    return row, offset


def _packed_shape(lengths: np.ndarray, budget: int | None, multiple_of: int | None
                  ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """`pack_rows` plus the packed batch's shape: (row, offset, rows, width), the width being
    the fullest row rounded up to `multiple_of` (0 rows for no sequence)."""
    row, offset = pack_rows(lengths, budget)
    if not len(row):
        return row, offset, 0, 0
    return row, offset, int(row.max()) + 1, round_up(int((offset + lengths).max()), multiple_of)


def pack_dense(dense: dict[str, tuple[np.ndarray, int]], mask: np.ndarray, budget: int | None,
               multiple_of: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pack padded ``[B, L]`` arrays (each with its fill value) into ``[R, W]`` rows along
    `pack_rows`; W is the fullest row, rounded up to `multiple_of`. Returns the packed arrays
    plus ``attention_mask`` (real tokens), ``segment_ids`` (1, 2, ... for the sequences of a
    row in order, 0 on padding) and ``position_ids`` (restarting at 0 for each sequence), and
    the sample order: the sequences sorted by (row, offset), the order of their segments.

    >>> ids = np.array([[7, 8, 9], [5, 0, 0], [6, 4, 0]])
    >>> packed, order = pack_dense({"input_ids": (ids, 0)}, ids > 0, budget=None)
    >>> packed["input_ids"], packed["segment_ids"], packed["position_ids"], order
    (array([[7, 8, 9, 5, 6, 4]]), array([[1, 1, 1, 2, 3, 3]]), array([[0, 1, 2, 0, 0, 1]]), array([0, 1, 2]))
    """
    row, offset, n_rows, width = _packed_shape(mask.sum(1).astype(np.int64), budget, multiple_of)
    order = np.lexsort((offset, row))
    segment = np.empty(len(row), np.int64)  # 1-based rank of each sequence within its row
    segment[order] = np.arange(len(order)) - np.searchsorted(row[order], row[order]) + 1
    i, j = np.nonzero(mask)
    r, c = row[i], offset[i] + j
    out: dict[str, np.ndarray] = {}
    for key, (values, fill) in dense.items():
        out[key] = np.full((n_rows, width), fill, dtype=values.dtype)
        out[key][r, c] = values[i, j]
    out["attention_mask"] = np.zeros((n_rows, width), dtype=bool)
    out["attention_mask"][r, c] = True
    out["segment_ids"] = np.zeros((n_rows, width), dtype=np.int64)
    out["segment_ids"][r, c] = segment[i]
    out["position_ids"] = np.zeros((n_rows, width), dtype=np.int64)
    out["position_ids"][r, c] = j
    return out, order


def collate_sequences(
    batch: dict[str, np.ndarray],
    *,
    max_length: int | None = None,
    multiple_of: int | None = None,
    pad_id: int = 0,
    packing: bool = False,
    pack_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    """Turn a ragged batch into dense model inputs.

    Input keys: ``tokens_values`` / ``tokens_lengths`` (ragged token ids), optionally
    ``targets_values`` (ragged per-token targets with the same lengths; a ``targets_lengths``
    key, if present, must equal ``tokens_lengths`` and is dropped), plus any other per-sample
    arrays (``label``, ``sample_id``, ...), which are passed through unchanged.

    Output keys: ``input_ids`` (int64 ``[B, L]``, ``pad_id`` on padding), ``attention_mask``
    (bool ``[B, L]``), ``token_targets`` (int64 ``[B, L]``, :data:`IGNORE_INDEX` on padding;
    only when targets are given), ``lengths`` (int64 ``(B,)``, after truncation) and the
    pass-through keys.

    ``packing``: the sequences concatenated into rows of at most ``pack_tokens`` tokens (None:
    one row), `pack_dense`: ``input_ids``, ``attention_mask`` and ``token_targets`` are then
    ``[R, W]``, with ``segment_ids`` and ``position_ids``; the per-sample keys follow the
    sequences' order in the rows.

    >>> out = collate_sequences({
    ...     "tokens_values": np.array([7, 8, 9]), "tokens_lengths": np.array([2, 1]),
    ...     "targets_values": np.array([1, 0, 1]), "label": np.array([0, 2]),
    ... })
    >>> out["input_ids"]
    array([[7, 8],
           [9, 0]])
    >>> out["token_targets"]
    array([[   1,    0],
           [   1, -100]])
    >>> out["lengths"], out["label"]
    (array([2, 1]), array([0, 2]))
    """
    lengths = np.asarray(batch["tokens_lengths"], dtype=np.int64).reshape(-1)
    if "targets_lengths" in batch and not np.array_equal(
        np.asarray(batch["targets_lengths"]).reshape(-1), lengths
    ):
        raise ValueError("targets_lengths differ from tokens_lengths")
    input_ids, mask = pad_ragged(
        np.asarray(batch["tokens_values"]).astype(np.int64, copy=False),
        lengths,
        pad_value=pad_id,
        max_length=max_length,
        multiple_of=multiple_of,
    )
    out: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "lengths": _truncated_lengths(lengths, max_length).copy(),
    }
    if "targets_values" in batch:
        out["token_targets"], _ = pad_ragged(
            np.asarray(batch["targets_values"]).astype(np.int64, copy=False),
            lengths,
            pad_value=IGNORE_INDEX,
            max_length=max_length,
            multiple_of=multiple_of,
        )
    for key, value in batch.items():
        if key not in _RAGGED_KEYS:
            out[key] = value
    if packing:  # the same tokens in rows without padding between sequences (pack_dense)
        dense = {"input_ids": (out["input_ids"], pad_id)}
        if "token_targets" in out:
            dense["token_targets"] = (out["token_targets"], IGNORE_INDEX)
        packed, order = pack_dense(dense, out["attention_mask"], pack_tokens, multiple_of)
        out = {**{k: v[order] for k, v in out.items() if k not in packed}, **packed}
    return out


def batch_shape(lengths: np.ndarray, *, max_length: int | None = None,
                multiple_of: int | None = None, packing: bool = False,
                pack_tokens: int | None = None) -> tuple[int, int]:
    """The ``(rows, width)`` of the token arrays `collate_sequences` builds from sequences of
    these lengths: B rows padded to the longest (rounded up to `multiple_of`), or the R packed
    rows and their width. `inspect-batches` counts padding with it.

    >>> batch_shape(np.array([3, 1, 2])), batch_shape(np.array([3, 1, 2]), packing=True)
    ((3, 3), (1, 6))
    >>> batch_shape(np.array([3, 1, 2, 2]), packing=True, pack_tokens=4, multiple_of=8)
    (2, 8)
    """
    lengths = _truncated_lengths(lengths, max_length)
    if packing:
        _, _, rows, width = _packed_shape(lengths, pack_tokens, multiple_of)
        return rows, width
    return (len(lengths), round_up(int(lengths.max()), multiple_of)) if len(lengths) else (0, 0)


def batch_slots(lengths: np.ndarray, *, max_length: int | None = None,
                multiple_of: int | None = None, packing: bool = False,
                pack_tokens: int | None = None) -> int:
    """Token slots (real + padding) of that batch: rows x width of `batch_shape`.

    >>> batch_slots(np.array([3, 1, 2])), batch_slots(np.array([3, 1, 2, 2]), packing=True,
    ...                                                pack_tokens=4, multiple_of=8)
    (9, 16)
    """
    rows, width = batch_shape(lengths, max_length=max_length, multiple_of=multiple_of,
                              packing=packing, pack_tokens=pack_tokens)
    return rows * width


def padding_efficiency(lengths: np.ndarray, padded_length: int) -> float:
    """Share of real tokens in a ``[B, padded_length]`` batch: ``sum(lengths) / (B * L)``.

    1.0 when the batch has no slots (B = 0 or ``padded_length`` = 0).

    >>> padding_efficiency(np.array([3, 0, 2, 1]), 3)
    0.5
    >>> padding_efficiency(np.array([], dtype=np.int64), 8)
    1.0
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.max() > padded_length:
        raise ValueError(f"a length ({int(lengths.max())}) exceeds padded_length={padded_length}")
    slots = lengths.shape[0] * int(padded_length)
    return 1.0 if slots == 0 else float(lengths.sum()) / slots


def ragged_from_arrow(list_array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, lengths)`` numpy arrays of an Arrow list column, without Python loops.

    Accepts a ``ListArray``, ``LargeListArray``, ``FixedSizeListArray`` or a ``ChunkedArray`` of
    those, including slices and ``.take()`` results whose offsets do not start at 0 (only the
    elements the array actually covers are returned). A null list counts as empty (length 0).
    ``lengths`` is int64.

    >>> import pyarrow as pa
    >>> arr = pa.array([[1, 2], [3], [], [4, 5, 6]])
    >>> values, lengths = ragged_from_arrow(arr.slice(1, 3))
    >>> values, lengths
    (array([3, 4, 5, 6]), array([1, 0, 3]))
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(list_array, pa.ChunkedArray) and list_array.num_chunks == 0:
        value_type = list_array.type.value_type
        empty = pa.array([], type=value_type).to_numpy(zero_copy_only=False)
        return empty, np.zeros(0, dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(list_array), 0)
    values = pc.list_flatten(list_array)  # respects offsets; null lists emit nothing
    return (
        np.asarray(values.to_numpy(zero_copy_only=False)),
        np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64),
    )
