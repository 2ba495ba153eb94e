"""dinov2_jax: DINOv2 (DINO + iBOT + KoLeo) self-supervised ViT training in JAX/Flax."""

__version__ = "0.1.0"
