"""Flax models: the DINOv2 Vision Transformer, the DINO head and the attention backends."""
