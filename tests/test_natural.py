"""The natural-image source: random views of scikit-image's photographs, and what DINO learns
from them, measured by k-NN instance retrieval (which photograph a held-out view shows)."""
import numpy as np
import pytest

pytest.importorskip("skimage")

from dinov2_jax.data import natural, sources  # noqa: E402


def test_views_are_a_pure_function_of_seed_split_and_index():
    train = sources.open_source("natural:train:num_images=48:image_size=32")
    assert len(train) == 48 and train.classes == natural.IMAGES
    index = np.random.randint(48)
    a, b = train[index], sources.open_source("natural:train:num_images=48:image_size=32")[index]
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == index % len(natural.IMAGES) and a["key"] == f"natural:train[{index}]"
    # Other views of the same photograph differ: another index, split or seed.
    val = sources.open_source("natural:val:image_size=32")
    other_seed = sources.open_source("natural:train:image_size=32:seed=1")
    same_photo = index + len(natural.IMAGES) if index + 16 < 48 else index - 16
    for other in (train[same_photo], val[index], other_seed[index]):
        assert other["label"] == a["label"]
        assert np.abs(other["image"].astype(int) - a["image"]).mean() > 5
    assert len(val) == natural.DEFAULT_NUM_IMAGES["val"]
    labels = [train[i]["label"] for i in range(48)]
    assert np.bincount(labels).tolist() == [3] * len(natural.IMAGES)


@pytest.mark.parametrize("spec,message", [
    ("natural:test", "natural split must be one of train, val"),
    ("natural:train:val", "natural split must be one of"),
    ("natural:size=3", "unknown option 'size'"),
    ("natural:num_images=many", "option num_images must be an integer"),
    ("natural:num_images=0", "num_images > 0"),
])
def test_bad_source_strings_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        sources.open_source(spec)
    with pytest.raises(IndexError, match=r"natural index 5 out of range \[0, 5\)"):
        sources.open_source("natural:num_images=5")[5]
