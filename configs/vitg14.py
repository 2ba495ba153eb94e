"""The reference's `vitg14` recipe: ViT-g/14 (SwiGLU, 1.1B params), vitl14 heads and
schedules, global batch 3072 (256 GPUs x 12 in the reference).

    python -m dinov2_jax.main --config=configs/vitg14.py --workdir=gs://bucket/run \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record --config.mesh.fsdp=-1 \
        --config.mesh.data=1
    python -m dinov2_jax.main --config=configs/vitg14.py:smoke --workdir=/tmp/run  # CPU
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.large_scale_recipe("vit_giant2")
    config.student.remat_policy = "dots_no_batch"
    return configs.smoke(config) if arg == "smoke" else config
