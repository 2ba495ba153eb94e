"""iBOT block masks (the reference's MaskingGenerator and collate logic) with static shapes.

Spec §5.2-5.3. The generator and the per-batch mask assignment keep the reference's exact
arithmetic and its order of Python `random` calls, on an explicit `random.Random`, so that a
given seed reproduces the official package's masks. The reference's float32 torch values
(`torch.linspace` probabilities and `random.uniform` on float32 tensors) are reproduced with
numpy float32.

Static shapes: the masked-patch indices of a mask group are padded to the reference's
`upperbound` (a function of the group size and N only) with index 0 and weight 0.
"""
import math
import random

import numpy as np


class MaskingGenerator:
    """BEiT-style block masking on a (height, width) patch grid, as dinov2.data.masking."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4,
                 max_num_patches=None, min_aspect=0.3, max_aspect=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask: np.ndarray, max_mask_patches, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """A (height, width) bool mask with at most `num_masking_patches` True entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def make_mask_generator(global_crops_size: int, patch_size: int) -> MaskingGenerator:
    """The generator train.py builds: a G x G grid, max_num_patches = 0.5*S//p*S//p (a float)."""
    grid = global_crops_size // patch_size
    return MaskingGenerator(input_size=(grid, grid),
                            max_num_patches=0.5 * global_crops_size // patch_size
                            * global_crops_size // patch_size)


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32, value for value: ATen's two-sided formula
    with a float32 step, each value a fused multiply-add (one rounding, emulated in float64)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.asarray([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    index = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + step * index
    high = np.float64(end32) - step * (steps - 1 - index)
    return np.where(index < steps // 2, low, high).astype(np.float32)


def mask_probabilities(n_masked: int, mask_ratio_min_max) -> np.ndarray:
    return torch_linspace_float32(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1)


def num_masked_crops(n_crops: int, mask_probability: float) -> int:
    return int(n_crops * mask_probability)


def mask_upperbound(n_crops: int, n_tokens: int, mask_ratio_min_max,
                    mask_probability: float) -> int:
    """The reference's `upperbound`: sum over masked crops of int(N * probs[i + 1])."""
    probs = mask_probabilities(num_masked_crops(n_crops, mask_probability), mask_ratio_min_max)
    return sum(int(np.float32(n_tokens) * p) for p in probs[1:])


def sample_masks(n_crops: int, n_tokens: int, mask_ratio_min_max, mask_probability: float,
                 generator: MaskingGenerator, rng: random.Random) -> np.ndarray:
    """collate_data_and_cast's masks for n_crops crops (crop-major rows): (n_crops, N) bool."""
    n_masked = num_masked_crops(n_crops, mask_probability)
    probs = mask_probabilities(n_masked, mask_ratio_min_max)
    masks = []
    for i in range(n_masked):
        low, high = probs[i], probs[i + 1]
        # random.uniform(a, b) = a + (b - a) * random(), here on float32 values as in torch.
        ratio = low + (high - low) * np.float32(rng.random())
        masks.append(generator(int(np.float32(n_tokens) * ratio), rng))
    masks.extend(generator(0, rng) for _ in range(n_masked, n_crops))
    rng.shuffle(masks)
    return np.stack(masks).reshape(n_crops, n_tokens)


def padded_mask_indices(masks: np.ndarray, upperbound: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of True entries of a (n_crops, N) mask grid, padded to `upperbound`.

    Returns (indices int32 (upperbound,), weights float32 (upperbound,)): weights are
    1/(masked patches of that crop), as the reference's masks_weight, and 0 at padding.
    """
    flat = np.flatnonzero(masks)
    if len(flat) > upperbound:
        raise ValueError(f"{len(flat)} masked patches exceed the upperbound {upperbound}")
    per_crop = np.maximum(masks.sum(-1), 1).astype(np.float32)
    indices = np.zeros(upperbound, np.int32)
    weights = np.zeros(upperbound, np.float32)
    indices[:len(flat)] = flat
    weights[:len(flat)] = np.float32(1) / per_crop[flat // masks.shape[1]]
    return indices, weights
