"""Natural photographs shipped with scikit-image, as many random views each: instance retrieval.

`natural[:train|val][:num_images=N][:image_size=S][:seed=K]` is a source of N random views of
the 16 photographs in `IMAGES` (loaded with `skimage.data`, bundled in its wheel: no
download). Record i of a split is a view of photograph i % 16 and is labelled with it: a random
resized crop (area `SCALE` of the photograph, aspect ratio in `RATIO`), flipped left-right
with probability 1/2, at S x S pixels (64 by default). A view is a pure function of
(seed, split, i); the train and val splits draw from different streams. k-NN of val views
against the train views is then instance retrieval: which photograph a view comes from
(chance 1/16). Training on the train views is DINO on natural image statistics instead of
the generated demo structures.

scikit-image is needed only when a record is read (the test extra installs it).
"""
import functools

import numpy as np
from PIL import Image

from dinov2_jax.data import augment

IMAGES = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
          "rocket", "text")
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 1600, "val": 320}  # 100 and 20 views of each photograph
DEFAULT_IMAGE_SIZE = 64
SCALE = (0.05, 0.3)  # area of the photograph a view covers
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # the reference's ColorJitter strengths
_SHORT_SIDE = 192  # photographs are kept this small: a view at 64 px needs no more
_SPLIT_STREAM = {"train": 0, "val": 1}
_OPTIONS = ("num_images", "image_size", "seed")


@functools.cache
def photographs():
    """The 16 photographs as RGB uint8 arrays, shorter side _SHORT_SIDE px (loaded once)."""
    try:
        import skimage.data  # a test extra, imported only where the photographs are needed
    except ImportError as e:
        raise ImportError("the natural source needs scikit-image: pip install scikit-image") from e
    out = []
    for name in IMAGES:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
        factor = _SHORT_SIDE / min(image.size)
        size = (round(image.width * factor), round(image.height * factor))
        out.append(np.asarray(image.resize(size, Image.LANCZOS)))
    return tuple(out)


def make_view(seed: int, split: str, index: int, image_size: int = DEFAULT_IMAGE_SIZE):
    """View `index` of a split: (uint8 (S, S, 3) array, label = photograph index)."""
    label = index % len(IMAGES)
    photo = Image.fromarray(photographs()[label])
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    top, left, height, width = augment.random_resized_crop_params(photo.width, photo.height,
                                                                  SCALE, rng)
    view = augment.resized_crop(photo, top, left, height, width, image_size)
    if rng.random() < 0.5:
        view = augment.hflip(view)
    view = augment.color_jitter(view, *augment.color_jitter_params(rng, COLOR_JITTER))
    return np.asarray(view), label


class NaturalSource:
    """Random-access source of view records {"image": uint8 array, "label", "key"}."""

    def __init__(self, split: str = "train", num_images: int | None = None,
                 image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"natural split {split!r} is not one of {SPLITS}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        if self.num_images <= 0 or image_size < 8:
            raise ValueError(f"natural needs num_images > 0 and image_size >= 8, got "
                             f"{self.num_images}, {image_size}")
        self.classes = IMAGES

    @classmethod
    def from_spec(cls, spec: str):
        """The source of a `natural[:train|val][:num_images=N][:image_size=S][:seed=K]` string."""
        kind, _, rest = spec.partition(":")
        if kind != "natural":
            raise ValueError(f"source {spec!r} is not a natural source")
        split, options = None, {}
        for part in rest.split(":") if rest else []:
            key, eq, value = part.partition("=")
            if not eq:
                if split is not None or part not in SPLITS:
                    raise ValueError(f"source {spec!r}: natural split must be one of "
                                     f"{', '.join(SPLITS)}, got {part!r}")
                split = part
            elif key not in _OPTIONS:
                raise ValueError(f"source {spec!r}: unknown option {key!r}, expected one of "
                                 f"{', '.join(_OPTIONS)}")
            else:
                try:
                    options[key] = int(value)
                except ValueError as e:
                    raise ValueError(f"source {spec!r}: option {key} must be an integer, "
                                     f"got {value!r}") from e
        return cls(split or "train", **options)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"natural index {index} out of range [0, {self.num_images})")
        image, label = make_view(self.seed, self.split, index, self.image_size)
        return {"image": image, "label": label, "key": f"natural:{self.split}[{index}]"}
