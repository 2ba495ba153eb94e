"""Axial 2-D rotary position embedding of DINOv3 (`dinov3/layers/rope_position_encoding.py`).

`Rope` holds the settings; `Rope.tables` gives the (sin, cos) of every token of a crop, prefix
(cls and storage) tokens included as the identity rotation, and `apply` rotates queries or keys
with them (rotate-half pairing, channel i with i + D_h/2, as `rope_apply` in
`dinov3/layers/attention.py`). Patch centres are normalised to [-1, 1]; at training time the
coordinates can be shifted, jittered per axis and rescaled, with draws from a JAX key. The
math runs in float32; `periods_dtype="bfloat16"` rounds the periods to bfloat16, as stored in
the released DINOv3 checkpoints, whose hub models use those rounded values.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE_MODES = ("separate", "min", "max")


def periods(head_dim, base=100.0, min_period=None, max_period=None, dtype="float32"):
    """The head_dim / 4 periods: base ** (2 i / (head_dim / 2)), or geometric min -> max."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
    n = head_dim // 4
    if min_period is not None and max_period is not None:
        ratio = max_period / min_period
        exponents = np.linspace(0, 1, n, dtype=np.float32)
        values = np.float32(ratio) ** exponents / np.float32(ratio) * np.float32(max_period)
    elif base is not None:
        values = np.float32(base) ** (2 * np.arange(n, dtype=np.float32) / np.float32(head_dim // 2))
    else:
        raise ValueError("RoPE needs a base or both min_period and max_period")
    return np.asarray(values).astype(jnp.dtype(dtype)).astype(np.float32)  # numpy: static


def patch_coords(grid_h, grid_w, normalize="separate"):
    """(grid_h * grid_w, 2) patch-centre (y, x) coordinates in [-1, 1], row-major."""
    if normalize == "separate":
        scale_h, scale_w = grid_h, grid_w
    elif normalize == "min":
        scale_h = scale_w = min(grid_h, grid_w)
    elif normalize == "max":
        scale_h = scale_w = max(grid_h, grid_w)
    else:
        raise ValueError(f"RoPE normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    coords_h = jnp.arange(0.5, grid_h, dtype=jnp.float32) / scale_h
    coords_w = jnp.arange(0.5, grid_w, dtype=jnp.float32) / scale_w
    coords = jnp.stack(jnp.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(-1, 2)
    return 2.0 * coords - 1.0


def augment_coords(coords, rng, *, shift=None, jitter=None, rescale=None):
    """The training-time augmentations, in the reference's order.

    shift: add one uniform value in [-shift, shift] per axis; jitter: multiply each axis by a
    log-uniform factor in [1/jitter, jitter]; rescale: multiply both axes by one log-uniform
    factor in [1/rescale, rescale]. Draws come from `rng`.
    """
    shift_key, jitter_key, rescale_key = jax.random.split(rng, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(shift_key, (2,), jnp.float32, -shift, shift)
    if jitter is not None:
        log_jitter = math.log(jitter)
        coords = coords * jnp.exp(jax.random.uniform(jitter_key, (2,), jnp.float32,
                                                     -log_jitter, log_jitter))
    if rescale is not None:
        log_rescale = math.log(rescale)
        coords = coords * jnp.exp(jax.random.uniform(rescale_key, (1,), jnp.float32,
                                                     -log_rescale, log_rescale))
    return coords


def sin_cos(coords, period_values):
    """(sin, cos), each (N, head_dim): angles 2 pi coord / period for y then x, tiled twice."""
    angles = 2 * math.pi * coords[:, :, None] / jnp.asarray(period_values)[None, None, :]
    angles = jnp.tile(angles.reshape(coords.shape[0], -1), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply(x, sin, cos):
    """Rotates x (B, T, H, D_h) by per-token tables (T, D_h) or (B, T, D_h), in float32.

    Rows with sin 0 and cos 1 (the prefix tokens of `Rope.tables`) come back unchanged.
    """
    if sin.ndim == 2:
        sin, cos = sin[None], cos[None]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """DINOv3's RoPE settings (`pos_embed_rope_*` of `dinov3/models/vision_transformer.py`)."""
    head_dim: int
    base: float | None = 100.0
    min_period: float | None = None
    max_period: float | None = None
    normalize: str = "separate"
    shift: float | None = None
    jitter: float | None = None
    rescale: float | None = None
    periods_dtype: str = "float32"

    @property
    def augments(self):
        return any(v is not None for v in (self.shift, self.jitter, self.rescale))

    def periods(self):
        return periods(self.head_dim, self.base, self.min_period, self.max_period,
                       self.periods_dtype)

    def tables(self, grid_h, grid_w, num_prefix, rng=None):
        """(sin, cos), each (num_prefix + grid_h * grid_w, head_dim), for one crop's tokens.

        With `rng` the coordinates are augmented (training); without, they are the plain grid.
        """
        coords = patch_coords(grid_h, grid_w, self.normalize)
        if rng is not None:
            coords = augment_coords(coords, rng, shift=self.shift, jitter=self.jitter,
                                    rescale=self.rescale)
        sin, cos = sin_cos(coords, self.periods())
        identity = (jnp.zeros((num_prefix, self.head_dim)), jnp.ones((num_prefix, self.head_dim)))
        return (jnp.concatenate([identity[0], sin]), jnp.concatenate([identity[1], cos]))
