"""vit_small with patch 14 on the vitl14 recipe (mlp FFN, vitl14 heads, Sinkhorn-Knopp).

The reference trained no such model from scratch (its S/B models are distilled from ViT-g);
this is the recipe its speed was measured with (README, Benchmarks).

    python -m dinov2_jax.main --config=configs/vits14.py --workdir=/path/to/run
    python -m dinov2_jax.main --config=configs/vits14.py:smoke --workdir=/tmp/run  # CPU
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.large_scale_recipe("vit_small")
    config.student.ffn_layer = "mlp"
    return configs.smoke(config) if arg == "smoke" else config
