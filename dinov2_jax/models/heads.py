"""The DINO/iBOT projection head (`dinov2/layers/dino_head.py`).

MLP -> L2 norm -> weight-normalised prototypes; see docs/reference.md, Heads. Also the linear
feature head of a student distilled from a backbone-only teacher.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinov2_jax.models.vit import dense_init, torch_default_uniform


class WeightNormPrototypes(nn.Module):
    """Linear(bottleneck -> K, no bias) with W = g * V / ||V|| per prototype.

    `weight_v` is (bottleneck, K), `weight_g` is (K,); g is trainable, as in DINOv2.
    """
    num_prototypes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        bottleneck = x.shape[-1]
        weight_v = self.param("weight_v", torch_default_uniform(bottleneck),
                              (bottleneck, self.num_prototypes))
        weight_g = self.param("weight_g", nn.initializers.ones, (self.num_prototypes,))
        weight_v = weight_v.astype(jnp.float32)
        kernel = weight_v * (weight_g / jnp.linalg.norm(weight_v, axis=0))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


def l2_normalize(x, eps=1e-12):
    """torch's F.normalize over the last axis: x / max(||x||, eps), with torch's zero gradient
    of the norm at x = 0 (jnp.linalg.norm's is NaN there). A zero row happens: with RoPE there
    is no position embedding, so a masked patch token (mask_token, zeros at init) of an image
    that drop path skips in every block reaches the head as zeros."""
    squares = jnp.sum(x * x, axis=-1, keepdims=True)
    norm = jnp.where(squares > 0, jnp.sqrt(jnp.where(squares > 0, squares, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)


class DINOHead(nn.Module):
    """`nlayers` Dense layers with exact GELU between them, L2 normalisation, prototypes."""
    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        widths = [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]
        for i, width in enumerate(widths):
            x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name=f"mlp_{i}")(x)
            if i < len(widths) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = l2_normalize(x.astype(jnp.float32))
        return WeightNormPrototypes(self.out_dim, self.dtype, name="last_layer")(x)


class FeatureHead(nn.Module):
    """Linear maps of a distilled student's cls and patch tokens to a backbone-only teacher's
    feature width (feature distillation, `dinov2_jax/train/distill.py`)."""
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cls, patches):
        def dense(name):
            return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init, name=name)
        return dense("cls")(cls), dense("patch")(patches)
