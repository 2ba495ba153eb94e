"""The reference's `vitl14` recipe: ViT-L/14 SwiGLU, 131k prototypes, separate iBOT head,
Sinkhorn-Knopp, 500 epochs on ImageNet-22k, global batch 3072 (96 GPUs x 32 in the reference).

    python -m dinov2_jax.main --config=configs/vitl14.py --workdir=gs://bucket/run \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.main --config=configs/vitl14.py:smoke --workdir=/tmp/run  # CPU
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.large_scale_recipe("vit_large")
    return configs.smoke(config) if arg == "smoke" else config
