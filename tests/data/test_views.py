"""Tests of pipeline.data.views (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.views import make_views

B, H, W = 32, 8, 8


def _digits_like(seed: int = 0, n: int = B) -> dict[str, np.ndarray]:
    """Smooth random 8x8 images in [0, 1] (blocky strokes, like the digits data)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 4, 4))
    images = np.kron(coarse, np.ones((2, 2)))  # 8x8, neighbouring pixels correlated
    return {
        "features": images.reshape(n, H * W).astype(np.float32),
        "label": rng.integers(0, 10, size=n),
        "sample_id": np.arange(100, 100 + n, dtype=np.int64),
    }


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            sy, sx = y - dy, x - dx
            if 0 <= sy < image.shape[0] and 0 <= sx < image.shape[1]:
                out[y, x] = image[sy, sx]
    return out


def test_shapes_and_layout():
    batch = _digits_like()
    out = make_views(batch, num_views=3, rng=np.random.default_rng(1), image_shape=(H, W))
    assert out["features"].shape == (3 * B, H * W)
    assert out["features"].dtype == np.float32
    np.testing.assert_array_equal(out["view_to_sample"], np.tile(np.arange(B), 3))
    np.testing.assert_array_equal(out["view_index"], np.repeat(np.arange(3), B))
    assert out["view_to_sample"].dtype == np.int64 and out["view_index"].dtype == np.int64
    for key in ("label", "sample_id"):
        np.testing.assert_array_equal(out[key], batch[key][out["view_to_sample"]])
    for v in range(3):  # view v of sample i at row v * B + i
        np.testing.assert_array_equal(out["sample_id"][v * B : (v + 1) * B], batch["sample_id"])
    # the input batch is not modified
    np.testing.assert_array_equal(batch["features"], _digits_like()["features"])


def test_views_differ_from_original_but_stay_close():
    batch = _digits_like()
    out = make_views(
        batch,
        num_views=2,
        rng=np.random.default_rng(2),
        noise_std=0.1,
        max_shift=1,
        image_shape=(H, W),
    )
    x = out["features"]
    original = batch["features"][out["view_to_sample"]]
    assert not np.isclose(x, original).all(axis=1).any()  # every view row differs

    # mean distance between the two views of a sample vs between views of different samples
    assert _view_distance_ratio(x) < 0.95  # ~0.85 with shifts (content partly moves out)

    noise_only = make_views(batch, num_views=2, rng=np.random.default_rng(2), noise_std=0.1)
    assert _view_distance_ratio(noise_only["features"]) < 0.5


def _view_distance_ratio(x: np.ndarray) -> float:
    v0, v1 = x[:B], x[B:]
    dist = np.linalg.norm(v0[:, None, :] - v1[None, :, :], axis=-1)  # [B, B]
    return float(np.diag(dist).mean() / dist[~np.eye(B, dtype=bool)].mean())


def test_noise_only_without_image_shape():
    batch = _digits_like()
    out = make_views(batch, num_views=2, rng=np.random.default_rng(3), noise_std=0.05)
    diff = out["features"] - batch["features"][out["view_to_sample"]]
    assert abs(diff.std() - 0.05) < 0.005 and abs(diff.mean()) < 0.005


def test_deterministic_for_same_seed():
    batch = _digits_like()
    kw = dict(num_views=4, noise_std=0.1, max_shift=2, image_shape=(H, W))
    a = make_views(batch, rng=np.random.default_rng(7), **kw)
    b = make_views(batch, rng=np.random.default_rng(7), **kw)
    c = make_views(batch, rng=np.random.default_rng(8), **kw)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["features"], c["features"])


def test_identity_without_noise_or_shift():
    batch = _digits_like()
    out = make_views(
        batch,
        num_views=3,
        rng=np.random.default_rng(0),
        noise_std=0.0,
        max_shift=0,
        image_shape=(H, W),
    )
    np.testing.assert_array_equal(out["features"], np.tile(batch["features"], (3, 1)))


def test_shift_is_zero_filled_translation():
    batch = _digits_like(n=6)
    out = make_views(
        batch,
        num_views=4,
        rng=np.random.default_rng(5),
        noise_std=0.0,
        max_shift=1,
        image_shape=(H, W),
    )
    seen = set()
    for row, sample in enumerate(out["view_to_sample"]):
        image = batch["features"][sample].reshape(H, W)
        view = out["features"][row].reshape(H, W)
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if np.array_equal(view, _shifted(image, dy, dx))
        ]
        assert matches, f"row {row} is not a shift of its sample"
        seen.add(matches[0])
    assert len(seen) > 3  # shifts actually vary


def test_keyed_views_do_not_depend_on_how_the_batch_is_split():
    """With `key` and `sample_keys`, a sample's views are the same in the whole batch, in any
    slice of it and in any order: a function of (key, sample key, view) only."""
    batch = _digits_like(seed=4)
    kw = dict(num_views=2, key=(3, 1), noise_std=0.1, max_shift=1, image_shape=(H, W))
    whole = make_views(batch, sample_keys=batch["sample_id"], **kw)
    order = np.random.default_rng(0).permutation(B)
    for part in (order[:5], order[5:17], order[17:]):  # three uneven micro-batches
        sub = {k: v[part] for k, v in batch.items()}
        views = make_views(sub, sample_keys=sub["sample_id"], **kw)
        for v in range(2):
            np.testing.assert_array_equal(views["features"][v * len(part):(v + 1) * len(part)],
                                          whole["features"][v * B + part])
    other_epoch = make_views(batch, sample_keys=batch["sample_id"], **{**kw, "key": (3, 2)})
    assert not np.isclose(other_epoch["features"], whole["features"]).all(axis=1).any()
    # Two views of one sample differ (the view index is part of the seed).
    assert not np.isclose(whole["features"][:B], whole["features"][B:]).all(axis=1).any()


def test_keyed_views_draw_the_documented_distributions():
    """Keyed streams (`keyed_bits`): the noise is N(0, noise_std) -- mean, spread and a
    two-sided tail as a normal's -- and each shift takes every value in [-1, 1] about a third
    of the time, y and x independently; 2,048 rows of 64 values."""
    n = 2048
    zeros = {"features": np.zeros((n, H * W), np.float32)}
    noise = make_views(zeros, num_views=1, key=(5, 0), sample_keys=np.arange(n),
                       noise_std=0.1, max_shift=0)["features"].ravel()
    assert abs(noise.mean()) < 0.002 and abs(noise.std() - 0.1) < 0.002
    assert abs((np.abs(noise) > 0.196).mean() - 0.05) < 0.005  # 1.96 sigma: 5% outside
    # a single lit pixel in the middle: where it lands gives the row's (dy, dx)
    dot = np.zeros((n, H, W), np.float32)
    dot[:, 4, 4] = 1.0
    moved = make_views({"features": dot.reshape(n, -1)}, num_views=1, key=(5, 0),
                       sample_keys=np.arange(n), noise_std=0.0, max_shift=1,
                       image_shape=(H, W))["features"].reshape(n, H, W)
    y, x = np.unravel_index(moved.reshape(n, -1).argmax(1), (H, W))
    dy, dx = y - 4, x - 4
    for d in (dy, dx):
        assert set(d.tolist()) == {-1, 0, 1}
        assert np.abs(np.bincount(d + 1) / n - 1 / 3).max() < 0.04
    joint = np.bincount((dy + 1) * 3 + dx + 1, minlength=9) / n
    assert np.abs(joint - 1 / 9).max() < 0.03  # independent: every pair about 1/9


def test_invalid_arguments():
    batch = _digits_like(n=4)
    with pytest.raises(ValueError, match="num_views must be >= 1"):
        make_views(batch, num_views=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        make_views(batch, num_views=2, rng=np.random.default_rng(0), noise_std=-1.0)
    with pytest.raises(ValueError, match="give either rng or key"):
        make_views(batch, num_views=2)
    with pytest.raises(ValueError, match="give either rng or key"):
        make_views(batch, num_views=2, rng=np.random.default_rng(0), key=(0,),
                   sample_keys=batch["sample_id"])
    with pytest.raises(ValueError, match=r"one entry per sample \(4\)"):
        make_views(batch, num_views=2, key=(0,), sample_keys=batch["sample_id"][:3])
    with pytest.raises(ValueError, match="do not hold 7x7 images"):
        make_views(batch, num_views=2, rng=np.random.default_rng(0), image_shape=(7, 7))
    with pytest.raises(ValueError, match="column 'label' has shape"):
        make_views({**batch, "label": batch["label"][:3]}, num_views=2,
                   rng=np.random.default_rng(0))
    with pytest.raises(KeyError, match="pixels"):
        make_views(batch, num_views=2, rng=np.random.default_rng(0), feature_key="pixels")
