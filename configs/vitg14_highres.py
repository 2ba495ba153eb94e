"""High-resolution adaptation of a `vitg14` run: 10k iterations at 518 px global crops.

The recipe of configs/vitl14_highres.py (which gives each value and its source: the DINOv2
paper's 10k iterations at 518 px with compressed schedules and a reduced lr, local crops 224,
batch 2048 as in DINOv3's high-resolution phase, base lr 5e-5) on ViT-g/14 with the `vitg14`
recipe's activation checkpointing. `train.init_from` (required) is the pretraining workdir.

    python -m dinov2_jax.main --config=configs/vitg14_highres.py --workdir=gs://bucket/highres \
        --config.train.init_from=gs://bucket/vitg14 --config.mesh.fsdp=-1 --config.mesh.data=1 \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.main --config=configs/vitg14_highres.py:smoke --workdir=/tmp/hr \
        --config.train.init_from=/tmp/run   # CPU, from a configs/vitg14.py:smoke run
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.high_resolution_recipe("vit_giant2")
    config.student.remat_policy = "dots_no_batch"
    if arg == "smoke":
        config = configs.smoke(config)
        config.crops.global_crops_size = 42  # the smoke run's 2 x 2 table resampled to 3 x 3
    return config
