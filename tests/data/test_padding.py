"""Tests of pipeline.data.padding (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.padding import (
    IGNORE_INDEX,
    collate_sequences,
    pad_ragged,
    padding_efficiency,
    ragged_from_arrow,
)


def _reference_pad(values, lengths, pad_value=0, max_length=None, multiple_of=None):
    """Slow, obviously-correct loop version of pad_ragged."""
    seqs, start = [], 0
    for n in lengths:
        seq = list(values[start : start + n])
        start += n
        seqs.append(seq if max_length is None else seq[:max_length])
    longest = max((len(s) for s in seqs), default=0)
    if multiple_of is not None:
        while longest % multiple_of:
            longest += 1
    padded = np.full((len(seqs), longest), pad_value, dtype=np.asarray(values).dtype)
    mask = np.zeros((len(seqs), longest), dtype=bool)
    for i, seq in enumerate(seqs):
        for j, tok in enumerate(seq):
            padded[i, j] = tok
            mask[i, j] = True
    return padded, mask


def test_hand_made_example():
    values = np.array([5, 6, 7, 8, 9, 10], dtype=np.int32)
    padded, mask = pad_ragged(values, np.array([2, 0, 3, 1]), pad_value=-1)
    np.testing.assert_array_equal(
        padded, np.array([[5, 6, -1], [-1, -1, -1], [7, 8, 9], [10, -1, -1]], dtype=np.int32)
    )
    np.testing.assert_array_equal(
        mask,
        np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=bool),
    )
    assert padded.dtype == np.int32 and mask.dtype == bool


def test_multiple_of_rounds_up():
    values = np.arange(1, 11)
    padded, mask = pad_ragged(values, np.array([9, 1]), multiple_of=8)
    assert padded.shape == (2, 16) and mask.shape == (2, 16)
    np.testing.assert_array_equal(padded[0, :9], np.arange(1, 10))
    assert (padded[0, 9:] == 0).all() and padded[1, 0] == 10 and (padded[1, 1:] == 0).all()
    # already a multiple: no extra padding
    assert pad_ragged(np.arange(8), np.array([8]), multiple_of=8)[0].shape == (1, 8)


def test_truncation_keeps_first_tokens():
    values = np.arange(10)
    padded, mask = pad_ragged(values, np.array([6, 1, 3]), max_length=2)
    np.testing.assert_array_equal(padded, [[0, 1], [6, 0], [7, 8]])
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0], [1, 1]])


def test_empty_batch_and_empty_sequences():
    padded, mask = pad_ragged(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert padded.shape == (0, 0) and mask.shape == (0, 0) and mask.dtype == bool
    padded, mask = pad_ragged(np.zeros(0, dtype=np.int64), np.array([0, 0]), multiple_of=4)
    assert padded.shape == (2, 0) and not mask.any()


def test_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match=r"sum\(lengths\) = 4 does not match len\(values\) = 5"):
        pad_ragged(np.arange(5), np.array([2, 2]))
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        pad_ragged(np.arange(5), np.array([5]), multiple_of=0)
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        pad_ragged(np.arange(5), np.array([5]), max_length=-1)
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        pad_ragged(np.arange(5), np.array([6, -1]))
    with pytest.raises(ValueError, match="values must be 1-D"):
        pad_ragged(np.arange(6).reshape(2, 3), np.array([3, 3]))


@pytest.mark.parametrize("max_length", [None, 1, 100, 512])
@pytest.mark.parametrize("multiple_of", [None, 8, 64])
def test_random_lengths_match_reference(max_length, multiple_of):
    rng = np.random.default_rng(42)
    lengths = rng.integers(1, 2001, size=24)
    lengths[3] = 0
    values = rng.integers(0, 1000, size=int(lengths.sum()))
    padded, mask = pad_ragged(
        values, lengths, pad_value=-7, max_length=max_length, multiple_of=multiple_of
    )
    ref_padded, ref_mask = _reference_pad(values, lengths, -7, max_length, multiple_of)
    np.testing.assert_array_equal(padded, ref_padded)
    np.testing.assert_array_equal(mask, ref_mask)
    cap = lengths if max_length is None else np.minimum(lengths, max_length)
    assert mask.sum() == cap.sum()
    np.testing.assert_array_equal(mask.sum(axis=1), cap)
    assert padding_efficiency(cap, padded.shape[1]) == pytest.approx(
        cap.sum() / (len(cap) * padded.shape[1])
    )


def test_padding_efficiency():
    assert padding_efficiency(np.array([4, 2, 2]), 4) == pytest.approx(8 / 12)
    assert padding_efficiency(np.array([3, 3]), 3) == 1.0
    assert padding_efficiency(np.array([], dtype=np.int64), 16) == 1.0
    with pytest.raises(ValueError, match=r"a length \(5\) exceeds padded_length=4"):
        padding_efficiency(np.array([5]), 4)


def _python_lists(arr):
    lists = arr.to_pylist()
    flat = [x for seq in lists for x in (seq or [])]
    return flat, [len(seq or []) for seq in lists]


@pytest.mark.parametrize("list_type", [pa.list_(pa.int32()), pa.large_list(pa.int32())])
def test_ragged_from_arrow_slice_take_chunked(list_type):
    data = [[1, 2, 3], [], [4], None, [5, 6], [7, 8, 9, 10]]
    arr = pa.array(data, type=list_type)
    cases = [
        arr,
        arr.slice(2, 3),
        arr.slice(4),
        arr.take(pa.array([5, 0, 3, 2])),
        pa.chunked_array([arr.slice(3), arr.slice(0, 2)]),
    ]
    for case in cases:
        values, lengths = ragged_from_arrow(case)
        flat, lens = _python_lists(case)
        assert values.tolist() == flat
        assert lengths.tolist() == lens
        assert lengths.dtype == np.int64


def test_ragged_from_arrow_feeds_pad_ragged():
    arr = pa.array([[1, 2, 3], [4], [5, 6]]).slice(1)
    padded, mask = pad_ragged(*ragged_from_arrow(arr))
    np.testing.assert_array_equal(padded, [[4, 0], [5, 6]])


def test_collate_sequences():
    rng = np.random.default_rng(0)
    lengths = np.array([5, 0, 12, 3])
    tokens = rng.integers(1, 64, size=lengths.sum())
    targets = rng.integers(0, 4, size=lengths.sum())
    label = np.array([2, 0, 1, 1])
    sample_id = np.array([10, 11, 12, 13])
    batch = {
        "tokens_values": tokens,
        "tokens_lengths": lengths,
        "targets_values": targets,
        "label": label,
        "sample_id": sample_id,
    }
    out = collate_sequences(batch, max_length=8, multiple_of=4, pad_id=0)
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "token_targets",
        "lengths",
        "label",
        "sample_id",
    }
    assert out["input_ids"].shape == (4, 8) and out["input_ids"].dtype == np.int64
    assert out["token_targets"].dtype == np.int64 and out["attention_mask"].dtype == bool
    np.testing.assert_array_equal(out["lengths"], [5, 0, 8, 3])
    assert out["lengths"].dtype == np.int64
    mask = out["attention_mask"]
    np.testing.assert_array_equal(out["token_targets"] == IGNORE_INDEX, ~mask)
    assert (out["input_ids"][~mask] == 0).all()
    np.testing.assert_array_equal(out["input_ids"][0, :5], tokens[:5])
    np.testing.assert_array_equal(out["token_targets"][2], targets[5:13])
    assert out["label"] is label and out["sample_id"] is sample_id

    no_targets = collate_sequences({"tokens_values": tokens, "tokens_lengths": lengths})
    assert "token_targets" not in no_targets
    assert no_targets["input_ids"].shape == (4, 12)
