"""Position-embedding interpolation of the DINOv2 ViT, as the reference computes it.

`interpolate_pos_embed` resamples the learnt (1, 1 + M*M, D) table to another patch grid with
the exact weights of torch's bicubic `F.interpolate` (`dinov2/models/vision_transformer.py`,
`interpolate_pos_encoding`): Keys cubic A=-0.75 with edge taps clamped, or, with `antialias`,
the PIL-style filter (Keys a=-0.5). `jax.image.resize` does not reproduce the first, so both
are explicit (out, M) weight matrices applied rows then columns. See docs/reference.md, Model.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def _keys_cubic_matrix(out_size, in_size, inv_scale, a=-0.75):
    """(out, in) weights of torch's bicubic (align_corners=False, no antialias).

    Keys cubic with A=-0.75, taps floor(src)-1..floor(src)+2 clamped to the edges, and source
    coordinate src = (dst + 0.5) * inv_scale - 0.5.
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        src = (dst + 0.5) * inv_scale - 0.5
        floor = math.floor(src)
        t = src - floor
        weights = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for tap, weight in zip(range(floor - 1, floor + 3), weights):
            matrix[dst, min(max(tap, 0), in_size - 1)] += weight
    return matrix


def _keys_kernel(x, a):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _antialias_cubic_matrix(out_size, in_size, inv_scale, a=-0.5):
    """(out, in) weights of torch's bicubic with antialias=True (a PIL-style filter).

    Keys a=-0.5 stretched by max(inv_scale, 1), support 2*max(inv_scale, 1), normalised.
    """
    stretch = max(inv_scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        center = inv_scale * (dst + 0.5)
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = [_keys_kernel((j - center + 0.5) / stretch, a) for j in range(first, last)]
        matrix[dst, first:last] = np.asarray(taps) / np.sum(taps)
    return matrix


def interpolate_pos_embed(pos_embed, grid_h, grid_w, *, offset, antialias, square_input=True):
    """Resamples a (1, 1+M*M, D) table to a (grid_h, grid_w) patch grid like the reference.

    The table is returned unchanged when the grid is the table's own and the input is square.
    `offset` != 0 samples with scale (grid + offset) / M (the reference's scale_factor path);
    `antialias` is the PIL-style filter of the register models. Computed in float32.
    """
    num_table = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_table))
    if side * side != num_table:
        raise ValueError(f"pos_embed has {num_table} patch positions, not a square grid")
    if grid_h * grid_w == num_table and square_input:
        return pos_embed
    cls_pos = pos_embed[:, :1]
    table = pos_embed[0, 1:].astype(jnp.float32).reshape(side, side, -1)
    scale_h = (grid_h + offset) / side if offset else grid_h / side
    scale_w = (grid_w + offset) / side if offset else grid_w / side
    weights = _antialias_cubic_matrix if antialias else _keys_cubic_matrix
    rows = jnp.asarray(weights(grid_h, side, 1 / scale_h), jnp.float32)
    cols = jnp.asarray(weights(grid_w, side, 1 / scale_w), jnp.float32)
    table = jnp.einsum("ym,xn,mnd->yxd", rows, cols, table, precision=jax.lax.Precision.HIGHEST)
    table = table.reshape(1, grid_h * grid_w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([cls_pos, table], axis=1)


def resize_grid(x, out_h, out_w, *, antialias=False):
    """(..., h, w, D) -> (..., out_h, out_w, D) as torch's bicubic `F.interpolate(size=...)`
    with align_corners=False (the matrices above at scale in/out), in float32."""
    in_h, in_w = x.shape[-3:-1]
    weights = _antialias_cubic_matrix if antialias else _keys_cubic_matrix
    rows = jnp.asarray(weights(out_h, in_h, in_h / out_h), jnp.float32)
    cols = jnp.asarray(weights(out_w, in_w, in_w / out_w), jnp.float32)
    return jnp.einsum("ym,xn,...mnd->...yxd", rows, cols, x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
