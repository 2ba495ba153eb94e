"""vit_base with patch 14 on the vitl14 recipe (mlp FFN, vitl14 heads, Sinkhorn-Knopp).

The reference trained no such model from scratch (its S/B models are distilled from ViT-g);
this is the recipe its speed was measured with (DESIGN.md, Performance).

    python -m dinov2_jax.main --config=configs/vitb14.py --workdir=/path/to/run
    python -m dinov2_jax.main --config=configs/vitb14.py:smoke --workdir=/tmp/run  # CPU
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vitl14  # noqa: E402

from dinov2_jax import configs  # noqa: E402


def get_config(arg=None):
    config = vitl14.recipe("vit_base")
    config.student.ffn_layer = "mlp"
    return configs.smoke(config) if arg == "smoke" else config
