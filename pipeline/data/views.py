"""Contrastive views of a batch (pure numpy, vectorised over all rows at once).

A batch of B samples becomes a batch of ``B * num_views`` rows, **view-major**: view ``v`` of
sample ``i`` sits at row ``v * B + i``. So rows ``0..B-1`` are the first view of every sample,
rows ``B..2B-1`` the second, and so on; ``view_to_sample[row] = row % B`` and
``view_index[row] = row // B``. This is the layout :func:`pipeline.engine.contrastive.nt_xent`
expects through its ``view_to_sample`` argument (any layout works there, this one is simply
what is produced here).
"""

from __future__ import annotations

import numpy as np


def _shift_images(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, pad: int) -> np.ndarray:
    """Shift each image ``images[n]`` ([N, H, W]) by ``(dy[n], dx[n])`` pixels, filling with 0.

    ``out[n, y, x] = images[n, y - dy[n], x - dx[n]]`` (0 outside the image): the content moves
    down by ``dy`` and right by ``dx``. Implemented with one zero padding by ``pad`` >= |shift|
    and a single gather.
    """
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    rows = np.arange(h)[None, :] - dy[:, None] + pad  # [N, H]
    cols = np.arange(w)[None, :] - dx[:, None] + pad  # [N, W]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014; the constants of Vigna's
    splitmix64.c), on uint64 arrays (products wrap modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_bits(key: list[int], per_row: list[np.ndarray], count: int) -> np.ndarray:
    """[rows, count] random uint64 words, row r's a function of `key` and its `per_row` values
    alone: SplitMix64 counter streams (word j of a row: the finaliser of its seed plus (j + 1)
    golden-ratio increments), the seed folded from the words of `key` and the row's values.
    Vectorised over rows: a generator per row (NumPy's default_rng seeded by the same words)
    took 21-100 ms for a 512-sample batch of two views of 64 features.

    >>> a = keyed_bits([3, 1], [np.array([10, 11]), np.array([0, 0])], 2)
    >>> b = keyed_bits([3, 1], [np.array([11]), np.array([0])], 2)
    >>> bool((a[1] == b[0]).all()), bool((a[0] != a[1]).all())
    (True, True)
    """
    with np.errstate(over="ignore"):
        seed = np.full(len(per_row[0]) if per_row else 1, 0x243F6A8885A308D3, dtype=np.uint64)
        for word in [*(np.full_like(seed, int(k) & 0xFFFFFFFFFFFFFFFF) for k in key),
                     *(np.asarray(v).astype(np.uint64) for v in per_row)]:
            seed = _mix(seed ^ (word + _GOLDEN))
        steps = (np.arange(count, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        return _mix(seed[:, None] + steps[None, :])


def _normals(bits: np.ndarray) -> np.ndarray:
    """Standard normals from an even number of uint64 words per row (Box-Muller: a pair of
    uniforms, u1 in (0, 1] and u2 in [0, 1), gives two). The words are exact everywhere; the
    normals as exact as NumPy's float64 log, cos and sin, whose SIMD paths may differ in the
    last bit between CPU families (nodes of one kind give the same views)."""
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1, u2 = 1.0 - u[:, 0::2], u[:, 1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    return np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=-1).reshape(
        len(bits), -1)


def make_views(
    batch: dict[str, np.ndarray],
    *,
    num_views: int,
    rng: np.random.Generator | None = None,
    key: tuple[int, ...] | None = None,
    sample_keys: np.ndarray | None = None,
    feature_key: str = "features",
    noise_std: float = 0.1,
    max_shift: int = 1,
    image_shape: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Return ``num_views`` augmented views of every sample of ``batch``.

    Layout: view ``v`` of sample ``i`` is row ``v * B + i`` of the output (view-major). Every
    array of ``batch`` (all must have B rows) is repeated that way, ``batch[feature_key]`` is
    replaced by its augmented views, and two int64 keys of length ``B * num_views`` are added:
    ``view_to_sample`` (row -> index ``0..B-1`` of its sample in ``batch``) and ``view_index``
    (row -> ``0..num_views-1``).

    Augmentations, each drawn independently per row:

    - with ``image_shape = (H, W)`` (features of ``H * W`` values per sample, flattened
      row-major or already ``[B, H, W]``): a random integer shift in
      ``[-max_shift, max_shift]`` along y and along x, with zero fill;
    - then additive Gaussian noise of standard deviation ``noise_std`` (skipped when 0).

    Without ``image_shape`` only the noise is applied. Features come back as floating point
    (their own dtype if already floating, else float32). The result depends only on the
    batch and the state of ``rng`` (shifts are drawn first, then the noise).

    Keyed views: with ``key`` (e.g. ``(seed, epoch)``) and ``sample_keys`` (one int per sample,
    e.g. its table position) instead of ``rng``, row (view ``v`` of sample ``i``) draws its
    shifts and noise from its own stream, keyed by ``(*key, sample_keys[i], v)``
    (`keyed_bits`). A view is then a function of
    (seed, epoch, sample, view) only -- the same whichever batch, micro-batch or rank the sample
    lands in, so a contrastive step does not depend on how the global batch is split.

    >>> b = {"features": np.zeros((3, 2))}
    >>> one = make_views(b, num_views=2, key=(0, 1), sample_keys=np.array([10, 11, 12]))
    >>> two = make_views({"features": np.zeros((1, 2))}, num_views=2, key=(0, 1),
    ...                  sample_keys=np.array([11]))
    >>> bool(np.array_equal(one["features"][[1, 4]], two["features"]))  # sample 11, views 0 and 1
    True

    >>> batch = {"features": np.arange(4.0).reshape(2, 2), "label": np.array([7, 9])}
    >>> out = make_views(batch, num_views=2, rng=np.random.default_rng(0), noise_std=0.0)
    >>> out["features"]
    array([[0., 1.],
           [2., 3.],
           [0., 1.],
           [2., 3.]])
    >>> out["label"], out["view_to_sample"], out["view_index"]
    (array([7, 9, 7, 9]), array([0, 1, 0, 1]), array([0, 0, 1, 1]))
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if feature_key not in batch:
        raise KeyError(f"batch has no feature column {feature_key!r}")
    if (rng is None) == (key is None):
        raise ValueError("give either rng or key (with sample_keys)")

    features = np.asarray(batch[feature_key])
    b = features.shape[0]
    out: dict[str, np.ndarray] = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != b:
            raise ValueError(f"column {name!r} has shape {value.shape}, expected {b} rows")
        out[name] = np.tile(value, (num_views,) + (1,) * (value.ndim - 1))

    dtype = features.dtype if np.issubdtype(features.dtype, np.floating) else np.float32
    views = out[feature_key].astype(dtype, copy=False)  # np.tile already copied
    n = views.shape[0]
    if image_shape is not None:
        h, w = image_shape
        if int(np.prod(features.shape[1:])) != h * w:
            raise ValueError(f"features of shape {features.shape} do not hold {h}x{w} images")
    if key is not None:
        if sample_keys is None or len(sample_keys) != b:
            raise ValueError(f"keyed views need sample_keys with one entry per sample ({b})")
        sample = np.asarray(sample_keys, dtype=np.int64)[np.arange(n) % b]
        width = int(np.prod(views.shape[1:]))
        bits = keyed_bits([*map(int, key)], [sample, np.arange(n) // b], 2 + width + width % 2)
        span = np.uint64(2 * max_shift + 1)
        dy = (bits[:, 0] % span).astype(np.int64) - max_shift
        dx = (bits[:, 1] % span).astype(np.int64) - max_shift
        noise = (noise_std * _normals(bits[:, 2:])[:, :width].reshape(views.shape)
                 if noise_std > 0 and n else None)
    else:
        dy = rng.integers(-max_shift, max_shift + 1, size=n)
        dx = rng.integers(-max_shift, max_shift + 1, size=n)
        noise = rng.normal(0.0, noise_std, size=views.shape) if noise_std > 0 else None
    if image_shape is not None and max_shift > 0:
        images = _shift_images(views.reshape(n, h, w), dy, dx, max_shift)
        views = images.reshape(views.shape)
    if noise is not None:
        views = views + noise.astype(dtype, copy=False)
    out[feature_key] = views
    out["view_to_sample"] = np.tile(np.arange(b, dtype=np.int64), num_views)
    out["view_index"] = np.repeat(np.arange(num_views, dtype=np.int64), b)
    return out
