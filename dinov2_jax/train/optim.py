"""The DINOv2 optimizer (docs/reference.md, Optimizer; the reference's `dinov2/train/` and
`dinov2/utils/param_groups.py`): per-module gradient clipping, then AdamW with the reference's
parameter groups (layer-wise lr decay, patch-embed lr multiplier, no weight decay
on biases/norms/LayerScale, a separate schedule for the heads' last layer).

`param_groups` derives each leaf's multipliers from its name in the student param tree
{"backbone", "dino_head", ["ibot_head"]}. `make_optimizer` builds the optax transformation;
its state counts the steps and holds the lr/wd of the latest update (`logged_hyperparams`).
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODULES = ("backbone", "dino_head", "ibot_head", "feature_head")  # feature_head: distill.py
EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
ADAM_EPS = 1e-8


class ParamGroups(NamedTuple):
    """Trees with the params' structure.

    lr_mult: float32 arrays broadcastable to the leaf: shape () or, for leaves of the stacked
      blocks, (L, 1, ..., 1) holding one multiplier per layer.
    wd_mult: 0.0 or 1.0 per leaf. is_last_layer: bool per leaf (uses the last-layer lr schedule).
    """
    lr_mult: Any
    wd_mult: Any
    is_last_layer: Any


def _leaf_name(path):
    if not all(isinstance(k, jax.tree_util.DictKey) for k in path):
        raise ValueError(f"params must be nested dicts (unboxed), got path {path}")
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _backbone_depth(params):
    depths = {leaf.shape[0] for leaf in jax.tree.leaves(params["backbone"].get("blocks", {}))}
    if len(depths) != 1:
        raise ValueError(f"backbone.blocks leaves must share one leading depth axis, got {depths}")
    return depths.pop()


def _lr_multiplier(name, shape, depth, layerwise_decay, patch_embed_lr_mult):
    """layerwise_decay ** (depth + 1 - layer_id), times patch_embed_lr_mult for patch_embed."""
    module, top = name.split(".")[:2]
    if module != "backbone":
        return np.float32(1.0)
    if top in EMBEDDINGS:
        layer_id = np.array(0)
    elif top == "blocks":
        layer_id = np.arange(1, depth + 1).reshape((depth,) + (1,) * (len(shape) - 1))
    else:
        layer_id = np.array(depth + 1)
    mult = np.float64(layerwise_decay) ** (depth + 1 - layer_id)
    if "patch_embed" in name:
        mult = mult * patch_embed_lr_mult
    return mult.astype(np.float32)


def param_groups(params, *, layerwise_decay, patch_embed_lr_mult):
    """The reference's per-parameter (lr_multiplier, wd_multiplier, is_last_layer), per leaf.

    params: {"backbone": ..., "dino_head": ..., ["ibot_head": ...]} of arrays or
    jax.ShapeDtypeStruct. Backbone layer_id: 0 for the embeddings and tokens, i + 1 for block i,
    depth + 1 otherwise; heads get multiplier 1. wd_mult is 0 for names ending in '.bias' or
    containing 'norm' or 'gamma'.
    """
    unknown = set(params) - set(MODULES)
    if unknown:
        raise ValueError(f"unexpected top-level param modules {sorted(unknown)}; "
                         f"expected some of {MODULES}")
    depth = _backbone_depth(params)

    def lr_mult(path, leaf):
        return _lr_multiplier(_leaf_name(path), leaf.shape, depth, layerwise_decay,
                              patch_embed_lr_mult)

    def wd_mult(path, _):
        name = _leaf_name(path)
        return 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0

    return ParamGroups(
        lr_mult=jax.tree_util.tree_map_with_path(lr_mult, params),
        wd_mult=jax.tree_util.tree_map_with_path(wd_mult, params),
        is_last_layer=jax.tree_util.tree_map_with_path(
            lambda path, _: "last_layer" in _leaf_name(path), params),
    )


def clip_by_global_norm_per_module(max_norm, modules):
    """clip_by_global_norm applied separately to each top-level sub-tree (student module)."""
    return optax.multi_transform({m: optax.clip_by_global_norm(max_norm) for m in modules},
                                 {m: m for m in modules})


def _adamw_chain(lr, last_layer_lr, weight_decay, *, groups, b1, b2, clip_grad):
    """update = -lr_leaf * (adam + weight_decay * wd_mult * param), after per-module clipping."""
    step_sizes = jax.tree.map(lambda m, last: -m * (last_layer_lr if last else lr),
                              groups.lr_mult, groups.is_last_layer)
    clip = (clip_by_global_norm_per_module(clip_grad, tuple(groups.lr_mult)) if clip_grad
            else optax.identity())
    return optax.chain(
        clip,
        optax.scale_by_adam(b1=b1, b2=b2, eps=ADAM_EPS),
        optax.add_decayed_weights(weight_decay, mask=jax.tree.map(bool, groups.wd_mult)),
        optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, step_sizes)),
    )


def dinov2_adamw(lr, last_layer_lr, weight_decay, *, groups, b1=0.9, b2=0.999, clip_grad=3.0):
    """The optimizer; lr, last_layer_lr and weight_decay are schedules (step -> value) or floats.

    The schedules are evaluated at the state's step count (`opt_state.count`, the number of
    updates already applied), so they advance with the optimizer. clip_grad 0/None disables
    clipping, as in the reference.
    """
    chain = functools.partial(_adamw_chain, groups=groups, b1=b1, b2=b2, clip_grad=clip_grad)
    return optax.inject_hyperparams(chain, static_args=("groups", "b1", "b2", "clip_grad"))(
        lr=lr, last_layer_lr=last_layer_lr, weight_decay=weight_decay)


def make_optimizer(config, params, schedules):
    """dinov2_adamw from config.optim, the student params (or their shapes) and make_schedules."""
    optim = config.optim
    groups = param_groups(params, layerwise_decay=optim.layerwise_decay,
                          patch_embed_lr_mult=optim.patch_embed_lr_mult)
    return dinov2_adamw(schedules.lr, schedules.last_layer_lr, schedules.weight_decay,
                        groups=groups, b1=optim.adamw_beta1, b2=optim.adamw_beta2,
                        clip_grad=optim.clip_grad)


def logged_hyperparams(opt_state):
    """{'lr', 'last_layer_lr', 'weight_decay'} used by the latest update (at init: step 0's)."""
    return dict(opt_state.hyperparams)
