"""ViT-S/14, ViT-B/14 and ViT-L/14 distilled together from one frozen ViT-g/14 (a
`configs/vitg14.py` run): one teacher forward per step feeds the three students' updates in
one jitted step (DINOv3's multi-student distillation, `dinov3/train/multidist_meta_arch.py`,
here on one mesh). Each student is the `*_distilled` recipe's; its metrics are prefixed with
its name, its checkpoint subtree is `students/NAME`, and it exports on its own:

    python -m dinov2_jax.main --config=configs/vit_family_distilled.py --workdir=gs://bucket/family \
        --config.distillation.teacher=gs://bucket/vitg14 \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.convert --input gs://bucket/family --student vits14 --output vits14.pth --format hub
    python -m dinov2_jax.main --config=configs/vit_family_distilled.py:smoke --workdir=/tmp/run \
        --config.distillation.teacher=/tmp/vitg14_smoke   # CPU; a configs/vitg14.py:smoke run
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.distillation_recipe("vit_large", ffn_layer="mlp")
    config.distillation.students = {"vits14": {"arch": "vit_small"},
                                    "vitb14": {"arch": "vit_base"},
                                    "vitl14": {"arch": "vit_large"}}
    if arg == "smoke":
        config = configs.smoke(config)
        config.distillation.students = {"vits14": {"embed_dim": 32},
                                        "vitb14": {"embed_dim": 48},
                                        "vitl14": {"embed_dim": 64, "num_heads": 4}}
    return config
