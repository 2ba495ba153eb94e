"""Distillation: a frozen teacher trains one or several students, the whole step in one jit.

The DINOv2 paper's distillation (dinov2's MODEL_CARD.md: "the standard DINOv2 pretraining
procedure, except the teacher is a pretrained ViT-g, frozen"): the DINO + iBOT + KoLeo losses
of `train/step.py` (its `_teacher_targets` and `_student_loss`, shared, not copied) against the
frozen teacher of `train/teacher.py`, with
- no masking of the student's input and iBOT on every patch of the two global crops (the
  masked-patch buffer becomes all 2 x N patches of each image, weight 1/N: the mean over them);
- no stochastic depth in the student (`configs.validate` requires student.drop_path_rate 0);
- the teacher's softmax centers (train.centering "centering") starting from the teacher run's
  and updated as in training; Sinkhorn-Knopp needs none;
- a spare EMA of each student, `student_ema`, on the momentum schedule of `config.teacher`
  (which a frozen teacher no longer uses): the final model, evaluated and exported.
The teacher temperature follows `config.teacher` as in training (the recipes hold it at its
final value: a trained teacher needs no warm-up).

A backbone-only teacher (hub/timm/HF weights: no heads, see `train/teacher.py`) is distilled
by its features instead: the student's cls tokens (every crop) and global-crop patch tokens,
through a linear `feature_head` to the teacher's width, are pulled to the teacher's cls tokens
of the two global crops (a global crop to its own view, a local crop to both) and to its patch
tokens of the same view by cosine distance, `feature_cls_loss + feature_patch_loss`; nothing
else of the step changes.

Several students (`distillation.students`, DINOv3's `dinov3/train/multidist_meta_arch.py`):
one teacher forward per step feeds every student's loss, gradient, AdamW update and EMA, in
the same jitted step on one mesh; each student has its own optimizer (its param groups) and
its metrics prefixed `NAME/`. State layouts: one student {step, student, opt_state,
student_ema, centers}; several {step, centers, students: {NAME: {student, opt_state,
student_ema}}}. The frozen teacher is an argument of the step, not part of the state: a resume
reads it again from `distillation.teacher` (point that at `checkpoints/<step>` to pin a step of
a teacher run that is still going).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dinov2_jax import configs, flops, parallel
from dinov2_jax.models import heads
from dinov2_jax.train import optim, schedules as schedules_lib
from dinov2_jax.train import state as state_lib
from dinov2_jax.train import step as step_lib
from dinov2_jax.train import teacher as teacher_lib

SLOT_KEYS = ("student", "opt_state", "student_ema")


@dataclasses.dataclass(frozen=True)
class Student:
    """One student: its run config (config.student with its entry's keys), networks, optimizer."""
    config: Any
    networks: state_lib.Networks
    optimizer: Any
    feature_head: Any = None  # a heads.FeatureHead for a backbone-only teacher

    def init(self, rng):
        """Fresh params: {backbone, dino_head[, ibot_head]}, or {backbone, feature_head}."""
        if self.feature_head is None:
            return state_lib.init_student(self.networks, self.config, rng)
        size = self.config.crops.global_crops_size
        keys = jax.random.split(rng)
        backbone = self.networks.backbone
        features = jnp.zeros((1, backbone.embed_dim))
        return {"backbone": backbone.init(keys[0], jnp.zeros((1, size, size, 3)))["params"],
                "feature_head": self.feature_head.init(keys[1], features, features)["params"]}


def all_patches_buffer(crops, batch_size, patches, groups):
    """The masked-patch buffer (indices, weights) of G groups holding every patch of the
    `crops` global crops, weight 1/N per patch: iBOT over all patches, no masking."""
    per_group = crops * (batch_size // groups) * patches
    indices = jnp.broadcast_to(jnp.arange(per_group, dtype=jnp.int32), (groups, per_group))
    return indices, jnp.full((groups, per_group), 1.0 / patches, jnp.float32)


def unmasked_batch(batch, patch_size):
    """A data batch as the distillation step reads it: crops, no masks, all-patch buffer."""
    crops, batch_size, height = batch["global_crops"].shape[:3]
    indices, weights = all_patches_buffer(crops, batch_size, (height // patch_size) ** 2,
                                          batch["mask_indices"].shape[0])
    return {"global_crops": batch["global_crops"], "local_crops": batch["local_crops"],
            "masks": None, "mask_indices": indices, "masks_weight": weights}


def _cosine_distance(a, b):
    a, b = heads.l2_normalize(a.astype(jnp.float32)), heads.l2_normalize(b.astype(jnp.float32))
    return 1.0 - jnp.sum(a * b, axis=-1)


def _teacher_features(teacher, params, batch):
    """The backbone-only teacher's (cls (2, B, D), patches (2, B, N, D)) of the global crops."""
    global_crops = batch["global_crops"]
    out = teacher.networks.backbone.apply({"params": params["backbone"]},
                                          step_lib._flatten_crops(global_crops))
    crops = global_crops.shape[0]
    return jax.lax.stop_gradient((step_lib._unflatten_crops(out["x_norm_clstoken"], crops),
                                  step_lib._unflatten_crops(out["x_norm_patchtokens"], crops)))


def _feature_loss(student, params, batch, teacher_features, rng):
    """Cosine feature distillation: cls of each crop, patches of each global crop."""
    teacher_cls, teacher_patches = teacher_features
    global_crops, local_crops = batch["global_crops"], batch["local_crops"]
    global_out, local_out = student.networks.backbone.apply(
        {"params": params["backbone"]}, [step_lib._flatten_crops(global_crops),
                                         step_lib._flatten_crops(local_crops)],
        train=True, rngs={"dropout": rng})
    unflatten = step_lib._unflatten_crops
    cls = jnp.concatenate([unflatten(global_out["x_norm_clstoken"], global_crops.shape[0]),
                           unflatten(local_out["x_norm_clstoken"], local_crops.shape[0])])
    cls, patches = student.feature_head.apply(
        {"params": params["feature_head"]}, cls,
        unflatten(global_out["x_norm_patchtokens"], global_crops.shape[0]))
    n_global = global_crops.shape[0]
    cls_loss = jnp.concatenate([
        _cosine_distance(cls[:n_global], teacher_cls).reshape(-1),
        _cosine_distance(cls[n_global:, None], teacher_cls[None]).reshape(-1)]).mean()
    patch_loss = jnp.mean(_cosine_distance(patches, teacher_patches))
    logged = {"feature_cls_loss": cls_loss, "feature_patch_loss": patch_loss,
              "total_loss": cls_loss + patch_loss}
    return cls_loss + patch_loss, logged


def _slots(state, names):
    if not names:
        return {"": {key: state[key] for key in SLOT_KEYS}}
    return state["students"]


def _prefix(name):
    return f"{name}/" if name else ""


def make_distill_step(teacher, students, config, schedules):
    """step(state, teacher_params, batch) -> (state, metrics), pure; `students` is
    {name: Student} ({"": Student} for a single one)."""
    base_rng = jax.random.PRNGKey(config.train.seed)
    names = tuple(name for name in students if name)

    def train_step(state, teacher_params, batch):
        step = state["step"]
        teacher_temp, momentum = schedules.teacher_temp(step), schedules.momentum(step)
        batch = unmasked_batch(batch, config.student.patch_size)
        rng = jax.random.fold_in(base_rng, step)
        metrics = {"teacher_temp": teacher_temp, "momentum": momentum}
        loss_weights = {"dino_local": schedules.dino_local_weight(step)}
        if teacher.has_heads:
            targets, centers, _ = step_lib._teacher_targets(
                teacher.networks, config, teacher_params, state["centers"], batch, teacher_temp)
            metrics.update(step_lib.teacher_statistics(targets, batch["masks_weight"]))
        else:
            features, centers = _teacher_features(teacher, teacher_params, batch), {}
        slots = {}
        for name, slot in _slots(state, names).items():
            student = students[name]
            loss_fn = (functools.partial(step_lib._student_loss, student.networks,
                                         student.config, batch=batch, targets=targets, rng=rng,
                                         weights=loss_weights, mesh=None)
                       if teacher.has_heads else
                       functools.partial(_feature_loss, student, batch=batch,
                                         teacher_features=features, rng=rng))
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, logged), grads = grad_fn(slot["student"])
            updates, opt_state = student.optimizer.update(grads, slot["opt_state"],
                                                          slot["student"])
            params = optax.apply_updates(slot["student"], updates)
            slots[name] = {"student": params, "opt_state": opt_state,
                           "student_ema": state_lib.ema_update(slot["student_ema"], params,
                                                               momentum)}
            metrics.update({_prefix(name) + key: value for key, value in {
                **logged, "loss": loss,
                **{f"grad_norm/{module}": optax.global_norm(g) for module, g in grads.items()},
                **opt_state.hyperparams}.items()})
        new_state = {"step": step + 1, "centers": centers}
        new_state.update(slots[""] if not names else {"students": slots})
        return new_state, metrics

    return train_step


class DistillSetup:
    """A distillation run's pieces, with the interface of `setup.Setup` that the loop, the
    benchmarks and the tests use; `teacher_state` is the frozen teacher, read once."""

    def __init__(self, config, mesh, teacher):
        self.config, self.mesh, self.teacher = config, mesh, teacher
        self.schedules = schedules_lib.make_schedules(config)
        self.names = configs.student_names(config)
        singles = ({name: configs.distillation_student(config, name) for name in self.names}
                   or {"": config})
        rng = jax.random.PRNGKey(config.train.seed)
        self.students = {}
        feature_head = None if teacher.has_heads else heads.FeatureHead(
            teacher.networks.backbone.embed_dim, dtype=jnp.dtype(config.student.dtype))
        for name, student_config in singles.items():
            student = Student(student_config, state_lib.build_networks(student_config), None,
                              feature_head)
            optimizer = optim.make_optimizer(student_config, jax.eval_shape(student.init, rng),
                                             self.schedules)
            self.students[name] = dataclasses.replace(student, optimizer=optimizer)
        abstract = jax.eval_shape(self.init_state, rng)
        self.state_shardings = parallel.state_shardings(abstract, mesh, config.mesh)
        self.abstract_state = jax.tree.map(
            lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), abstract,
            self.state_shardings)
        self.teacher_shardings, _ = teacher.shardings(mesh, config.mesh)
        self.abstract_teacher = jax.tree.map(
            lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
            teacher.abstract_params, self.teacher_shardings)
        self._teacher_state = None

    def init_state(self, rng):
        """Step 0: fresh students, each EMA equal to its student, zero centers."""
        slots = {}
        for name, student in self.students.items():
            params = student.init(rng)
            slots[name] = {"student": params, "opt_state": student.optimizer.init(params),
                           "student_ema": jax.tree.map(jnp.copy, params)}
        centers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               self.teacher.abstract_centers)
        state = {"step": jnp.zeros((), jnp.int32), "centers": centers}
        state.update(slots[""] if not self.names else {"students": slots})
        return state

    @property
    def teacher_state(self):
        """(params, centers) of the frozen teacher, in their shards (read on first use)."""
        if self._teacher_state is None:
            self._teacher_state = self.teacher.load(self.mesh, self.config.mesh)
        return self._teacher_state

    @functools.cached_property
    def _jitted_init(self):
        def init(rng, centers):
            return {**self.init_state(rng), "centers": centers}
        return jax.jit(init, out_shardings=self.state_shardings)

    def create_state(self):
        """The step-0 state, born in its shards, with (a copy of) the teacher run's centers."""
        return self._jitted_init(jax.random.PRNGKey(self.config.train.seed),
                                 self.teacher_state[1])

    def train_step(self, batch_shardings):
        """step(state, batch) with the frozen teacher bound; donates the state."""
        step = jax.jit(make_distill_step(self.teacher, self.students, self.config,
                                         self.schedules),
                       in_shardings=(self.state_shardings, self.teacher_shardings,
                                     batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)
        params = self.teacher_state[0]
        return lambda state, batch: step(state, params, batch)

    def step_flops(self, masked_rows=None):
        """Model FLOPs of one step: the teacher counted once, every student (the iBOT buffer
        is every global-crop patch, whatever the data's masks)."""
        return sum(self.flops_by_network().values())

    def flops_by_network(self):
        """{"teacher": forward FLOPs, "student"/NAME: forward + backward FLOPs} per step."""
        batch, crops = self.config.train.batch_size, self.config.crops
        patch_rows = 2 * batch * (crops.global_crops_size // self.config.student.patch_size) ** 2
        teacher = self.teacher.networks
        if self.teacher.has_heads:
            out = {"teacher": flops.teacher_forward_flops(teacher, crops, batch, patch_rows)}
        else:
            out = {"teacher": 2 * batch * flops.backbone_flops(teacher.backbone,
                                                               crops.global_crops_size)}
        for name, student in self.students.items():
            if self.teacher.has_heads:
                forward = flops.student_forward_flops(student.networks, crops, batch, patch_rows)
            else:
                rows = (2 + crops.local_crops_number) * batch + patch_rows
                forward = (2 * batch * flops.backbone_flops(student.networks.backbone,
                                                            crops.global_crops_size)
                           + crops.local_crops_number * batch * flops.backbone_flops(
                               student.networks.backbone, crops.local_crops_size)
                           + rows * 2 * student.networks.backbone.embed_dim
                           * teacher.backbone.embed_dim)
            out[name or "student"] = 3 * forward
        return out

    def final_models(self, state):
        """{metric prefix: (model without drop path, EMA student backbone params)}."""
        return {_prefix(name): (self.students[name].networks.backbone.clone(drop_path_rate=0.0),
                                slot["student_ema"]["backbone"])
                for name, slot in _slots(state, self.names).items()}

    def memory_trees(self, state):
        """{name: tree} of what sits on the devices: the frozen teacher and each student's."""
        trees = {"teacher": self.abstract_teacher}
        for name, slot in _slots(state, self.names).items():
            trees.update({_prefix(name) + key: slot[key] for key in SLOT_KEYS})
        return trees

    def parameter_trees(self, state):
        return {f"student {name}".strip(): slot["student"]
                for name, slot in _slots(state, self.names).items()}


def build(config, mesh, teacher=None):
    """The DistillSetup of `config` on `mesh`; `teacher` defaults to distillation.teacher
    opened (metadata only: nothing is read until the step or the state needs it)."""
    return DistillSetup(config, mesh, teacher or teacher_lib.open_teacher(config))
