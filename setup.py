"""dinov2_jax: DINOv2 self-supervised training in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="dinov2_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of DINOv2 self-supervised vision training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dinov2_jax", "dinov2_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "ml_collections>=1.1.0",
        "einops>=0.8.2",
        "clu>=0.0.12",
        "absl-py",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # PyTorch interop (.pth export) and the parity tests. torch 2.14.1 with torchvision
        # 0.29.1 because timm and the augmentation parity tests need torchvision.
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        "test": [
            "pytest",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm",
            "transformers",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
        ],
    },
)
