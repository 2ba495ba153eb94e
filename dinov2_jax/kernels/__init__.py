"""Pallas kernels: flash attention with segment ids (flash_attention.py)."""
