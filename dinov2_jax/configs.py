"""Config helpers: the reference's defaults, recipe loading with string args, validation.

A recipe is a file `configs/NAME.py` whose `get_config(arg)` returns an ml_collections
ConfigDict; `--config=configs/vitl14.py:smoke` passes "smoke". `default_config()` holds the
reference's `ssl_default_config.yaml` (spec §6) plus this project's run settings, and
`validate(config, device_count)` fails at start-up with a message that names the bad key.
"""
import importlib.util
import json
import math
import os

import ml_collections

ARCH_NAMES = ("vit_small", "vit_base", "vit_large", "vit_giant2")


class ConfigError(ValueError):
    """A setting, flag or input named by the user is wrong; CLIs print it as one line."""


def default_config():
    """The reference defaults (ViT-L/16, 100 epochs, centering) and run settings."""
    c = ml_collections.ConfigDict()
    c.student = dict(
        arch="vit_large", embed_dim=0, depth=0, num_heads=0, patch_size=16, ffn_layer="mlp", layerscale=1e-5, drop_path_rate=0.3,
        drop_path_uniform=True, num_register_tokens=0, interpolate_offset=0.1,
        interpolate_antialias=False, pretrained_weights="", dtype="bfloat16",
        remat_policy="none", attention="auto", pack_crops=False)
    c.dino = dict(loss_weight=1.0, head_n_prototypes=65536, head_bottleneck_dim=256,
                  head_hidden_dim=2048, head_nlayers=3, koleo_loss_weight=0.1)
    c.ibot = dict(loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=(0.1, 0.5),
                  separate_head=False, head_n_prototypes=65536, head_bottleneck_dim=256,
                  head_hidden_dim=2048, head_nlayers=3)
    c.train = dict(
        batch_size=2048, dataset="tfds:imagenet2012:train", centering="centering",
        epoch_length=1250, seed=0, num_workers=-1, max_bad_fraction=0.01,
        bad_fraction_min_records=1000,
        log_every=20, checkpoint_every=3750, keep_checkpoints=3, total_steps=-1,
        mask_groups=0)  # iBOT mask groups per host; 0: one per local device (the reference's per GPU)
    c.teacher = dict(momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04,
                     teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    c.optim = dict(epochs=100, warmup_epochs=10, base_lr=0.004, min_lr=1e-6, weight_decay=0.04,
                   weight_decay_end=0.4, layerwise_decay=0.9, patch_embed_lr_mult=0.2,
                   clip_grad=3.0, freeze_last_layer_epochs=1, adamw_beta1=0.9, adamw_beta2=0.999,
                   scaling_rule="sqrt_wrt_1024")
    c.crops = dict(global_crops_scale=(0.32, 1.0), local_crops_number=8,
                   local_crops_scale=(0.05, 0.32), global_crops_size=224, local_crops_size=96,
                   paper_blur_probs=False,
                   color_jitter=(0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
                   grayscale_prob=0.2)
    c.evaluation = dict(knn_train="", knn_val="", every=12500, at_start=False, knn_resize=256,
                        batch_size=256)
    c.mesh = dict(data=-1, fsdp=1, rules=[(".*", "fsdp")], min_shard_size=2**14)
    c.peak_flops = 0.0  # per device, FLOP/s; 0 = look the device up in dinov2_jax.flops
    return c


def smoke(config):
    """Shrinks any recipe to run a few steps on CPU: same code paths, tiny sizes."""
    config.student.update(embed_dim=48, depth=2, num_heads=2, patch_size=14, dtype="float32")
    config.dino.update(head_n_prototypes=256, head_bottleneck_dim=32, head_hidden_dim=64)
    config.ibot.update(head_n_prototypes=256, head_bottleneck_dim=32, head_hidden_dim=64)
    config.crops.update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    config.train.update(batch_size=4, dataset="demo:train", epoch_length=3, log_every=1,
                        checkpoint_every=3, num_workers=0)
    config.optim.update(epochs=2, warmup_epochs=1)
    config.teacher.warmup_teacher_temp_epochs = 1
    config.evaluation.update(knn_train="", knn_val="")
    return config


def load(path_with_arg):
    """`path.py[:arg]` -> the recipe's get_config(arg)."""
    path, _, arg = path_with_arg.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("dinov2_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def from_json(text):
    """A config saved with `to_json()`, merged onto today's defaults (keys added since are
    filled in, JSON lists turned back into tuples where the default is a tuple)."""
    config = default_config()

    def merge(node, saved):
        for key, value in saved.items():
            if isinstance(value, dict) and key in node and isinstance(node[key],
                                                                      ml_collections.ConfigDict):
                merge(node[key], value)
            elif key in node and isinstance(node[key], tuple) and isinstance(value, list):
                node[key] = tuple(value)
            else:
                node[key] = value

    merge(config, json.loads(text))
    return config


def total_steps(config):
    return (config.train.total_steps if config.train.total_steps > 0
            else config.optim.epochs * config.train.epoch_length)


def _fail(key, message):
    raise ConfigError(f"config error at {key}: {message}")


def _flat_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def validate(config, device_count, process_count=1):
    """Checks the config before anything is built; raises ValueError naming the key."""
    unknown = sorted(_flat_keys(config) - _flat_keys(default_config()))
    if unknown:
        _fail(unknown[0], "unknown key (not in dinov2_jax.configs.default_config)")
    s, crops, train, optim = config.student, config.crops, config.train, config.optim
    if s.arch not in ARCH_NAMES:
        _fail("student.arch", f"{s.arch!r} is not one of {ARCH_NAMES}")
    for key in ("global_crops_size", "local_crops_size"):
        if crops[key] % s.patch_size:
            _fail(f"crops.{key}", f"{crops[key]} is not a multiple of student.patch_size="
                  f"{s.patch_size}")
    if s.ffn_layer not in ("mlp", "swiglu"):
        _fail("student.ffn_layer", f"{s.ffn_layer!r} is not 'mlp' or 'swiglu'")
    if s.dtype not in ("float32", "bfloat16"):
        _fail("student.dtype", f"{s.dtype!r} is not 'float32' or 'bfloat16'")
    if not isinstance(s.pack_crops, bool):
        _fail("student.pack_crops", f"{s.pack_crops!r} is not a bool")
    if not 0 <= s.drop_path_rate < 1:
        _fail("student.drop_path_rate", f"{s.drop_path_rate} is not in [0, 1)")
    if train.centering not in ("centering", "sinkhorn_knopp"):
        _fail("train.centering", f"{train.centering!r} is not 'centering' or 'sinkhorn_knopp'")
    if train.batch_size % device_count:
        _fail("train.batch_size", f"global batch {train.batch_size} is not divisible by the "
              f"{device_count} devices")
    groups = (train.mask_groups * process_count if train.mask_groups else device_count)
    if config.dino.koleo_loss_weight > 0 and train.batch_size // groups < 2:
        _fail("train.batch_size", f"{train.batch_size} images in {groups} mask groups: KoLeo "
              "needs at least 2 images per group (fewer train.mask_groups or a larger batch)")
    if optim.warmup_epochs > optim.epochs:
        _fail("optim.warmup_epochs", f"{optim.warmup_epochs} warmup epochs exceed "
              f"optim.epochs={optim.epochs}")
    if config.teacher.warmup_teacher_temp_epochs > optim.epochs:
        _fail("teacher.warmup_teacher_temp_epochs", "the teacher temperature warmup is longer "
              f"than optim.epochs={optim.epochs}")
    if optim.freeze_last_layer_epochs > optim.epochs:
        _fail("optim.freeze_last_layer_epochs", f"exceeds optim.epochs={optim.epochs}")
    if total_steps(config) <= 0:
        _fail("optim.epochs", "the run has no steps")
    low, high = config.ibot.mask_ratio_min_max
    if not 0 <= low <= high <= 1:
        _fail("ibot.mask_ratio_min_max", f"({low}, {high}) is not an interval in [0, 1]")
    jitter = tuple(crops.color_jitter)
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        _fail("crops.color_jitter", f"{jitter} is not (brightness, contrast, saturation, hue) "
              "with all >= 0 and hue <= 0.5")
    if not 0 <= crops.grayscale_prob <= 1:
        _fail("crops.grayscale_prob", "must be a probability")
    if not 0 <= config.ibot.mask_sample_probability <= 1:
        _fail("ibot.mask_sample_probability", "must be a probability")
    mesh_sizes = [config.mesh.data, config.mesh.fsdp]
    if mesh_sizes.count(-1) > 1 or any(n == 0 or n < -1 for n in mesh_sizes):
        _fail("mesh", f"sizes {mesh_sizes}: use positive sizes and at most one -1")
    fixed = math.prod(n for n in mesh_sizes if n > 0)
    if device_count % fixed or (-1 not in mesh_sizes and fixed != device_count):
        _fail("mesh", f"data={config.mesh.data} x fsdp={config.mesh.fsdp} does not fit "
              f"{device_count} devices")
    return config
