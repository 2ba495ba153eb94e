"""The networks of a run and its train state.

`build_networks(config)` makes the student/teacher backbone and heads (one set of modules: the
teacher is the same modules with other params and no drop path). The train state is a plain
dict pytree: `step`, `student` and `teacher` params ({backbone, dino_head[, ibot_head]}),
`opt_state`, and the fp32 `centers` ({dino, ibot}) of softmax centering; with DINOv3's Gram
anchoring (`gram.use_loss`, unless `gram.ema_teacher`) also `gram_teacher`, a third backbone
(no heads) that the step copies from the EMA teacher or that comes from `gram.ckpt`. Randomness
is derived from `config.train.seed` and the step, so the state carries no RNG.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dinov2_jax.models import heads, vit


class Networks(NamedTuple):
    backbone: nn.Module
    dino_head: nn.Module
    ibot_head: nn.Module | None  # None: iBOT uses dino_head (ibot.separate_head False)

    def patch_head(self):
        return self.ibot_head or self.dino_head


def build_networks(config):
    """Backbone and heads from config.student / config.dino / config.ibot.

    student.embed_dim / depth / num_heads, when non-zero, override the arch's sizes.
    """
    backbone = vit.backbone_from_config(config)
    dtype = backbone.dtype

    def head(section):
        return heads.DINOHead(out_dim=section.head_n_prototypes, hidden_dim=section.head_hidden_dim,
                              bottleneck_dim=section.head_bottleneck_dim,
                              nlayers=section.head_nlayers, dtype=dtype)

    return Networks(backbone, head(config.dino), head(config.ibot) if config.ibot.separate_head
                    else None)


def init_student(networks, config, rng):
    """Fresh student params {backbone, dino_head[, ibot_head]} at the reference's init."""
    size = config.crops.global_crops_size
    keys = jax.random.split(rng, 3)
    backbone = networks.backbone.init(keys[0], jnp.zeros((1, size, size, 3)))["params"]
    features = jnp.zeros((1, networks.backbone.embed_dim))
    params = {"backbone": backbone,
              "dino_head": networks.dino_head.init(keys[1], features)["params"]}
    if networks.ibot_head is not None:
        params["ibot_head"] = networks.ibot_head.init(keys[2], features)["params"]
    return params


def has_gram_teacher(config):
    """Whether the state holds a Gram teacher: only when the Gram loss is on and the Gram
    teacher is not the EMA teacher itself (no memory cost otherwise)."""
    return config.gram.use_loss and not config.gram.ema_teacher


def create_train_state(networks, config, optimizer, rng, student=None, gram_teacher=None):
    """Step 0: teacher == student, optimizer state, zero centers; the Gram teacher is
    `gram_teacher` (from gram.ckpt) or, until the step copies the EMA teacher into it, the
    step-0 teacher's backbone."""
    if student is None:
        student = init_student(networks, config, rng)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "student": student,
        "teacher": jax.tree.map(jnp.copy, student),
        "opt_state": optimizer.init(student),
        "centers": {"dino": jnp.zeros((config.dino.head_n_prototypes,), jnp.float32),
                    "ibot": jnp.zeros((networks.patch_head().out_dim,), jnp.float32)},
    }
    if has_gram_teacher(config):
        state["gram_teacher"] = jax.tree.map(
            jnp.copy, student["backbone"] if gram_teacher is None else gram_teacher)
    return state


def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, over all params."""
    return optax.incremental_update(student, teacher, step_size=1.0 - momentum)


def hold_backbone(teacher, previous, frozen):
    """`teacher` with its backbone left at `previous` while `frozen`: EMA momentum 1, exactly
    (the EMA of equal student and teacher values can still move them by rounding)."""
    backbone = jax.tree.map(lambda new, old: jnp.where(frozen, old, new), teacher["backbone"],
                            previous["backbone"])
    return {**teacher, "backbone": backbone}
