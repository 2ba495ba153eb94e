"""Random params for tiny test models, drawn without compiling `init` (quick on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np


def random_params(model):
    """Fresh random params of `model`'s shapes: norm scales and LayerScale near 1, everything
    else N(0, 0.1^2)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.img_size, model.img_size, 3)))["params"]

    def draw(path, leaf):
        centre = 1.0 if path[-1].key in ("scale", "gamma") else 0.0
        return (centre + 0.1 * np.random.randn(*leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
