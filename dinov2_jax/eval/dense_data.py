"""Data of the dense probes: image/target pair sources, sliding windows, synthetic scenes.

A source string selects the pairs:

  ade20k:ROOT:training|validation[:num_classes=150]
        ROOT is the ADEChallengeData2016 folder: images/SPLIT/*.jpg, annotations/SPLIT/*.png.
        Label 0 ("other") is ignored and classes shift down by one (mmseg's
        reduce_zero_label), so labels 1..150 become classes 0..149.
  segfolder:ROOT:num_classes=N[:reduce_zero_label=1]
        ROOT/images/* and ROOT/masks/*.png with the same stems; mask values are classes
        0..N-1, 255 is ignored.
  nyu:ROOT[:SPLIT_FILE]
        NYU-Depth-v2 in the layout most depth code uses: SPLIT_FILE (relative to ROOT or
        absolute) has `rgb depth focal` lines with paths relative to ROOT, depth PNGs in
        millimetres. Without a split file, every `rgb_*.jpg` under ROOT pairs with the
        `sync_depth_*.png` next to it. Evaluated inside the Eigen crop.
  depthfolder:ROOT[:scale=1000][:max_depth=10]
        ROOT/rgb/* and ROOT/depth/*.png with the same stems, uint16 depth / scale in metres
        (0 = no measurement). No crop.

`source.load(i)` returns (image (H, W, 3) uint8, target) with target (H, W) int32 classes
(IGNORE_INDEX where ignored) or float32 metres (0 where unknown). A pair that cannot be used
(an unreadable file, image and target of different sizes, a listed file that is missing)
raises `BadPairError`; the probes skip and count those. A mask with a label out of range is
the user's data being wrong, not a bad record: `ConfigError` naming the file and the labels.

Windows follow mmseg's sliding-window inference: an image is resized so its short side is
`size` (its long side capped at 4x, mmseg's (2048, 512) scale), then covered by size x size
windows at `stride`, the last one in each direction flush with the border.
"""
import dataclasses
import math
import re

import numpy as np
from etils import epath
from PIL import Image

from dinov2_jax.configs import ConfigError
from dinov2_jax.data import augment, sources

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
NYU_MIN_DEPTH, NYU_MAX_DEPTH = 1e-3, 10.0
NYU_SHAPE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601) of a 480 x 640 NYU image
MAX_ASPECT = 4  # mmseg's img_scale=(2048, 512): the long side is capped at 4x the short one
MASK_EXTENSIONS = (".png",)


class BadPairError(sources.BadRecordError):
    """An image/target pair that cannot be used: unreadable, missing, or of mismatched size."""


def _options(parts, allowed, spec):
    positional, options = [], {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
        elif key not in allowed:
            raise ConfigError(f"source {spec!r}: unknown option {key!r} "
                              f"(allowed: {', '.join(allowed)})")
        else:
            options[key] = value
    return positional, options


def _number(options, key, default, kind, spec):
    try:
        return kind(options.get(key, default))
    except ValueError:
        raise ConfigError(f"source {spec!r}: {key}={options[key]!r} is not a number") from None


def _stems(folder, extensions):
    """{stem: path} of the files directly in `folder` with one of `extensions`."""
    folder = epath.Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a directory")
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in extensions and not p.name.startswith(".")}


def _read_image(path):
    try:
        return sources.decode_image(epath.Path(path).read_bytes())
    except (OSError, sources.BadRecordError) as error:
        raise BadPairError(f"{path}: {error}") from error


def _read_array(path):
    """The raw values of a single-channel PNG (uint8 or uint16)."""
    try:
        with Image.open(epath.Path(path).open("rb")) as image:
            image.load()
            array = np.asarray(image)
    except Exception as error:  # Any failure to decode means the file is unusable.
        raise BadPairError(f"{path}: cannot read ({type(error).__name__}: {error})") from error
    if array.ndim == 3:  # Some tools write masks as RGB with equal channels.
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise BadPairError(f"{path}: expected a single-channel image, got shape {array.shape}")
    return array


def _check_shapes(image, target, image_path, target_path):
    if image.shape[:2] != target.shape:
        raise BadPairError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but "
                           f"{target_path} is {target.shape[1]}x{target.shape[0]}")


@dataclasses.dataclass
class SegmentationSource:
    """Image/mask pairs; masks map to classes 0..num_classes-1 or IGNORE_INDEX."""
    pairs: list
    num_classes: int
    reduce_zero_label: bool
    name: str
    unpaired: int = 0  # images without a mask and masks without an image

    task = "segmentation"

    def __len__(self):
        return len(self.pairs)

    def key(self, index):
        return str(self.pairs[index][0])

    def load(self, index):
        image_path, mask_path = self.pairs[index]
        image = _read_image(image_path)
        raw = _read_array(mask_path).astype(np.int32)
        _check_shapes(image, raw, image_path, mask_path)
        if self.reduce_zero_label:
            labels = np.where(raw == 0, IGNORE_INDEX, raw - 1)
            labels = np.where(raw == IGNORE_INDEX, IGNORE_INDEX, labels)
        else:
            labels = raw
        bad = np.unique(labels[(labels != IGNORE_INDEX) & ((labels < 0)
                                                           | (labels >= self.num_classes))])
        if bad.size:
            shown = bad + 1 if self.reduce_zero_label else bad
            raise ConfigError(
                f"{mask_path}: mask values {shown[:10].tolist()} are out of range for "
                f"{self.num_classes} classes (source {self.name!r}; valid values are "
                + ("1.." + str(self.num_classes) + " and 0 = ignored" if self.reduce_zero_label
                   else "0.." + str(self.num_classes - 1)) + f", {IGNORE_INDEX} = ignored)")
        return image, labels.astype(np.int32)


@dataclasses.dataclass
class DepthSource:
    """Image/depth pairs in metres (0 = unknown); `eigen_crop` marks NYU's evaluation crop."""
    pairs: list
    scale: float
    min_depth: float
    max_depth: float
    eigen_crop: bool
    name: str
    unpaired: int = 0

    task = "depth"

    def __len__(self):
        return len(self.pairs)

    def key(self, index):
        return str(self.pairs[index][0])

    def load(self, index):
        image_path, depth_path = self.pairs[index]
        image = _read_image(image_path)
        raw = _read_array(depth_path)
        _check_shapes(image, raw, image_path, depth_path)
        return image, raw.astype(np.float32) / self.scale

    def eval_mask(self, depth):
        """Pixels that count in the metrics: depth in (min, max) [and inside the Eigen crop]."""
        valid = (depth > self.min_depth) & (depth < self.max_depth)
        if self.eigen_crop:
            valid &= eigen_crop_mask(depth.shape)
        return valid


def eigen_crop_mask(shape):
    """The Eigen crop of NYU (rows 45:471, cols 41:601 of 480 x 640), scaled to `shape`."""
    height, width = shape
    top, bottom, left, right = EIGEN_CROP
    sy, sx = height / NYU_SHAPE[0], width / NYU_SHAPE[1]
    mask = np.zeros(shape, bool)
    mask[int(round(top * sy)):int(round(bottom * sy)),
         int(round(left * sx)):int(round(right * sx))] = True
    return mask


def _folder_pairs(image_dir, target_dir, spec):
    images = _stems(image_dir, sources.IMAGE_EXTENSIONS)
    targets = _stems(target_dir, MASK_EXTENSIONS)
    pairs = [(images[stem], targets[stem]) for stem in images if stem in targets]
    if not pairs:
        raise ConfigError(f"source {spec!r}: no image in {image_dir} has a .png with the same "
                          f"stem in {target_dir}")
    return pairs, len(images) + len(targets) - 2 * len(pairs)


def _nyu_pairs(root, split_file, spec):
    if split_file:
        path = epath.Path(split_file) if split_file.startswith(("/", "gs://")) \
            else root / split_file
        if not path.exists():
            raise ConfigError(f"source {spec!r}: split file {path} does not exist")
        pairs, unpaired = [], 0
        for row, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ConfigError(f"{path}, line {row}: expected 'rgb depth [focal]', got "
                                  f"{line!r}")
            if fields[1] == "None":  # Lists without ground truth for some frames.
                unpaired += 1
                continue
            pairs.append((root / fields[0].lstrip("/"), root / fields[1].lstrip("/")))
        return pairs, unpaired
    pairs, unpaired, folders = [], 0, [root]
    while folders:  # A walk: epath has no recursive glob on every filesystem.
        entries = sorted(folders.pop().iterdir())
        folders.extend(entry for entry in entries if entry.is_dir())
        names = {entry.name for entry in entries}
        for rgb in entries:
            if rgb.name.startswith("rgb_") and rgb.suffix == ".jpg":
                depth = "sync_depth_" + rgb.stem[len("rgb_"):] + ".png"
                if depth in names:
                    pairs.append((rgb, rgb.parent / depth))
                else:
                    unpaired += 1
    return sorted(pairs), unpaired


def open_dense_source(spec):
    """The pair source named by `spec` (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"dense source {spec!r}: expected ade20k:ROOT:SPLIT, segfolder:ROOT, "
                          "nyu:ROOT[:SPLIT_FILE] or depthfolder:ROOT")
    kind, _, rest = spec.partition(":")
    root_text, *parts = re.split(r":(?!//)", rest)  # gs://bucket keeps its colon.
    root = epath.Path(root_text)
    if not root_text or not root.is_dir():
        raise ConfigError(f"source {spec!r}: {root_text!r} is not a directory")
    if kind == "ade20k":
        positional, options = _options(parts, ("num_classes",), spec)
        if positional not in (["training"], ["validation"]):
            raise ConfigError(f"source {spec!r}: expected ade20k:ROOT:training|validation")
        split = positional[0]
        pairs, unpaired = _folder_pairs(root / "images" / split, root / "annotations" / split,
                                        spec)
        return SegmentationSource(pairs, _number(options, "num_classes", ADE20K_CLASSES, int,
                                                 spec), True, spec, unpaired)
    if kind == "segfolder":
        positional, options = _options(parts, ("num_classes", "reduce_zero_label"), spec)
        if positional or "num_classes" not in options:
            raise ConfigError(f"source {spec!r}: expected segfolder:ROOT:num_classes=N"
                              "[:reduce_zero_label=1]")
        pairs, unpaired = _folder_pairs(root / "images", root / "masks", spec)
        return SegmentationSource(pairs, _number(options, "num_classes", 0, int, spec),
                                  bool(_number(options, "reduce_zero_label", 0, int, spec)),
                                  spec, unpaired)
    if kind == "nyu":
        positional, _ = _options(parts, (), spec)
        if len(positional) > 1:
            raise ConfigError(f"source {spec!r}: expected nyu:ROOT[:SPLIT_FILE]")
        pairs, unpaired = _nyu_pairs(root, positional[0] if positional else "", spec)
        if not pairs:
            raise ConfigError(f"source {spec!r}: no rgb/depth pairs found")
        return DepthSource(pairs, 1000.0, NYU_MIN_DEPTH, NYU_MAX_DEPTH, True, spec, unpaired)
    if kind == "depthfolder":
        positional, options = _options(parts, ("scale", "max_depth"), spec)
        if positional:
            raise ConfigError(f"source {spec!r}: expected depthfolder:ROOT[:scale=1000]"
                              "[:max_depth=10]")
        pairs, unpaired = _folder_pairs(root / "rgb", root / "depth", spec)
        return DepthSource(pairs, _number(options, "scale", 1000.0, float, spec), NYU_MIN_DEPTH,
                           _number(options, "max_depth", NYU_MAX_DEPTH, float, spec), False,
                           spec, unpaired)
    raise ConfigError(f"unknown dense source {spec!r}: expected ade20k:, segfolder:, nyu: or "
                      "depthfolder:")


# ------------------------------------------------------------------------------------------
# Resizing and windows.


def resized_shape(shape, size, scale=1.0):
    """(H', W') of an image resized so its short side is size*scale (long side <= 4x that)."""
    height, width = shape
    factor = min(size * scale / min(height, width), MAX_ASPECT * size * scale / max(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_image(image, shape):
    """uint8 (H, W, 3) -> (shape) bilinear, like mmcv's Resize."""
    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize(shape[::-1], Image.BILINEAR))


def resize_target(target, shape):
    """Nearest-neighbour resize of a mask or depth map, like mmcv's Resize for targets."""
    if target.shape == tuple(shape):
        return target
    rows = np.minimum((np.arange(shape[0]) + 0.5) * target.shape[0] / shape[0],
                      target.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * target.shape[1] / shape[1],
                      target.shape[1] - 1).astype(int)
    return target[rows[:, None], cols[None, :]]


def window_boxes(shape, size, stride):
    """(n, 4) int32 (top, left, bottom, right) windows covering `shape` (mmseg's slide grid).

    A side shorter than `size` gets one window at 0 that runs past it (filled by padding)."""
    def starts(length):
        count = max(length - size + stride - 1, 0) // stride + 1
        return [max(min(i * stride + size, length) - size, 0) for i in range(count)]

    return np.asarray([(top, left, top + size, left + size)
                       for top in starts(shape[0]) for left in starts(shape[1])], np.int32)


def normalize(image):
    """uint8 RGB -> ImageNet-normalised float32."""
    mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
    std = np.asarray(augment.IMAGENET_STD, np.float32)
    return (image.astype(np.float32) / 255.0 - mean) / std


def crop_windows(array, boxes, fill):
    """(n, size, size, ...) windows of `array` at `boxes`, padded with `fill` past its border."""
    size = int(boxes[0, 2] - boxes[0, 0])
    out = np.full((len(boxes), size, size, *array.shape[2:]), fill, array.dtype)
    for i, (top, left, _, _) in enumerate(boxes):
        patch = array[top:top + size, left:left + size]
        out[i, :patch.shape[0], :patch.shape[1]] = patch
    return out


def default_stride(size):
    """The reference's stride for a window: 341 for 512, two thirds of the side."""
    return max(1, int(math.ceil(size * 2 / 3)))


# ------------------------------------------------------------------------------------------
# A synthetic scene generator, for tests, demos and the notebook (no download needed).


def _texture(rng, size):
    """A random grey texture: oriented stripes of two grey levels plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 8)
    wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * x + np.sin(angle) * y)) > 0
    levels = rng.uniform(20, 235, 2)
    image = np.where(wave, levels[0], levels[1])[..., None] * np.ones(3)
    return image + rng.normal(0, 12, image.shape)


SHAPES = ("disc", "square", "triangle")
SHAPE_COLOURS = ((200, 40, 40), (40, 180, 40), (40, 60, 210))  # reddish, greenish, bluish


def _shape_mask(kind, size, centre, radius):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - centre[0], x - centre[1]
    if kind == "disc":
        return np.hypot(dy, dx) <= radius
    if kind == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)


def shapes_scene(rng, size, *, max_shapes=3):
    """(image uint8 (size, size, 3), ADE-style mask uint8): label 1 the grey textured
    background, 2 + SHAPES.index(kind) each shape, flat in a colour near its kind's
    SHAPE_COLOURS entry, 0 (ignored) on a 1-pixel shape outline."""
    image = _texture(rng, size)
    mask = np.ones((size, size), np.uint8)
    for _ in range(rng.integers(1, max_shapes + 1)):
        kind = rng.integers(len(SHAPES))
        radius = rng.uniform(0.15, 0.3) * size
        centre = rng.uniform(radius, size - radius, 2)
        inside = _shape_mask(SHAPES[kind], size, centre, radius)
        image[inside] = np.asarray(SHAPE_COLOURS[kind]) + rng.uniform(-40, 40, 3)
        mask[inside] = 2 + kind
        outline = inside & ~_shape_mask(SHAPES[kind], size, centre, radius - 1.0)
        mask[outline] = 0
    return np.clip(image, 0, 255).astype(np.uint8), mask


def depth_scene(rng, size, *, max_depth=10.0, haze_distance=5.0):
    """(image uint8, depth float32 metres): a textured ground plane under a horizon (depth
    focal / (row - horizon), stripes of constant width on the ground), blocks standing on it
    at the depth of their base, and haze (each colour fades to the sky's grey as
    1 - exp(-depth / haze_distance), a real monocular cue); the sky has no depth (0)."""
    rows = np.arange(size, dtype=np.float32)[:, None] + 0.5
    horizon = rng.uniform(0.15, 0.4) * size
    focal = rng.uniform(0.6, 1.0) * size
    below = np.broadcast_to(rows > horizon, (size, size))
    depth = np.where(below, np.minimum(focal / np.maximum(rows - horizon, 1e-3), max_depth),
                     0.0).astype(np.float32)
    x = (np.arange(size, dtype=np.float32)[None, :] - size / 2) * depth / focal
    stripes = np.sin(2 * np.pi * x / rng.uniform(0.3, 0.6)) > 0  # metres wide on the ground
    colours = rng.uniform(0, 140, (2, 3))
    albedo = np.where(stripes[..., None], colours[0], colours[1])
    for _ in range(rng.integers(1, 4)):
        base = rng.uniform(horizon + 0.1 * size, size)
        block_depth = min(focal / (base - horizon), max_depth)
        half = 0.25 * focal / block_depth  # half a metre wide and tall
        centre = rng.uniform(0, size)
        region = ((np.abs(np.arange(size) - centre) <= half)[None, :]
                  & (rows <= base) & (rows >= base - 2 * half))
        region &= (depth >= block_depth) | ~below  # nearer blocks stay in front
        albedo[region] = rng.uniform(0, 140, 3)
        depth = np.where(region, block_depth, depth)
    sky = rng.uniform(200, 240)
    fade = np.where(depth > 0, 1 - np.exp(-depth / haze_distance), 1.0)[..., None]
    image = albedo * (1 - fade) + sky * fade + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), depth.astype(np.float32)


def write_shapes_dataset(root, split, count, size, seed=0):
    """Writes `count` shapes scenes in the ADE20k layout under root (images/SPLIT/*.jpg,
    annotations/SPLIT/*.png); returns root."""
    root = epath.Path(root)
    rng = np.random.default_rng([seed, split == "validation"])
    for folder in ("images", "annotations"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = shapes_scene(rng, size)
        with (root / "images" / split / f"scene_{i:05d}.jpg").open("wb") as f:
            Image.fromarray(image).save(f, format="JPEG", quality=95)
        with (root / "annotations" / split / f"scene_{i:05d}.png").open("wb") as f:
            Image.fromarray(mask).save(f, format="PNG")
    return root


def write_depth_dataset(root, count, size, seed=0):
    """Writes `count` depth scenes in the depthfolder layout (rgb/*.png, depth/*.png uint16
    millimetres); returns root."""
    root = epath.Path(root)
    rng = np.random.default_rng([seed, 7])
    for folder in ("rgb", "depth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, depth = depth_scene(rng, size)
        with (root / "rgb" / f"scene_{i:05d}.png").open("wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        with (root / "depth" / f"scene_{i:05d}.png").open("wb") as f:
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(f, format="PNG")
    return root
