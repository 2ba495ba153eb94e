"""The frozen teacher of a distillation run (`distillation.teacher`): what is read and how.

The teacher is a dinov2_jax training workdir (or its `checkpoints` dir, or one
`checkpoints/<step>`): its newest committed checkpoint gives the run's **EMA teacher**,
backbone and heads (`state/teacher`: backbone, dino_head[, ibot_head]), and its softmax
centers (`state/centers`, where distillation starts its own running centers); its saved config
gives the networks. The student, the optimizer state and the data position are never read,
and the source is opened read-only. A teacher is frozen: no gradient, no EMA.

Backbone weights (a dinov2_jax weights dir, or a hub / timm / Hugging Face torch file with
`distillation.teacher_arch`) carry no DINO/iBOT heads: the released ViT-g has none. Such a
teacher is distilled by its features: the student's cls and patch tokens, through a linear
`feature_head`, match the teacher's by cosine (`train/distill.py`). That was chosen over first
training heads on the frozen backbone because it needs no extra run or schedule and no heads
whose quality would bound the student, and it uses everything the released weights hold.

Start-up errors (ConfigError naming `distillation.teacher`): a missing or unreadable source,
`distillation.teacher_arch` not matching the checkpoint (the first differing parameter and both
shapes), a patch size or prototype count that differs from the student's.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dinov2_jax import configs, parallel, weights
from dinov2_jax.errors import ConfigError
from dinov2_jax.models import vit
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its run's config, networks and param shapes; `load` reads it."""
    source: str
    state_dir: Any  # epath.Path of the checkpoint's `state` item
    step: int
    config: Any  # the teacher run's config
    networks: state_lib.Networks
    abstract_params: Any  # {backbone, dino_head[, ibot_head]} ShapeDtypeStructs
    abstract_centers: Any
    host_params: Any = None  # backbone-only teachers: the params, read at open

    @property
    def has_heads(self):
        return self.networks.dino_head is not None

    def shardings(self, mesh, mesh_config):
        """NamedShardings of (params, centers) by the run's FSDP rules."""
        tree = {"teacher": self.abstract_params, "centers": self.abstract_centers}
        shardings = parallel.state_shardings(tree, mesh, mesh_config)
        return shardings["teacher"], shardings["centers"]

    def load(self, mesh, mesh_config):
        """(params, centers) read straight into their shards on `mesh`."""
        params_sharding, centers_sharding = self.shardings(mesh, mesh_config)
        if self.host_params is not None:
            return jax.device_put(self.host_params, params_sharding), {}
        target = {"teacher": _with_shardings(self.abstract_params, params_sharding),
                  "centers": _with_shardings(self.abstract_centers, centers_sharding)}
        restored = ocp.PyTreeCheckpointer().restore(self.state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
        return restored["teacher"], restored["centers"]


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                        abstract, shardings)


def _fail(message):
    raise ConfigError(f"config error at distillation.teacher: {message}")


def _newest_step(source):
    """(checkpoints directory, step) of a workdir, its checkpoints dir or one step dir."""
    path = epath.Path(source)
    path = path if path.is_absolute() or "://" in source else path.absolute()
    if not path.exists():
        _fail(f"{source} does not exist")
    if path.is_file() or (path / "model.json").exists():
        return None, None
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit():
        return path.parent, int(path.name)
    return path, None


def from_config(teacher_config, student_config):
    """Networks and shapes of a teacher made with `teacher_config` (no checkpoint read: the
    memory benchmark's paper teacher); compute dtype and attention from the student's run."""
    teacher_config = ml_collections.ConfigDict(teacher_config.to_dict())
    teacher_config.student.update(dtype=student_config.student.dtype, drop_path_rate=0.0,
                                  attention=student_config.student.attention)
    networks = state_lib.build_networks(teacher_config)
    abstract = jax.eval_shape(lambda rng: state_lib.init_student(networks, teacher_config, rng),
                              jax.random.PRNGKey(0))
    centers = {"dino": jax.ShapeDtypeStruct((networks.dino_head.out_dim,), np.float32),
               "ibot": jax.ShapeDtypeStruct((networks.patch_head().out_dim,), np.float32)}
    return teacher_config, networks, abstract, centers


def paper_teacher(teacher_config, student_config):
    """A Teacher with the shapes of a `teacher_config` run and no checkpoint behind it (for
    memory and FLOP counts on paper; `load` has nothing to read)."""
    teacher_config, networks, abstract, centers = from_config(teacher_config, student_config)
    return Teacher("(on paper)", None, 0, teacher_config, networks, abstract, centers)


def open_teacher(config):
    """The Teacher of `config.distillation`, checked against the student; reads metadata only."""
    source = config.distillation.teacher
    directory, step = _newest_step(source)
    if directory is None:
        return _backbone_teacher(config, source)
    try:
        manager = ocp.CheckpointManager(directory,
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step() if step is None else step
        if step is None:
            _fail(f"{source} holds no committed dinov2_jax checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        manager.close()
        saved = ocp.StandardCheckpointHandler().metadata(directory / str(step) / "state").tree
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any unreadable source is the same user error
        _fail(f"cannot read the checkpoint in {source} ({type(error).__name__}: "
              f"{str(error)[:300]})")
    teacher_run = configs.from_json(meta["config"])
    if teacher_run.distillation.teacher:
        _fail(f"{source} is a distillation run (its teacher is frozen, not in its checkpoints); "
              "distil from its student by exporting it, or from its own teacher's workdir")
    teacher_config, networks, abstract, centers = from_config(teacher_run, config)
    saved_shapes = {name: _shapes(saved["teacher"][name]) for name in abstract
                    if name in saved.get("teacher", {})}
    difference = checkpoint_lib.first_difference(_shapes(abstract), saved_shapes)
    if difference:
        _fail(f"the checkpoint at step {step} in {source} does not fit its own config: "
              f"{difference}")
    _check_arch(config, source, teacher_run, saved["teacher"]["backbone"])
    _check_against_student(config, teacher_run, networks)
    return Teacher(source, directory / str(step) / "state", step, teacher_config, networks,
                   abstract, centers)


def _backbone_teacher(config, source):
    """A teacher of backbone weights only (feature distillation), params read now."""
    try:
        model, params = weights.load(source, config.distillation.teacher_arch or None)
    except ConfigError as error:
        _fail(f"{source}: {error}".replace("an arch (e.g.", "distillation.teacher_arch (e.g."))
    if model.patch_size != config.student.patch_size:
        _fail(f"the teacher's patch size {model.patch_size} differs from "
              f"student.patch_size={config.student.patch_size}: the patch features are paired")
    backbone = model.clone(dtype=jnp.dtype(config.student.dtype), drop_path_rate=0.0,
                           attention_backend=config.student.attention)
    params = {"backbone": params}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), params)
    return Teacher(source, None, 0, None, state_lib.Networks(backbone, None, None), abstract,
                   {}, host_params=jax.tree.map(lambda x: np.asarray(x, np.float32), params))


def _shapes(tree):
    return jax.tree.map(lambda leaf: f"{tuple(leaf.shape)}", tree)


def _check_arch(config, source, teacher_run, saved_backbone):
    """distillation.teacher_arch, when set, must be the checkpoint's backbone."""
    arch = config.distillation.teacher_arch
    if not arch:
        return
    kwargs = dict(vit.HUB_MODELS.get(arch, {"arch": arch}))
    kwargs.update(img_size=teacher_run.crops.global_crops_size,
                  patch_size=teacher_run.student.patch_size)
    expected = jax.eval_shape(vit.build_backbone(**kwargs).init, jax.random.PRNGKey(0),
                              np.zeros((1, kwargs["img_size"], kwargs["img_size"], 3)))["params"]
    difference = checkpoint_lib.first_difference(_shapes(expected), _shapes(saved_backbone))
    if difference:
        _fail(f"distillation.teacher_arch={arch} does not match {source}: "
              f"{difference.replace('this run has', f'{arch} has')}")


def _check_against_student(config, teacher_run, networks):
    """Patch-level targets need the student's patch grid; the heads' prototypes must agree."""
    if teacher_run.student.patch_size != config.student.patch_size:
        _fail(f"the teacher's patch size {teacher_run.student.patch_size} differs from "
              f"student.patch_size={config.student.patch_size}: iBOT pairs their patch tokens")
    for key, teacher_k in (("dino.head_n_prototypes", networks.dino_head.out_dim),
                           ("ibot.head_n_prototypes", networks.patch_head().out_dim)):
        section, name = key.split(".")
        student_k = (config[section][name] if section == "dino" or config.ibot.separate_head
                     else config.dino.head_n_prototypes)
        if teacher_k != student_k:
            _fail(f"the teacher's {key} is {teacher_k}, this run's {student_k}: the student's "
                  f"heads must have the teacher's prototypes (set {key}={teacher_k})")
