"""The natural-image source: random views of scikit-image's photographs, and what DINO learns
from them, measured by k-NN instance retrieval (which photograph a held-out view shows)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("skimage")

from dinov2_jax import configs  # noqa: E402
from dinov2_jax.data import augment, natural, sources  # noqa: E402
from dinov2_jax.eval import extract, knn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATURAL_STEPS = 300
MIN_GAIN = 5.0  # top-1 points over random init and over raw pixels


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


def _pixel_retrieval_top1(size):
    """k-NN top-1 of val views against train views on raw pixels (the eval transform's centre
    crop at the model's input size, ImageNet-normalised as the model sees them)."""
    def pixels(split):
        source = sources.open_source(f"natural:{split}")
        images = np.stack([augment.eval_transform(source[i]["image"],
                                                  extract.default_resize_size(size), size)
                           for i in range(len(source))])
        return augment.normalize(images).reshape(len(source), -1), np.arange(len(source)) % 16
    return knn.knn_classify(*pixels("train"), *pixels("val"), progress=False)["knn/top1"]


@pytest.mark.slow
def test_a_short_demo_run_on_natural_views_learns_instance_retrieval(tmp_path):
    """`configs/demo.py:natural` for NATURAL_STEPS steps: k-NN retrieval of held-out views
    (which of the 16 photographs) by the teacher's cls token, against the same model at random
    init (the run's step-0 evaluation) and against raw pixels."""
    workdir = tmp_path / "natural"
    result = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.main", "--config=configs/demo.py:natural",
         f"--workdir={workdir}", f"--config.train.total_steps={NATURAL_STEPS}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    knn_top1 = {line["step"]: line["knn/top1"] for line in lines if "knn/top1" in line}
    assert sorted(knn_top1) == [0, NATURAL_STEPS]
    size = configs.load(os.path.join(ROOT, "configs/demo.py:natural")).crops.global_crops_size
    raw = _pixel_retrieval_top1(size)
    init, trained = knn_top1[0], knn_top1[NATURAL_STEPS]
    print(f"natural retrieval top-1: raw pixels {raw:.1f}, random init {init:.1f}, "
          f"after {NATURAL_STEPS} steps {trained:.1f}")
    assert trained >= init + MIN_GAIN and trained >= raw + MIN_GAIN, (raw, init, trained)
