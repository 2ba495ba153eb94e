"""DINOv3 model options: axial RoPE (against a float64 transcription of
`dinov3/layers/rope_position_encoding.py` and `rope_apply` of `dinov3/layers/attention.py`),
and the backbone options, each off by default."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax.models import rope

# float32 sin/cos of angles up to 2 pi * 2 (rescaled coords) / 0.01 ... ~1e3 rad: float32
# argument rounding alone is ~1e3 * 6e-8 = 6e-5 absolute on the tables.
TABLE_ATOL = 1e-4


def _np_rope_tables(grid_h, grid_w, head_dim, base=100.0, normalize="separate"):
    """RopePositionEmbedding.forward at eval, float64: (sin, cos), each (HW, head_dim)."""
    n = head_dim // 4
    periods = base ** (2 * np.arange(n) / (head_dim // 2))
    denom_h, denom_w = {"separate": (grid_h, grid_w), "min": (min(grid_h, grid_w),) * 2,
                        "max": (max(grid_h, grid_w),) * 2}[normalize]
    coords_h = np.arange(0.5, grid_h) / denom_h
    coords_w = np.arange(0.5, grid_w) / denom_w
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), -1).reshape(-1, 2)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = np.tile(angles.reshape(len(coords), -1), 2)
    return np.sin(angles), np.cos(angles)


@pytest.mark.parametrize("normalize", ["separate", "min", "max"])
def test_rope_tables_match_transcription_on_a_non_square_grid(normalize):
    settings = rope.Rope(head_dim=16, normalize=normalize)
    sin, cos = settings.tables(3, 5, num_prefix=2)
    ref_sin, ref_cos = _np_rope_tables(3, 5, 16, normalize=normalize)
    np.testing.assert_allclose(sin[2:], ref_sin, atol=TABLE_ATOL)
    np.testing.assert_allclose(cos[2:], ref_cos, atol=TABLE_ATOL)
    assert np.all(sin[:2] == 0) and np.all(cos[:2] == 1)  # prefix tokens: identity


def test_rope_periods_base_and_min_max():
    np.testing.assert_allclose(rope.periods(32), 100.0 ** (2 * np.arange(8) / 16), rtol=1e-6)
    np.testing.assert_allclose(rope.periods(16, None, 0.5, 8.0),
                               0.5 * 16 ** np.linspace(0, 1, 4), rtol=1e-6)
    rounded = rope.periods(64, dtype="bfloat16")
    assert np.array_equal(rounded, np.asarray(jnp.asarray(rope.periods(64), jnp.bfloat16),
                                              np.float32))
    assert not np.array_equal(rounded, rope.periods(64))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope.periods(18)


def test_rope_apply_is_rotate_half_and_keeps_prefix_tokens_bit_exact():
    x = np.float32(np.random.randn(2, 7, 3, 8))
    settings = rope.Rope(head_dim=8)
    sin, cos = settings.tables(2, 3, num_prefix=1)
    out = np.asarray(rope.apply(jnp.asarray(x), sin, cos))
    assert np.array_equal(out[:, :1], x[:, :1])
    ref_sin, ref_cos = _np_rope_tables(2, 3, 8)
    x64 = np.float64(x[:, 1:])
    rotated = np.concatenate([-x64[..., 4:], x64[..., :4]], -1)
    ref = x64 * ref_cos[None, :, None] + rotated * ref_sin[None, :, None]
    np.testing.assert_allclose(out[:, 1:], ref, atol=1e-5)
    # a rotation: norms kept per pair (i, i + D/2), so per vector
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_scores_depend_on_coordinate_differences_only():
    """q_i . k_j after RoPE is a function of pos_i - pos_j: shifting both changes nothing."""
    settings = rope.Rope(head_dim=8)
    q, k = np.float32(np.random.randn(8)), np.float32(np.random.randn(8))
    coords = rope.patch_coords(4, 4)
    sin, cos = rope.sin_cos(coords, settings.periods())
    shifted_sin, shifted_cos = rope.sin_cos(coords + 0.37, settings.periods())

    def score(s, c, i, j):
        rq = rope.apply(jnp.asarray(q)[None, None, None], s[i:i + 1], c[i:i + 1])
        rk = rope.apply(jnp.asarray(k)[None, None, None], s[j:j + 1], c[j:j + 1])
        return float(jnp.sum(rq * rk))

    assert score(sin, cos, 3, 9) == pytest.approx(score(shifted_sin, shifted_cos, 3, 9), abs=1e-5)
    assert score(sin, cos, 3, 9) != pytest.approx(score(sin, cos, 3, 10), abs=1e-3)


def test_rope_augmentation_is_deterministic_per_key_and_off_without_one():
    settings = rope.Rope(head_dim=8, shift=0.5, jitter=1.5, rescale=2.0)
    key = jax.random.key(3)
    a, b = settings.tables(3, 4, 1, key), settings.tables(3, 4, 1, key)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = settings.tables(3, 4, 1, jax.random.key(4))
    assert not np.allclose(a[0], c[0])
    plain = settings.tables(3, 4, 1)
    np.testing.assert_allclose(plain[0][1:], _np_rope_tables(3, 4, 8)[0], atol=TABLE_ATOL)


def test_rope_rescale_draws_one_log_uniform_factor_for_both_axes():
    coords = rope.patch_coords(4, 6)
    factors = []
    for seed in range(200):
        out = np.asarray(rope.augment_coords(coords, jax.random.key(seed), rescale=2.0))
        ratio = out / np.asarray(coords)
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-5)  # one factor, both axes
        factors.append(ratio.flat[0])
    log_factors = np.log(factors)
    assert log_factors.min() >= -math.log(2) - 1e-6 and log_factors.max() <= math.log(2) + 1e-6
    assert log_factors.min() < -0.5 and log_factors.max() > 0.5  # spread over [-log 2, log 2]
    one = rope.augment_coords(coords, jax.random.key(0), rescale=1.0)
    assert np.array_equal(one, coords)  # rescale 1: the identity
