"""ViT-S/14 distilled from a frozen ViT-g/14 (a `configs/vitg14.py` run), the DINOv2
paper's distillation (dinov2_jax/train/distill.py): the vits14 recipe with the released model's
MLP FFN, no stochastic depth, no masking, iBOT on every global-crop patch, and the EMA student
as the final model.

    python -m dinov2_jax.main --config=configs/vits14_distilled.py --workdir=gs://bucket/vits14_distilled \
        --config.distillation.teacher=gs://bucket/vitg14 \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.convert --input gs://bucket/vits14_distilled --output vits14.pth --format hub
    python -m dinov2_jax.main --config=configs/vits14_distilled.py:smoke --workdir=/tmp/run \
        --config.distillation.teacher=/tmp/vitg14_smoke   # CPU; a configs/vitg14.py:smoke run
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.distillation_recipe("vit_small", ffn_layer="mlp")
    return configs.smoke(config) if arg == "smoke" else config
