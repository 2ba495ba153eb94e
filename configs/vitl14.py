"""The reference's `vitl14` recipe: ViT-L/14 SwiGLU, 131k prototypes, separate iBOT head,
Sinkhorn-Knopp, 500 epochs on ImageNet-22k, global batch 3072 (96 GPUs x 32 in the reference).

    python -m dinov2_jax.main --config=configs/vitl14.py --workdir=gs://bucket/run \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.main --config=configs/vitl14.py:smoke --workdir=/tmp/run  # CPU
"""
from dinov2_jax import configs


def recipe(arch, batch_size=3072):
    """The vitl14/vitg14 settings of spec §6 on top of the defaults."""
    config = configs.default_config()
    config.student.update(arch=arch, patch_size=14, ffn_layer="swiglu", drop_path_rate=0.4)
    config.dino.update(head_n_prototypes=131072, head_bottleneck_dim=384)
    config.ibot.update(separate_head=True, head_n_prototypes=131072)
    config.train.update(batch_size=batch_size, centering="sinkhorn_knopp",
                        dataset="arrayrecord:/data/imagenet22k/*.array_record")
    config.teacher.momentum_teacher = 0.994
    config.optim.update(epochs=500, warmup_epochs=80, base_lr=2e-4, weight_decay_end=0.2,
                        layerwise_decay=1.0)
    config.crops.local_crops_size = 98
    return config


def get_config(arg=None):
    config = recipe("vit_large")
    return configs.smoke(config) if arg == "smoke" else config
