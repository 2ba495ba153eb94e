"""Multi-crop augmentation vs torchvision's functional ops (the reference's) and distributions.

Statistical checks use 10,000 draws and a tolerance of 5 standard errors (a false alarm
probability below 1e-6 per check), or a two-sample Kolmogorov-Smirnov bound at alpha=1e-3.
"""
import math
import random

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dinov2_jax import configs
from dinov2_jax.data import augment

torch = pytest.importorskip("torch")
TF = pytest.importorskip("torchvision.transforms.functional")
from torchvision import transforms as T  # noqa: E402

N_DRAWS = 10_000
BICUBIC = T.InterpolationMode.BICUBIC


def natural_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour regions, edges and noise: what crops, jitter and blur act on."""
    low = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    image[(xx + 2 * yy) % 23 < 6] *= 0.4
    image += rng.normal(0, 12, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def max_diff(ours, theirs) -> int:
    return int(np.abs(np.asarray(ours, np.int32) - np.asarray(theirs, np.int32)).max())


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def images(rng):
    return [natural_image(rng, int(rng.integers(40, 130)), int(rng.integers(40, 130)))
            for _ in range(6)]


def test_resized_crop_and_flip_match_torchvision(rng, images):
    for image in images:
        for size in (24, 56, 97):
            top, left, h, w = augment.random_resized_crop_params(image.width, image.height,
                                                                 (0.05, 1.0), rng)
            ours = augment.resized_crop(image, top, left, h, w, size)
            theirs = TF.resized_crop(image, top, left, h, w, [size, size], BICUBIC)
            assert max_diff(ours, theirs) <= 1
            assert max_diff(augment.hflip(ours), TF.hflip(theirs)) <= 1


def test_colour_ops_match_torchvision(rng, images):
    for image in images:
        b, c, s = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2)
        h = rng.uniform(-0.1, 0.1)
        assert max_diff(augment.adjust_brightness(image, b), TF.adjust_brightness(image, b)) <= 2
        assert max_diff(augment.adjust_contrast(image, c), TF.adjust_contrast(image, c)) <= 2
        assert max_diff(augment.adjust_saturation(image, s), TF.adjust_saturation(image, s)) <= 2
        assert max_diff(augment.adjust_hue(image, h), TF.adjust_hue(image, h)) <= 2
        assert max_diff(augment.to_grayscale(image), TF.rgb_to_grayscale(image, 3)) <= 2
        assert max_diff(augment.solarize(np.asarray(image)), TF.solarize(image, 128)) <= 2


def test_hue_wraps_around_like_torchvision(images):
    for factor in (-0.1, -0.0001, 0.0999, 0.5, -0.5):
        assert max_diff(augment.adjust_hue(images[0], factor), TF.adjust_hue(images[0], factor)) <= 2


def test_gaussian_blur_matches_torchvision(rng, images):
    for image in images:
        for sigma in (0.1, rng.uniform(0.1, 2.0), 2.0):
            ours = augment.gaussian_blur(np.asarray(image), sigma)
            theirs = TF.gaussian_blur(image, [9, 9], [sigma, sigma])
            assert max_diff(ours, theirs) <= 2


def test_color_jitter_applies_ops_in_the_given_order(rng, images):
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for image in images:
        order, factors = augment.color_jitter_params(rng, (0.4, 0.4, 0.2, 0.1))
        theirs = image
        for i in order:
            theirs = ops[i](theirs, factors[i])
        assert max_diff(augment.color_jitter(image, order, factors), theirs) <= 2


def test_normalize_matches_to_tensor_and_normalize(rng):
    array = rng.integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    normalize = T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    expected = np.stack([normalize(TF.to_tensor(a)).numpy().transpose(1, 2, 0) for a in array])
    np.testing.assert_allclose(augment.normalize(array), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("resize,crop", [(256, 224), (40, 32), (20, 32), (33, 33)])
def test_eval_transform_matches_torchvision(rng, resize, crop):
    reference = T.Compose([T.Resize(resize, interpolation=BICUBIC), T.CenterCrop(crop)])
    for height, width in [(50, 70), (90, 31), (12, 9), (33, 40), (2, 300)]:
        image = natural_image(rng, height, width)
        ours = augment.eval_transform(np.asarray(image), resize_size=resize, crop_size=crop)
        assert ours.shape == (crop, crop, 3)
        assert max_diff(ours, reference(image)) <= 1


def test_crop_params_fallback_for_extreme_and_tiny_images():
    rng = np.random.default_rng()
    # Every attempt fails on these shapes (or all outcomes coincide, 1x1): the result is the
    # deterministic centre fallback, the same as torchvision's.
    for width, height in [(100, 3), (3, 100), (1, 1), (300, 7)]:
        image = Image.new("RGB", (width, height))
        torch.manual_seed(random.SystemRandom().randrange(2**31))
        expected = T.RandomResizedCrop.get_params(image, (0.32, 1.0), augment.CROP_RATIO)
        assert augment.random_resized_crop_params(width, height, (0.32, 1.0), rng) == tuple(expected)
    for _ in range(100):
        top, left, h, w = augment.random_resized_crop_params(2, 1, (0.05, 1.0), rng)
        assert 0 < h <= 1 and 0 < w <= 2 and top == 0 and 0 <= left <= 2 - w


def _ks_statistic(a, b) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                        - np.searchsorted(b, grid, side="right") / len(b)).max())


@pytest.mark.parametrize("width,height,scale", [(200, 150, (0.32, 1.0)), (200, 150, (0.05, 0.32)),
                                                (60, 200, (0.32, 1.0))])
def test_crop_param_distribution_matches_torchvision(width, height, scale):
    rng = np.random.default_rng()
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    image = Image.new("RGB", (width, height))
    ours = np.array([augment.random_resized_crop_params(width, height, scale, rng)
                     for _ in range(N_DRAWS)], np.float64)
    theirs = np.array([T.RandomResizedCrop.get_params(image, scale, augment.CROP_RATIO)
                       for _ in range(N_DRAWS)], np.float64)
    bound = 1.95 * math.sqrt(2 / N_DRAWS)  # KS critical value, alpha = 1e-3.
    for stat in (lambda p: p[:, 2] * p[:, 3], lambda p: np.log(p[:, 3] / p[:, 2]),
                 lambda p: p[:, 0], lambda p: p[:, 1]):
        assert _ks_statistic(stat(ours), stat(theirs)) < bound


def test_crop_scale_and_ratio_moments_without_rejection():
    # On a 1000x1000 image no local crop is rejected: area share ~ U(0.05, 0.32) and
    # log(w/h) ~ U(log 3/4, log 4/3), up to the rounding of w and h (< 1e-3 here).
    rng = np.random.default_rng()
    params = np.array([augment.random_resized_crop_params(1000, 1000, (0.05, 0.32), rng)
                       for _ in range(N_DRAWS)], np.float64)
    share = params[:, 2] * params[:, 3] / 1e6
    log_ratio = np.log(params[:, 3] / params[:, 2])
    assert abs(share.mean() - 0.185) < 5 * (0.27 / math.sqrt(12)) / math.sqrt(N_DRAWS) + 1e-3
    assert abs(log_ratio.mean()) < 5 * (2 * math.log(4 / 3) / math.sqrt(12)) / math.sqrt(N_DRAWS)
    assert share.min() >= 0.049 and share.max() <= 0.321
    assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.01


class OpCounter:
    """Counts, per crop kind (global1, global2, local), how often each random op ran."""

    def __init__(self, monkeypatch, n_local: int):
        self.n_crops, self.crop, self.counts, self.first_op = 2 + n_local, -1, {}, []
        self.sigmas, self.factors = [], []
        for name in ("hflip", "to_grayscale", "solarize"):
            monkeypatch.setattr(augment, name, self._counting(name, getattr(augment, name)))
        geometric, blur, jitter = augment._geometric, augment.gaussian_blur, augment.color_jitter

        def counting_geometric(*args):
            self.crop += 1
            return geometric(*args)

        def counting_blur(image, sigma):
            self.sigmas.append(sigma)
            self._count("blur")
            return blur(image, sigma)

        def counting_jitter(image, order, factors):
            self.first_op.append(order[0])
            self.factors.append(factors)
            self._count("jitter")
            return jitter(image, order, factors)

        monkeypatch.setattr(augment, "_geometric", counting_geometric)
        monkeypatch.setattr(augment, "gaussian_blur", counting_blur)
        monkeypatch.setattr(augment, "color_jitter", counting_jitter)

    def kind(self) -> str:
        index = self.crop % self.n_crops
        return ("global1", "global2")[index] if index < 2 else "local"

    def _count(self, name):
        key = (self.kind(), name)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _counting(self, name, fn):
        def counted(*args):
            self._count(name)
            return fn(*args)
        return counted

    def share(self, kind, name, n_local) -> float:
        trials = N_DRAWS * (n_local if kind == "local" else 1)
        return self.counts.get((kind, name), 0) / trials


def assert_probability(observed: float, p: float, trials: int):
    tolerance = 5 * math.sqrt(max(p * (1 - p), 1e-12) / trials)
    assert abs(observed - p) <= tolerance, (observed, p, tolerance)


@pytest.mark.parametrize("paper,strengths", [
    (False, {}), (True, {}),
    (False, {"color_jitter": (0.1, 0.3, 0.9, 0.5), "grayscale_prob": 0.6})])
def test_per_op_probabilities(monkeypatch, paper, strengths):
    n_local = 1
    counter = OpCounter(monkeypatch, n_local)
    spec = crop_spec(global_crops_size=6, local_crops_size=5, local_crops_number=n_local,
                     paper_blur_probs=paper, **strengths)
    gray = strengths.get("grayscale_prob", 0.2)
    b, c, s, h = strengths.get("color_jitter", (0.4, 0.4, 0.2, 0.1))
    rng = np.random.default_rng()
    image = natural_image(rng, 10, 12)
    for _ in range(N_DRAWS):
        augment.multi_crop(image, rng, spec)
    blur = {"global1": 1.0, "global2": 0.1, "local": 0.5} if paper else {
        "global1": 0.0, "global2": 0.9, "local": 0.5}
    for kind in ("global1", "global2", "local"):
        trials = N_DRAWS * (n_local if kind == "local" else 1)
        assert_probability(counter.share(kind, "hflip", n_local), 0.5, trials)
        assert_probability(counter.share(kind, "jitter", n_local), 0.8, trials)
        assert_probability(counter.share(kind, "to_grayscale", n_local), gray, trials)
        assert_probability(counter.share(kind, "blur", n_local), blur[kind], trials)
        assert_probability(counter.share(kind, "solarize", n_local),
                           0.2 if kind == "global2" else 0.0, trials)
    first = np.bincount(counter.first_op, minlength=4) / len(counter.first_op)
    for share in first:
        assert_probability(share, 0.25, len(counter.first_op))
    factors = np.array(counter.factors)
    for column, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s),
                                          (-h, h)]):
        assert low <= factors[:, column].min() and factors[:, column].max() <= high
        assert_probability((factors[:, column] < (low + high) / 2).mean(), 0.5, len(factors))
    sigmas = np.array(counter.sigmas)
    assert 0.1 <= sigmas.min() and sigmas.max() <= 2.0
    assert_probability((sigmas < 1.05).mean(), 0.5, len(sigmas))


def test_multi_crop_shapes_and_small_images():
    rng = np.random.default_rng()
    spec = crop_spec(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    for shape in [(64, 48, 3), (3, 2, 3), (1, 1, 3), (5, 200, 3)]:
        out = augment.multi_crop(rng.integers(0, 256, shape, dtype=np.uint8), rng, spec)
        assert out["global_crops"].shape == (2, 32, 32, 3)
        assert out["local_crops"].shape == (3, 16, 16, 3)
        assert out["global_crops"].dtype == out["local_crops"].dtype == np.uint8


def test_spec_from_config_reads_crops_keys():
    crops = ml_collections.ConfigDict({"global_crops_size": 56, "local_crops_size": 28,
                                       "local_crops_number": 4, "global_crops_scale": (0.4, 1.0),
                                       "local_crops_scale": (0.1, 0.4), "paper_blur_probs": True,
                                       "color_jitter": (0.3, 0.2, 0.5, 0.4),
                                       "grayscale_prob": 0.5, "horizontal_flips": True,
                                       "gram_teacher_crops_size": 0,
                                       "gram_teacher_no_distortions": False})
    spec = augment.MultiCropSpec.from_config(crops)
    assert spec.color_jitter == (0.3, 0.2, 0.5, 0.4) and spec.grayscale_prob == 0.5
    defaults = augment.MultiCropSpec.from_config(configs.default_config().crops)
    assert defaults.color_jitter == (0.4, 0.4, 0.2, 0.1) and defaults.grayscale_prob == 0.2
    assert (spec.global_crops_size, spec.local_crops_size, spec.local_crops_number) == (56, 28, 4)
    assert spec.global_crops_scale == (0.4, 1.0) and spec.local_crops_scale == (0.1, 0.4)
    assert spec.blur_probs == augment.PAPER_BLUR_PROBS
    assert defaults.blur_probs == augment.RELEASED_BLUR_PROBS
    with pytest.raises(KeyError):  # no defaults of its own: an unvalidated config fails
        augment.MultiCropSpec.from_config({"global_crops_size": 56})


def crop_spec(**crops):
    """The default config's crops (the reference's) with `crops` changed."""
    config = configs.default_config()
    config.crops.update(crops)
    return augment.MultiCropSpec.from_config(config.crops)
