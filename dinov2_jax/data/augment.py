"""Multi-crop augmentation equal to the reference's DataAugmentationDINO, and the eval transform.

See docs/reference.md, Augmentation, and the reference's `dinov2/data/augmentations.py`.
Every random choice is drawn from the np.random.Generator that grain's random_map
hands each record (never a global RNG). The ops follow torchvision's functional ops on PIL
images, which is what the reference applies:

  geometric  RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip(0.5)
  colour     RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) -> RandomGrayscale(0.2);
             the four jitters run in a random order, hue is shifted in PIL's 8-bit HSV
             (`color_jitter` and `grayscale_prob` change the strengths, e.g. for data whose
             colours say nothing about content)
  blur       GaussianBlur(kernel 9, sigma ~ U(0.1, 2)) with probability 0.0 / 0.9 / 0.5 for
             global crop 1 / global crop 2 / local crops (the released models' quirk), or
             1.0 / 0.1 / 0.5 with `paper_blur_probs`
  solarize   threshold 128, p=0.2, global crop 2 only

Crops stay uint8 here; `normalize` / `normalize_into` (used when a batch is assembled) turn
them into ImageNet-normalised float32.
The blur runs as two 1-D passes in float32 (the reference's 9x9 kernel is the outer product of
the same 1-D kernel), then rounds to uint8 as torchvision does for uint8 images.
"""
import dataclasses
import functools
import math

import numpy as np
import scipy.ndimage
from PIL import Image, ImageEnhance

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1 / (np.asarray(IMAGENET_STD, np.float32) * 255)
_NORMALIZED_ZERO = -_MEAN_255 * _INV_STD_255
CROP_RATIO = (3 / 4, 4 / 3)
JITTER_PROBABILITY = 0.8
SOLARIZE_PROBABILITY = 0.2
SOLARIZE_THRESHOLD = 128
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
# Effective blur probabilities (global crop 1, global crop 2, local crops): the released
# `dinov2/data/augmentations.py` and the paper's (docs/reference.md, Augmentation).
RELEASED_BLUR_PROBS = (0.0, 0.9, 0.5)
PAPER_BLUR_PROBS = (1.0, 0.1, 0.5)


@dataclasses.dataclass(frozen=True)
class MultiCropSpec:
    """What DataAugmentationDINO is built with: the validated `config.crops`, no defaults of
    its own (those live in `dinov2_jax.configs.default_config`)."""
    global_crops_size: int
    local_crops_size: int
    local_crops_number: int
    global_crops_scale: tuple[float, float]
    local_crops_scale: tuple[float, float]
    paper_blur_probs: bool
    color_jitter: tuple[float, float, float, float]
    grayscale_prob: float
    horizontal_flips: bool = True
    gram_teacher_crops_size: int = 0  # DINOv3: 0, no Gram teacher crops
    gram_teacher_no_distortions: bool = False

    @classmethod
    def from_config(cls, crops) -> "MultiCropSpec":
        """The spec of a validated config.crops (every field must be there)."""
        return cls(
            global_crops_size=int(crops["global_crops_size"]),
            local_crops_size=int(crops["local_crops_size"]),
            local_crops_number=int(crops["local_crops_number"]),
            global_crops_scale=tuple(crops["global_crops_scale"]),
            local_crops_scale=tuple(crops["local_crops_scale"]),
            paper_blur_probs=bool(crops["paper_blur_probs"]),
            color_jitter=tuple(float(v) for v in crops["color_jitter"]),
            grayscale_prob=float(crops["grayscale_prob"]),
            horizontal_flips=bool(crops["horizontal_flips"]),
            gram_teacher_crops_size=int(crops["gram_teacher_crops_size"]),
            gram_teacher_no_distortions=bool(crops["gram_teacher_no_distortions"]))

    @property
    def blur_probs(self) -> tuple[float, float, float]:
        return PAPER_BLUR_PROBS if self.paper_blur_probs else RELEASED_BLUR_PROBS


# ---------------------------------------------------------------- random parameters


def random_resized_crop_params(width: int, height: int, scale, rng: np.random.Generator,
                               ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter_params(rng: np.random.Generator, strengths):
    """torchvision ColorJitter(*strengths).get_params: op order (permutation of 0..3) and the
    four factors (brightness, contrast, saturation, hue)."""
    brightness, contrast, saturation, hue = strengths
    order = rng.permutation(4)
    factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
               rng.uniform(-hue, hue))
    return order, factors


# ---------------------------------------------------------------- ops at fixed parameters


def resized_crop(image: Image.Image, top: int, left: int, height: int, width: int,
                 size: int) -> Image.Image:
    """torchvision F.resized_crop on a PIL image with bicubic interpolation."""
    return image.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(image).enhance(factor)


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """Shifts the hue byte of PIL's 8-bit HSV by int(hue_factor * 255), wrapping around."""
    h, s, v = image.convert("HSV").split()
    shifted = np.asarray(h, np.uint8) + np.uint8(np.int32(hue_factor * 255) & 0xFF)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def to_grayscale(image: Image.Image) -> Image.Image:
    """ITU-R 601-2 luma (PIL's "L"), replicated to three channels."""
    return image.convert("L").convert("RGB")


def gaussian_blur_kernel(sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel in float32 (normalised to sum 1)."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float32)
    pdf = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(image: np.ndarray, sigma: float,
                  kernel_size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """torchvision F.gaussian_blur (reflect padding) of an (H, W, 3) uint8 array, rounded."""
    kernel = gaussian_blur_kernel(sigma, kernel_size)
    # scipy's "mirror" mode is torch's "reflect" padding (the edge pixel is not repeated).
    out = scipy.ndimage.correlate1d(image, kernel, axis=0, output=np.float32, mode="mirror")
    out = scipy.ndimage.correlate1d(out, kernel, axis=1, output=np.float32, mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int = SOLARIZE_THRESHOLD) -> np.ndarray:
    """PIL ImageOps.solarize on a uint8 array: values >= threshold are inverted."""
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: Image.Image, order, factors) -> Image.Image:
    for op_index in order:
        image = _JITTER_OPS[op_index](image, factors[op_index])
    return image


# ---------------------------------------------------------------- the reference's pipelines


def _geometric(image: Image.Image, size: int, scale, rng: np.random.Generator,
               flips: bool = True) -> Image.Image:
    top, left, h, w = random_resized_crop_params(image.width, image.height, scale, rng)
    crop = resized_crop(image, top, left, h, w, size)
    if not flips:  # DINOv3's horizontal_flips=False: no draw (RandomHorizontalFlip(p=0))
        return crop
    return hflip(crop) if rng.random() < 0.5 else crop


def _resize(image, size: int):
    """A square PIL image or uint8 array resized to size x size (bicubic), as PIL."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    return image if image.width == size else image.resize((size, size), Image.BICUBIC)


def _global_and_gram_crop(image, spec: MultiCropSpec, blur_prob: float, may_solarize: bool,
                          rng: np.random.Generator):
    """DINOv3's global crop with its Gram teacher crop (`dinov3/data/augmentations.py`): one
    crop box taken at the larger size, then resized to the global size before the distortions
    (gram_teacher_no_distortions: the Gram crop is the undistorted box) or after them (the Gram
    crop is the distorted one at its size)."""
    g, gram = spec.global_crops_size, spec.gram_teacher_crops_size
    base = _geometric(image, max(g, gram), spec.global_crops_scale, rng, spec.horizontal_flips)
    if spec.gram_teacher_no_distortions:
        crop = _photometric(_resize(base, g), spec, blur_prob, may_solarize, rng)
        return crop, np.asarray(_resize(base, gram))
    distorted = _photometric(base, spec, blur_prob, may_solarize, rng)
    return np.asarray(_resize(distorted, g)), np.asarray(_resize(distorted, gram))


def _photometric(image: Image.Image, spec: MultiCropSpec, blur_prob: float, may_solarize: bool,
                 rng: np.random.Generator) -> np.ndarray:
    if rng.random() < JITTER_PROBABILITY:
        image = color_jitter(image, *color_jitter_params(rng, spec.color_jitter))
    if rng.random() < spec.grayscale_prob:
        image = to_grayscale(image)
    array = np.asarray(image)
    if rng.random() < blur_prob:
        array = gaussian_blur(array, rng.uniform(*BLUR_SIGMA))
    if may_solarize and rng.random() < SOLARIZE_PROBABILITY:
        array = solarize(array)
    return array


def multi_crop(image, rng: np.random.Generator, spec: MultiCropSpec) -> dict[str, np.ndarray]:
    """DataAugmentationDINO on one RGB image (PIL or uint8 HWC array), without normalisation.

    Returns {"global_crops": (2, G, G, 3) uint8, "local_crops": (n_local, L, L, 3) uint8}
    and, with spec.gram_teacher_crops_size S, "gram_teacher_crops" (2, S, S, 3) uint8: the
    global crops' boxes at the Gram teacher's size.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    g, l = spec.global_crops_size, spec.local_crops_size
    blur_global1, blur_global2, blur_local = spec.blur_probs
    global_crops = np.empty((2, g, g, 3), np.uint8)
    local_crops = np.empty((spec.local_crops_number, l, l, 3), np.uint8)
    flips = spec.horizontal_flips
    out = {"global_crops": global_crops, "local_crops": local_crops}
    if spec.gram_teacher_crops_size:
        gram = spec.gram_teacher_crops_size
        out["gram_teacher_crops"] = np.empty((2, gram, gram, 3), np.uint8)
        for c, (blur, may_solarize) in enumerate(((blur_global1, False), (blur_global2, True))):
            global_crops[c], out["gram_teacher_crops"][c] = _global_and_gram_crop(
                image, spec, blur, may_solarize, rng)
    else:
        global_crops[0] = _photometric(_geometric(image, g, spec.global_crops_scale, rng, flips),
                                       spec, blur_global1, False, rng)
        global_crops[1] = _photometric(_geometric(image, g, spec.global_crops_scale, rng, flips),
                                       spec, blur_global2, True, rng)
    for i in range(spec.local_crops_number):
        local_crops[i] = _photometric(_geometric(image, l, spec.local_crops_scale, rng, flips),
                                      spec, blur_local, False, rng)
    return out


@functools.lru_cache(maxsize=16)
def _row_constants(width: int) -> tuple[np.ndarray, np.ndarray]:
    # Per-channel constants tiled along a whole image row: numpy's inner loop then runs over
    # width * 3 values instead of 3, about 6x faster.
    return np.tile(_INV_STD_255, width), np.tile(_NORMALIZED_ZERO, width)


def normalize_into(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Writes (images / 255 - mean) / std (ImageNet) of uint8 images (..., W, 3) into float32
    `out` of the same shape (a view whose last two axes are contiguous)."""
    scale, offset = _row_constants(images.shape[-2])
    rows = out.view()
    rows.shape = out.shape[:-2] + (out.shape[-2] * 3,)  # Raises rather than copy.
    rows[...] = images.reshape(rows.shape)
    rows *= scale
    rows += offset
    return out


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images (..., 3) -> float32 (x / 255 - mean) / std with ImageNet statistics."""
    return normalize_into(np.empty(images.shape, np.float32), images)


# ---------------------------------------------------------------- evaluation


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) with an int size: the short side becomes `size`, bicubic."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(size): pads with zeros when the image is smaller, then crops."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_transform(image, resize_size: int = 256, crop_size: int = 224) -> np.ndarray:
    """The reference's k-NN/linear eval transform without normalisation: resize short side
    (bicubic), center crop. Returns an (crop_size, crop_size, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(center_crop(resize_short_side(image, resize_size), crop_size))
