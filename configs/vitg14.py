"""The reference's `vitg14` recipe: ViT-g/14 (SwiGLU, 1.1B params), vitl14 heads and
schedules, global batch 3072 (256 GPUs x 12 in the reference).

    python -m dinov2_jax.main --config=configs/vitg14.py --workdir=gs://bucket/run \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record --config.mesh.fsdp=-1 \
        --config.mesh.data=1
    python -m dinov2_jax.main --config=configs/vitg14.py:smoke --workdir=/tmp/run  # CPU
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vitl14  # noqa: E402

from dinov2_jax import configs  # noqa: E402


def get_config(arg=None):
    config = vitl14.recipe("vit_giant2")
    config.student.remat_policy = "dots_no_batch"
    return configs.smoke(config) if arg == "smoke" else config
