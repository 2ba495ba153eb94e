"""iBOT masking: the official dinov2 MaskingGenerator / collate_data_and_cast as the oracle."""
import os
import random

import numpy as np
import pytest

from dinov2_jax.data import masking

os.environ.setdefault("XFORMERS_DISABLED", "1")
torch = pytest.importorskip("torch")
official_masking = pytest.importorskip("dinov2.data.masking")
official_collate = pytest.importorskip("dinov2.data.collate")


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize("size,patch", [(224, 14), (224, 16), (518, 14), (56, 7)])
def test_generator_matches_official(size, patch):
    ours = masking.make_mask_generator(size, patch)
    grid = size // patch
    theirs = official_masking.MaskingGenerator(
        input_size=(grid, grid), max_num_patches=0.5 * size // patch * size // patch)
    assert ours.max_num_patches == theirs.max_num_patches
    for _ in range(30):
        seed = _fresh_seed()
        target = random.SystemRandom().randrange(0, grid * grid // 2 + 1)
        random.seed(seed)
        expected = theirs(target)
        got = ours(target, random.Random(seed))
        np.testing.assert_array_equal(got, expected)
        assert got.sum() <= target


def test_max_num_patches_is_the_float_expression():
    # spec §5.2: 128.0 at S=224, p=14; 98.0 at p=16; 666 (not 684.5) at S=518, p=14.
    assert masking.make_mask_generator(224, 14).max_num_patches == 128.0
    assert masking.make_mask_generator(224, 16).max_num_patches == 98.0
    assert masking.make_mask_generator(518, 14).max_num_patches == 666.0


def test_torch_linspace_float32_is_bitwise_torch():
    for steps in range(1, 400):
        for start, end in [(0.1, 0.5), (0.0, 1.0), (0.3, 0.31), (-4.0, 4.0)]:
            expected = torch.linspace(start, end, steps).numpy()
            np.testing.assert_array_equal(masking.torch_linspace_float32(start, end, steps), expected)


def _official_collate(n_images, size, patch, seed, ratio=(0.1, 0.5), probability=0.5):
    grid = size // patch
    generator = official_masking.MaskingGenerator(
        input_size=(grid, grid), max_num_patches=0.5 * size // patch * size // patch)
    sample = ({"global_crops": [torch.zeros(3, 2, 2)] * 2, "local_crops": [torch.zeros(3, 1, 1)]},
              ())
    random.seed(seed)
    return official_collate.collate_data_and_cast(
        [sample] * n_images, ratio, probability, torch.float32, n_tokens=grid * grid,
        mask_generator=generator)


@pytest.mark.parametrize("n_images,size,patch", [(2, 224, 14), (4, 224, 14), (5, 224, 16),
                                                 (8, 56, 7), (3, 98, 14)])
def test_batch_masks_match_official_collate(n_images, size, patch):
    n_tokens = (size // patch) ** 2
    generator = masking.make_mask_generator(size, patch)
    for _ in range(10):
        seed = _fresh_seed()
        expected = _official_collate(n_images, size, patch, seed)
        masks = masking.sample_masks(2 * n_images, n_tokens, (0.1, 0.5), 0.5, generator,
                                     random.Random(seed))
        np.testing.assert_array_equal(masks, expected["collated_masks"].numpy())
        upperbound = masking.mask_upperbound(2 * n_images, n_tokens, (0.1, 0.5), 0.5)
        assert upperbound == expected["upperbound"]
        indices, weights = masking.padded_mask_indices(masks, upperbound)
        n = int(expected["n_masked_patches"][0])
        assert indices.shape == weights.shape == (upperbound,)
        np.testing.assert_array_equal(indices[:n], expected["mask_indices_list"].numpy())
        np.testing.assert_array_equal(weights[:n], expected["masks_weight"].numpy())
        assert not indices[n:].any() and not weights[n:].any()


@pytest.mark.parametrize("ratio,probability", [((0.2, 0.4), 0.3), ((0.1, 0.5), 1.0)])
def test_other_mask_settings_match_official(ratio, probability):
    generator = masking.make_mask_generator(224, 14)
    seed = _fresh_seed()
    expected = _official_collate(6, 224, 14, seed, ratio, probability)
    masks = masking.sample_masks(12, 256, ratio, probability, generator, random.Random(seed))
    np.testing.assert_array_equal(masks, expected["collated_masks"].numpy())
    assert masking.mask_upperbound(12, 256, ratio, probability) == expected["upperbound"]


@pytest.mark.parametrize("images_per_gpu,n_tokens,upperbound", [
    (64, 196, 3771), (32, 256, 2496), (12, 256, 967), (4, 256, 357), (2, 256, 204)])
def test_upperbound_table_of_spec(images_per_gpu, n_tokens, upperbound):
    assert masking.mask_upperbound(2 * images_per_gpu, n_tokens, (0.1, 0.5), 0.5) == upperbound


def test_masked_count_never_exceeds_upperbound_and_weights_sum_to_one_per_crop():
    generator = masking.make_mask_generator(224, 14)
    upperbound = masking.mask_upperbound(16, 256, (0.1, 0.5), 0.5)
    rng = random.Random(_fresh_seed())
    for _ in range(50):
        masks = masking.sample_masks(16, 256, (0.1, 0.5), 0.5, generator, rng)
        assert masks.sum() <= upperbound
        assert (masks.any(-1)).sum() <= 8  # int(16 * 0.5) crops get a mask
        indices, weights = masking.padded_mask_indices(masks, upperbound)
        per_crop = np.zeros(16)
        np.add.at(per_crop, indices // 256, weights)
        np.testing.assert_allclose(per_crop[masks.any(-1)], 1.0, rtol=1e-5)
        assert per_crop[~masks.any(-1)].sum() == 0


def test_padded_indices_reject_overflow():
    masks = np.ones((2, 4), bool)
    with pytest.raises(ValueError, match="exceed the upperbound"):
        masking.padded_mask_indices(masks, 7)
