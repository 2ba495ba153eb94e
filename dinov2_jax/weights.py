"""Backbone weights on disk: read and write every form this project exchanges.

  load(path, arch=None, network="teacher") -> (model, params) from
      - a dinov2_jax weights directory: `model.json` (the backbone's constructor arguments)
        and `params/` (an orbax checkpoint), as `save` writes it;
      - a training workdir, its `checkpoints` directory or one `checkpoints/<step>`: the
        teacher's or student's backbone, the model rebuilt from the run's saved config;
      - a PyTorch file (.pth / .safetensors) in the official hub, timm, Hugging Face or
        training-checkpoint layout (`arch`, e.g. vitl14 or vit_large, names its size).
  save(directory, model, params)        writes a weights directory.
  export(model, params, output, fmt)    writes a hub or timm file (.pth / .safetensors) or a
                                        Hugging Face directory (model.safetensors, config.json).

Paths are `etils.epath` paths, so gs:// works like a local path. The key layouts are
`dinov2_jax.models.torch_layouts` (DINOv2) and `dinov2_jax.models.dinov3_layouts` (RoPE models,
e.g. arch dinov3_vits16). A wrong path, arch or layout raises ConfigError.
"""
import io
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors import numpy as safetensors_numpy

from dinov2_jax import configs
from dinov2_jax.configs import ConfigError
from dinov2_jax.models import dinov3_layouts, torch_layouts, vit

# The constructor arguments a weights directory records in model.json.
MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio",
                "ffn_layer", "layerscale", "num_register_tokens", "interpolate_offset",
                "interpolate_antialias",
                # DINOv3 options (defaults: DINOv2); files written before them lack them
                "pos_embed", "rope_base", "rope_min_period", "rope_max_period", "rope_normalize",
                "rope_shift", "rope_jitter", "rope_rescale", "rope_periods_dtype", "qkv_bias",
                "mask_k_bias", "layernorm_eps", "swiglu_unpacked", "ffn_align",
                "untie_local_cls_norm")
NETWORKS = ("teacher", "student")  # of a DINOv2 run
ALL_NETWORKS = NETWORKS + ("student_ema",)  # a distillation run: student_ema and student
EXPORT_FORMATS = ("hub", "timm", "hf")


def _absolute(path):
    """An epath.Path that orbax accepts: local paths made absolute, URLs (gs://) as they are."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def layouts(model):
    """The state-dict layout module of `model`: DINOv3's for RoPE models, else DINOv2's."""
    return dinov3_layouts if model.pos_embed == "rope" else torch_layouts


def model_kwargs(model):
    """The model.json entries of `model`."""
    return {name: getattr(model, name) for name in MODEL_FIELDS}


def read_torch_file(path):
    """A state dict from `.pth` (needs torch) or `.safetensors` (numpy only), as numpy."""
    path = epath.Path(path)
    if path.name.endswith(".safetensors"):
        return safetensors_numpy.load(path.read_bytes())
    import torch  # Optional dependency (the `torch` extra): only .pth files need it.
    with path.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)

    def to_numpy(value):
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        return value.float().numpy() if hasattr(value, "numpy") else value

    return to_numpy(state)


def write_torch_file(state_dict, path):
    """Writes `.safetensors` with numpy, anything else with torch.save (fp32)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".safetensors"):
        path.write_bytes(safetensors_numpy.save(state_dict))
        return
    import torch  # Optional dependency (the `torch` extra): only .pth files need it.
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()},
               buffer)
    path.write_bytes(buffer.getvalue())


def save(directory, model, params):
    """Writes a dinov2_jax weights directory: model.json + params/ (orbax, atomic)."""
    directory = _absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    (directory / "model.json").write_text(json.dumps(model_kwargs(model), indent=1))


def _load_directory(directory):
    model = vit.DinoVisionTransformer(**json.loads((directory / "model.json").read_text()))
    checkpointer = ocp.StandardCheckpointer()
    params_dir = directory / "params"
    # A host-numpy target: restoring onto the saved sharding breaks on other topologies.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          checkpointer.metadata(params_dir).item_metadata.tree)
    return model, checkpointer.restore(params_dir, target)


def load_checkpoint(path, network=None, student=None):
    """(model, backbone params) of a network of a workdir or one of its steps.

    `path` is a workdir (newest step), its `checkpoints` dir, or a `checkpoints/<step>` dir,
    as `dinov2_jax.train.checkpoint` writes them (items `state` and `meta`; meta holds the
    run's config). `network` None is the run's final model: the EMA teacher of a DINOv2 run,
    the EMA student (`student_ema`) of a distillation run; `student` names one of several
    distilled students (`distillation.students`). Only that network's backbone is read. The
    model is returned without drop path, in fp32.
    """
    if network is not None and network not in ALL_NETWORKS:
        raise ConfigError(f"network must be one of {ALL_NETWORKS}, got {network!r}")
    path = _absolute(path)
    directory, step = path, None
    if (path / "checkpoints").is_dir():
        directory = path / "checkpoints"
    elif path.name.isdigit():
        directory, step = path.parent, int(path.name)
    manager = ocp.CheckpointManager(directory,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"{path} holds no dinov2_jax weights or checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    config = configs.from_json(meta["config"])
    config, network, tree_path = _network_of_run(config, network, student, path)
    model = vit.backbone_from_config(config).clone(dtype=np.float32, drop_path_rate=0.0)
    size = config.crops.global_crops_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3)))["params"]
    target = {network: {"backbone": shapes}}
    for key in reversed(tree_path):
        target = {key: target}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    for key in tree_path:
        restored = restored[key]
    return model, restored[network]["backbone"]


def _network_of_run(config, network, student, path):
    """(single-student config, network, path of its slot in the state) of a run's checkpoint."""
    distilled = bool(config.distillation.teacher)
    network = network or ("student_ema" if distilled else "teacher")
    if network == "teacher" and distilled:
        raise ConfigError(f"{path} is a distillation run: its frozen teacher is not in its "
                          f"checkpoints ({config.distillation.teacher}); its networks are "
                          "student_ema (the final model) and student")
    if network == "student_ema" and not distilled:
        raise ConfigError(f"{path} is a self-distillation run: it has no student_ema; its "
                          "networks are teacher (the final model) and student")
    names = configs.student_names(config)
    if not names:
        if student:
            raise ConfigError(f"{path} trains one student; --student {student!r} names none")
        return config, network, ()
    if student not in names:
        raise ConfigError(f"{path} trains the students {list(names)}: name one (--student)")
    return configs.distillation_student(config, student), network, ("students", student)


def load(path, arch=None, network=None, student=None, interpolation=None):
    """(model, params) from a weights dir, a training workdir/checkpoint, or a torch file.

    `arch` (a hub name like `vitl14` or a size like `vit_large`) is needed for torch files;
    `network` and `student` pick a network of a training checkpoint (`load_checkpoint`);
    `interpolation` ('hub', 'timm', 'hf') resizes the position table as that export target
    does (`vit.with_export_interpolation`) instead of as the model was trained.
    """
    model, params = _load(path, arch, network, student)
    if interpolation is not None:
        model = vit.with_export_interpolation(model, interpolation)
    return model, params


def _load(path, arch, network, student):
    path = epath.Path(path)
    if not path.exists():
        raise ConfigError(f"weights {path} do not exist")
    if (path / "model.json").exists():
        return _load_directory(_absolute(path))
    if path.is_dir():
        return load_checkpoint(path, network, student)
    if arch is None:
        raise ConfigError(f"an arch (e.g. vitl14, vit_large) is needed to read the torch "
                          f"checkpoint {path}")
    if arch not in vit.HUB_MODELS and arch not in vit.ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of "
                          f"{sorted(vit.ARCHS) + sorted(vit.HUB_MODELS)}")
    return from_state_dict(read_torch_file(path), vit.build_backbone(arch))


def from_state_dict(state_dict, model):
    """(model, params) from a torch state dict (numpy values) in any supported layout, read
    strictly as `model`; a DINOv3 file's RoPE periods set `rope_periods_dtype`."""
    layout = layouts(model)
    state = layout.canonicalize(state_dict, model)
    if layout is dinov3_layouts:
        model = dinov3_layouts.model_for_periods(model, state)
    return model, layout.hub_to_params(model, state)


def export(model, params, output, fmt):
    """Writes `params` as `fmt` ('hub', 'timm' or 'hf') to `output`."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    layout = layouts(model)
    state = layout.params_to_hub(model, params)
    if fmt == "hub":
        write_torch_file(state, output)
    elif fmt == "timm":
        write_torch_file(layout.hub_to_timm(state, model), output)
    else:
        output = epath.Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "model.safetensors").write_bytes(safetensors_numpy.save(
            layout.hub_to_hf(state, model), metadata={"format": "pt"}))
        (output / "config.json").write_text(json.dumps(layout.hf_config(model), indent=1))
