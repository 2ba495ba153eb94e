"""The embedded demo dataset: labelled synthetic textures generated on the fly from the index.

Ten classes, each a kind of structure: stripes, rings, checkerboard, dots, grid, zigzag,
spiral, blobs, triangles and bricks. Every image draws its own two colours, orientation,
spatial frequency, phase, foreground share (30-50%, the same range for every class),
illumination gradient and pixel noise, so raw colour statistics say little about the class;
a model that learns invariance to the DINO augmentations (crops, colour jitter, blur) can
separate the structures. Image `i` of a split is a pure function of (seed, split, i): no files,
no download, about 0.1 ms per 64 px image.

Labels are `i % 10`, so any split whose size is a multiple of 10 is exactly balanced.
"""
import numpy as np

CLASSES = ("stripes", "rings", "checkerboard", "dots", "grid", "zigzag", "spiral", "blobs",
           "triangles", "bricks")
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 500}
DEFAULT_IMAGE_SIZE = 64
_SPLIT_STREAM = {"train": 0, "val": 1}


def _coordinates(size: int, rng: np.random.Generator):
    """Rotated, scaled, shifted pattern coordinates (u, v) in cycles, and pixel coordinates."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    cycles = rng.uniform(2.5, 6.0)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * x + sin * y) * cycles + rng.uniform(0, 1)
    v = (-sin * x + cos * y) * cycles + rng.uniform(0, 1)
    return u, v, x, y, cycles


def _frac(a):
    return a - np.floor(a)


def _foreground(label: int, size: int, duty: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean foreground mask of class `label`, covering about `duty` of the image."""
    u, v, x, y, cycles = _coordinates(size, rng)
    name = CLASSES[label]
    if name == "stripes":
        return _frac(u) < duty
    if name == "rings":
        cx, cy = rng.uniform(-0.5, 0.5, 2)
        return _frac(np.hypot(x - cx, y - cy) * cycles * 1.5) < duty
    if name == "checkerboard":
        side = np.sqrt(duty / 2)  # Two squares of this side per unit cell, on alternate half-cells.
        parity = (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
        return parity & (_frac(2 * u) < 2 * side) & (_frac(2 * v) < 2 * side)
    if name == "dots":
        radius = np.sqrt(duty / np.pi)
        return np.hypot(_frac(u) - 0.5, _frac(v) - 0.5) < radius
    if name == "grid":
        width = 1 - np.sqrt(1 - duty)
        return (_frac(u) < width) | (_frac(v) < width)
    if name == "zigzag":
        return _frac(u + 0.6 * np.abs(_frac(v) - 0.5)) < duty
    if name == "spiral":
        cx, cy = rng.uniform(-0.25, 0.25, 2)
        arms = rng.integers(2, 5)
        theta = np.arctan2(y - cy, x - cx) / (2 * np.pi)
        return _frac(theta * arms + np.hypot(x - cx, y - cy) * cycles * rng.choice([-1, 1])) < duty
    if name == "blobs":
        field = np.zeros_like(u)
        for _ in range(6):
            direction = rng.uniform(0, 2 * np.pi)
            freq = rng.uniform(1.5, 4.0)
            field += np.sin(2 * np.pi * freq * (np.cos(direction) * x + np.sin(direction) * y)
                            + rng.uniform(0, 2 * np.pi))
        return field > np.quantile(field, 1 - duty)
    if name == "triangles":
        leg = np.sqrt(2 * duty)  # A right triangle of legs `leg` per unit cell has area duty.
        a, b = _frac(u), _frac(v)
        return (a < leg) & (b < leg) & (a + b < leg)
    if name == "bricks":
        row = np.floor(v * 2)
        a = _frac(u + 0.5 * (row % 2))
        b = _frac(v * 2)
        mortar = 1 - np.sqrt(1 - duty)
        return (a < mortar) | (b < mortar * 2)
    raise ValueError(f"demo label {label} out of range [0, {len(CLASSES)})")


def _two_colours(rng: np.random.Generator):
    """Foreground and background colours far enough apart for the structure to show."""
    for _ in range(100):
        fg, bg = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        if np.abs(fg - bg).sum() > 150:
            return fg, bg
    return fg, 255 - fg


def make_image(seed: int, split: str, index: int, image_size: int = DEFAULT_IMAGE_SIZE):
    """Image `index` of a split: (uint8 (S, S, 3) array, label)."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    duty = rng.uniform(0.3, 0.5)
    mask = _foreground(label, image_size, duty, rng)[:, :, None]
    fg, bg = _two_colours(rng)
    image = np.where(mask, fg, bg)
    ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
    gradient = (rng.uniform(-30, 30) * ramp[None, :, None] + rng.uniform(-30, 30) * ramp[:, None, None])
    noise = rng.normal(0, rng.uniform(2, 15), image.shape).astype(np.float32)
    return np.clip(image + gradient + noise, 0, 255).astype(np.uint8), label


class DemoSource:
    """Random-access source of demo records {"image": uint8 array, "label", "key"}."""

    def __init__(self, split: str = "train", num_images: int | None = None,
                 image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"demo split {split!r} is not one of {SPLITS}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        if self.num_images <= 0 or image_size < 8:
            raise ValueError(f"demo needs num_images > 0 and image_size >= 8, got "
                             f"{self.num_images}, {image_size}")
        self.classes = CLASSES

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"demo index {index} out of range [0, {self.num_images})")
        image, label = make_image(self.seed, self.split, index, self.image_size)
        return {"image": image, "label": label, "key": f"demo:{self.split}[{index}]"}
