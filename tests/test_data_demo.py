"""The embedded demo dataset: determinism, labels, balance, speed, and structure over colour."""
import time

import numpy as np
import pytest

from dinov2_jax.data import demo, sources


def test_deterministic_per_index_and_split():
    a, b = demo.DemoSource("train", num_images=50), demo.DemoSource("train", num_images=50)
    for i in np.random.default_rng().integers(0, 50, 10):
        np.testing.assert_array_equal(a[int(i)]["image"], b[int(i)]["image"])
    val = demo.DemoSource("val", num_images=50)
    assert not np.array_equal(a[3]["image"], val[3]["image"])
    assert not np.array_equal(a[3]["image"], a[13]["image"])  # Same class, other image.
    other_seed = demo.DemoSource("train", num_images=50, seed=1)
    assert not np.array_equal(a[3]["image"], other_seed[3]["image"])


def test_records_shapes_labels_and_balance():
    source = sources.open_source("demo:train:num_images=200:image_size=48")
    labels = []
    for i in range(len(source)):
        record = source[i]
        assert record["image"].shape == (48, 48, 3) and record["image"].dtype == np.uint8
        assert record["key"] == f"demo:train[{i}]"
        labels.append(record["label"])
    assert labels == [i % len(demo.CLASSES) for i in range(200)]
    assert np.bincount(labels).tolist() == [20] * len(demo.CLASSES)
    assert len(sources.open_source("demo:val")) == 500 and len(sources.open_source("demo")) == 2000
    with pytest.raises(IndexError):
        source[200]


def test_images_use_the_full_range_and_are_not_flat():
    source = demo.DemoSource("val", num_images=40)
    for i in range(len(source)):
        image = source[i]["image"].astype(np.float32)
        assert image.std() > 10  # Visible structure in every image.


def test_generation_is_fast():
    source = demo.DemoSource("train", num_images=2000)
    start = time.process_time()
    for i in range(500):
        source[i]
    assert (time.process_time() - start) / 500 < 2e-3  # 2,000 images in well under 4 s.


def _images_and_labels(source):
    records = [source[i] for i in range(len(source))]
    return (np.stack([r["image"] for r in records]).astype(np.float32),
            np.array([r["label"] for r in records]))


def _knn_accuracy(train, val, k=10) -> float:
    (x, y), (xv, yv) = train, val
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mean) / std, (xv - mean) / std
    distances = ((xv[:, None] - x[None]) ** 2).sum(-1)
    neighbours = y[np.argsort(distances, axis=1)[:, :k]]
    votes = np.stack([np.bincount(n, minlength=len(demo.CLASSES)) for n in neighbours])
    return float((votes.argmax(1) == yv).mean())


def colour_statistics(images):
    flat = images.reshape(len(images), -1, 3)
    return np.concatenate([flat.mean(1), flat.std(1)] +
                          [np.percentile(flat, q, axis=1) for q in (10, 50, 90)], axis=1)


def radial_spectrum(images):
    gray = images.mean(-1)
    gray = (gray - gray.mean((1, 2), keepdims=True)) / (gray.std((1, 2), keepdims=True) + 1e-6)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(1, 2)))
    size = images.shape[1]
    yy, xx = np.mgrid[0:size, 0:size] - size // 2
    radius = np.minimum(np.hypot(yy, xx).astype(int), size // 2 - 1).ravel()
    return np.stack([np.bincount(radius, p.ravel(), minlength=size // 2) for p in power])


def test_colour_says_little_structure_says_much():
    # k-NN (k=10) on 1,000 train / 300 val images, chance = 10%. Colour statistics stay near
    # chance (bound: 7 standard errors above it); a rotation-invariant structure feature (the
    # radial power spectrum of the gray image) separates the classes far better.
    (x, y), (xv, yv) = (_images_and_labels(demo.DemoSource("train", num_images=1000)),
                        _images_and_labels(demo.DemoSource("val", num_images=300)))
    colour = _knn_accuracy((colour_statistics(x), y), (colour_statistics(xv), yv))
    structure = _knn_accuracy((radial_spectrum(x), y), (radial_spectrum(xv), yv))
    assert colour < 0.1 + 7 * np.sqrt(0.09 / 300)
    assert structure > 0.35
