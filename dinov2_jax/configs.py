"""Config helpers: the one home of every default, recipe loading with string args, validation.

A recipe is a file `configs/NAME.py` whose `get_config(arg)` returns an ml_collections
ConfigDict; `--config=configs/vitl14.py:smoke` passes "smoke". `default_config()` holds the
reference's `dinov2/configs/ssl_default_config.yaml` plus this project's run settings, and is
the only place where a default is written down: data, model and loop read the validated config.
`validate(config, device_count)` fails at start-up with a `ConfigError` that names the bad key,
checking closed sets against the model's and the mesh's own tables and numeric ranges.
"""
import importlib.util
import json
import os

import ml_collections
from ml_collections import config_dict
from flax import traverse_util

from dinov2_jax import parallel, profiling
from dinov2_jax.errors import ConfigError
from dinov2_jax.models import attention, rope, vit

CENTERINGS = ("centering", "sinkhorn_knopp", "none")  # "none": an ablation that collapses
LOSS_FORMS = ("dinov2", "dinov3")  # dino.loss_form
SCHEDULE_VERSIONS = ("dinov2", "dinov3")  # schedules.version


def default_config():
    """The reference defaults (ViT-L/16, 100 epochs, centering) and run settings."""
    c = ml_collections.ConfigDict()
    c.student = dict(
        arch="vit_large", embed_dim=0, depth=0, num_heads=0, patch_size=16, ffn_layer="mlp", layerscale=1e-5, drop_path_rate=0.3,
        drop_path_uniform=True, num_register_tokens=0, interpolate_offset=0.1,
        interpolate_antialias=False, pretrained_weights="", dtype="bfloat16",
        remat_policy="none", attention="auto", pack_crops=False,
        # DINOv3 options (dinov3/models/vision_transformer.py), DINOv2 by default. RoPE
        # settings of 0.0 are unset (the reference's null): rope_rescale=2.0 is DINOv3's.
        pos_embed="learned", rope_base=100.0, rope_min_period=0.0, rope_max_period=0.0,
        rope_normalize="separate", rope_shift=0.0, rope_jitter=0.0, rope_rescale=0.0,
        qkv_bias=True, mask_k_bias=False, layernorm_eps=1e-6, swiglu_unpacked=False,
        ffn_align=8, untie_local_cls_norm=False, mlp_ratio=4.0)
    c.dino = dict(loss_weight=1.0, head_n_prototypes=65536, head_bottleneck_dim=256,
                  head_hidden_dim=2048, head_nlayers=3, koleo_loss_weight=0.1,
                  # DINOv3 objective options (dinov3/train/ssl_meta_arch.py), DINOv2 by
                  # default. loss_form "dinov3": the mean over crop pairs split by pair counts,
                  # same-view global pairs left out when global_ignore_diagonal. A schedule is
                  # () (off) or (start, peak, end, warmup_epochs, cosine_epochs), -1: to the end.
                  loss_form="dinov2", global_ignore_diagonal=True, local_loss_weight_schedule=(),
                  koleo_loss_distributed=False, koleo_topk=1,
                  koleo_distributed_loss_group_size=0)  # images; 0: the global batch
    c.ibot = dict(loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=(0.1, 0.5),
                  separate_head=False, head_n_prototypes=65536, head_bottleneck_dim=256,
                  head_hidden_dim=2048, head_nlayers=3)
    # DINOv3's Gram anchoring (dinov3/loss/gram_loss.py, dinov3/train/ssl_meta_arch.py): off.
    # The Gram teacher is the backbone of the workdir `ckpt`, or the EMA teacher's copied at
    # step it_load_ema_teacher; with rep_update it is refreshed from the EMA teacher after every
    # update_frequency-th step from it_first_update on, at most max_updates times (-1: no limit).
    # ema_teacher: the EMA teacher itself is the Gram teacher (no third network).
    c.gram = dict(use_loss=False, loss_weight=1.0, loss_weight_schedule=(), ema_teacher=False,
                  ckpt="", it_load_ema_teacher=-1, rep_update=True, update_frequency=50000,
                  it_first_update=0, max_updates=-1, normalized=True, img_level=False,
                  remove_neg=False, remove_only_teacher_neg=False,
                  global_teacher_resize_antialias=False)
    # DINOv3's schedules v2 (dinov3/train/cosine_lr_scheduler.py, train.py): version "dinov3"
    # builds lr / weight decay / momentum / teacher temperature from these blocks, each
    # (start, peak, end, warmup_epochs, cosine_epochs) as dino.local_loss_weight_schedule; lr
    # values are DINOv3's, scaled by 4 * sqrt(batch / 1024) (its sqrt_wrt_1024).
    c.schedules = dict(version="dinov2", lr=(), weight_decay=(), momentum=(), teacher_temp=())
    c.train = dict(
        batch_size=2048, dataset="tfds:imagenet2012:train", centering="centering",
        epoch_length=1250, seed=0, num_workers=-1, max_bad_fraction=0.01,
        bad_fraction_min_records=1000, skip_bad_shards=False,
        # Collapse: a head's teacher whose mean per-image entropy stays >= collapse_uniform
        # (uniform) or whose batch-mean entropy stays <= collapse_one_prototype (one
        # prototype), both as fractions of log K, for collapse_intervals log intervals in a
        # row (0: never) is reported; stop_on_collapse stops the run (exit 1).
        collapse_intervals=5, collapse_uniform=0.98, collapse_one_prototype=0.05,
        stop_on_collapse=False,
        log_every=20, checkpoint_every=3750, keep_checkpoints=3, total_steps=-1,
        # iBOT mask groups per host; 0: one per local device (the reference's per GPU)
        mask_groups=0,
        # Warm starts (dinov2_jax/train/warm_start.py): init_from, another run's workdir whose
        # newest checkpoint gives student, teacher and centers at step 0 (optimizer and
        # schedules fresh); freeze_backbone_steps, steps at the start during which only the
        # heads train (backbone lr 0, teacher backbone EMA momentum 1).
        init_from="", freeze_backbone_steps=0)
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
                   grayscale_prob=0.2, horizontal_flips=True,
                   # DINOv3's mixed-resolution batches: ((global_size, local_size, probability),
                   # ...), one drawn per batch from (train.seed, step); empty: every batch at
                   # global_crops_size / local_crops_size (which size the position table).
                   resolutions=(),
                   # DINOv3: the Gram teacher's crops (same boxes as the global crops) at this
                   # size, 0: it sees the global crops; without distortions: before colour
                   # jitter, blur and solarize.
                   gram_teacher_crops_size=0, gram_teacher_no_distortions=False)
    c.evaluation = dict(knn_train="", knn_val="", every=12500, at_start=False, knn_resize=256,
                        batch_size=256,
                        # Dense probes during training (each pair set together); the heads
                        # train on cached window features, dense_size 0: the global crop size.
                        segmentation_train="", segmentation_val="", depth_train="",
                        depth_val="", dense_size=0, dense_steps=1000, dense_head_batch_size=16,
                        dense_lr=1e-3, dense_warmup_steps=100)
    # Distillation (dinov2_jax/train/distill.py): a frozen teacher from a dinov2_jax workdir
    # (backbone and heads) or backbone weights (a weights dir, or a torch file with
    # teacher_arch); "" trains by self-distillation. `students` {name: {student key: value}}
    # trains several students (each config.student with those keys changed) in one run.
    c.distillation = dict(teacher="", teacher_arch="", students={})
    c.mesh = dict(data=-1, fsdp=1, rules=[(".*", "fsdp")], min_shard_size=2**14)
    c.peak_flops = 0.0  # per device, FLOP/s; 0 = look the device up in dinov2_jax.flops
    c.profile_steps = ""  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile
    return c


def large_scale_recipe(arch, batch_size=3072):
    """The reference's `vitl14` / `vitg14` settings (`dinov2/configs/train/vitl14.yaml`) on top
    of the defaults: SwiGLU, 131k prototypes, separate iBOT head, Sinkhorn-Knopp, 500 epochs on
    ImageNet-22k. The ViT-S/B recipes change only the arch (and the FFN) on top of it."""
    config = default_config()
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


def require_init_from(config):
    """Marks train.init_from as a required override (`--config.train.init_from=WORKDIR`):
    `validate` fails naming it while it is unset."""
    config.train.init_from = config_dict.placeholder(str)
    return config


def high_resolution_recipe(arch):
    """The DINOv2 paper's high-resolution phase (Sec. 4, App. B.2) after `large_scale_recipe`:
    10k iterations at 518 px from a pretrained run (`train.init_from`, required), the
    pretraining procedure with its schedules compressed to the phase and a lower lr; the
    recipes' docstrings give each value and its source."""
    config = large_scale_recipe(arch, batch_size=2048)
    require_init_from(config)
    config.train.epoch_length = 1000
    config.crops.update(global_crops_size=518, local_crops_size=224)
    config.teacher.update(warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    config.optim.update(epochs=10, warmup_epochs=1, base_lr=5e-5, freeze_last_layer_epochs=0)
    return config


def distillation_recipe(arch, ffn_layer="swiglu"):
    """A student `arch` distilled from a frozen ViT-g/14 (`configs/vitg14.py` run): the
    `large_scale_recipe` with the DINOv2 paper's distillation changes (no stochastic depth, no
    masking: train/distill.py) and the schedule ends of DINOv3's distillation
    (`dinov3/configs/train/dinov3_vitl16_lvd1689m_distilled.yaml`: lr to 5e-5, momentum 0.994
    -> 1.0, teacher temperature 0.07 from the start: a trained teacher needs no warm-up).
    `distillation.teacher` (the ViT-g workdir) is required."""
    config = large_scale_recipe(arch)
    config.student.update(ffn_layer=ffn_layer, drop_path_rate=0.0)
    config.teacher.update(warmup_teacher_temp=0.07, teacher_temp=0.07,
                          momentum_teacher=0.994, final_momentum_teacher=1.0)
    config.optim.min_lr = 5e-5
    config.distillation.teacher = ml_collections.config_dict.placeholder(str)
    return config


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


def student_names(config):
    """The distilled students' names in their fixed order; () for a single student."""
    return tuple(sorted(config.distillation.students))


def distillation_student(config, name):
    """`config` as the single-student run of student `name`: config.student with the entry's
    keys changed, distillation.students emptied."""
    single = ml_collections.ConfigDict(config.to_dict())
    single.student.update(config.distillation.students[name].to_dict())
    single.distillation.students = {}
    return single


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


def _flat(config):
    """{"a.b": value} of a ConfigDict or a plain nested dict."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return traverse_util.flatten_dict(tree, sep=".")


def _get(config, key):
    node = config
    for name in key.split("."):
        node = node[name]
    return node


def first_difference(saved, current, ignore=()):
    """The first dotted key whose value differs between two configs, skipping keys that start
    with one of `ignore`; None when they agree."""
    saved = _flat(json.loads(saved.to_json()))
    current = _flat(json.loads(current.to_json()))
    for key in sorted(set(saved) | set(current)):
        if not key.startswith(tuple(ignore)) and saved.get(key) != current.get(key):
            return key, saved.get(key), current.get(key)
    return None


def _positive(config, *keys):
    for key in keys:
        if not _get(config, key) > 0:
            _fail(key, f"{_get(config, key)} must be > 0")


def _non_negative(config, *keys):
    for key in keys:
        if not _get(config, key) >= 0:
            _fail(key, f"{_get(config, key)} must be >= 0")


def _in_unit_interval(config, *keys):
    for key in keys:
        if not 0 <= _get(config, key) <= 1:
            _fail(key, f"{_get(config, key)} is not in [0, 1]")


def _one_of(config, key, allowed):
    if _get(config, key) not in allowed:
        _fail(key, f"{_get(config, key)!r} is not one of {tuple(allowed)}")


def _interval(config, key, low=0.0, high=1.0):
    lo, hi = _get(config, key)
    if not low <= lo <= hi <= high:
        _fail(key, f"({lo}, {hi}) is not an ordered interval in [{low}, {high}]")


def _validate_dinov3_student(config):
    """The DINOv3 options of config.student."""
    s = config.student
    _one_of(config, "student.pos_embed", vit.POS_EMBEDS)
    _one_of(config, "student.rope_normalize", rope.NORMALIZE_MODES)
    for key in ("qkv_bias", "mask_k_bias", "swiglu_unpacked", "untie_local_cls_norm"):
        if not isinstance(s[key], bool):
            _fail(f"student.{key}", f"{s[key]!r} is not a bool")
    _positive(config, "student.layernorm_eps", "student.ffn_align", "student.mlp_ratio")
    _non_negative(config, "student.rope_shift", "student.rope_min_period",
                  "student.rope_max_period")
    for key in ("rope_jitter", "rope_rescale"):
        if s[key] and s[key] < 1:
            _fail(f"student.{key}", f"{s[key]}: a factor drawn in [1/x, x] needs x >= 1 "
                  "(0 turns it off)")
    if bool(s.rope_min_period) != bool(s.rope_max_period):
        _fail("student.rope_min_period", "set both rope_min_period and rope_max_period, or "
              "neither (then rope_base gives the periods)")
    if not s.rope_min_period and not s.rope_base > 0:
        _fail("student.rope_base", f"{s.rope_base} must be > 0")
    if s.swiglu_unpacked and s.ffn_layer != "swiglu":
        _fail("student.swiglu_unpacked", "needs student.ffn_layer='swiglu'")
    embed_dim = s.embed_dim or vit.ARCHS[s.arch]["embed_dim"]
    num_heads = s.num_heads or vit.ARCHS[s.arch]["num_heads"]
    if s.pos_embed == "rope" and (embed_dim // num_heads) % 4:
        _fail("student.pos_embed", f"RoPE needs a head dim divisible by 4, got "
              f"{embed_dim} / {num_heads} heads")


def _validate_stages(config):
    """train.init_from, train.freeze_backbone_steps and crops.resolutions."""
    train = config.train
    if train.init_from is None:
        _fail("train.init_from", "this recipe continues a trained run: pass "
              "--config.train.init_from=WORKDIR (a workdir with checkpoints)")
    if train.init_from and config.student.pretrained_weights:
        _fail("train.init_from", "set train.init_from (a whole run's state) or "
              "student.pretrained_weights (a backbone), not both")
    if not isinstance(train.freeze_backbone_steps, int) or not (
            0 <= train.freeze_backbone_steps <= total_steps(config)):
        _fail("train.freeze_backbone_steps", f"{train.freeze_backbone_steps!r} is not a step "
              f"count in [0, {total_steps(config)}]")
    resolutions = config.crops.resolutions
    if not resolutions:
        return
    patch = config.student.patch_size
    for entry in resolutions:
        if len(entry) != 3 or any(not isinstance(size, int) or size <= 0 or size % patch
                                  for size in entry[:2]) or not entry[2] > 0:
            _fail("crops.resolutions", f"{tuple(entry)} is not (global_size, local_size, "
                  f"probability) with sizes positive multiples of student.patch_size={patch} "
                  "and a probability > 0")
    total = sum(entry[2] for entry in resolutions)
    if abs(total - 1) > 1e-6:  # decimal probabilities such as 0.3 + 0.3 + 0.4 sum to 1 +- ulps
        _fail("crops.resolutions", f"the probabilities sum to {total}, not 1")


def _schedule_block(config, key, allow_empty=True):
    """A DINOv3 schedule block: () or (start, peak, end, warmup_epochs, cosine_epochs)."""
    block = tuple(_get(config, key))
    if not block and allow_empty:
        return
    if len(block) != 5 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                              for v in block):
        _fail(key, f"{block} is not (start, peak, end, warmup_epochs, cosine_epochs)"
              + (" or ()" if allow_empty else ""))
    warmup, cosine = block[3], block[4]
    if warmup < 0 or (cosine >= 0 and warmup + cosine > config.optim.epochs):
        _fail(key, f"warmup_epochs={warmup} and cosine_epochs={cosine} must be >= 0 (cosine "
              f"-1: to the end) and fit in optim.epochs={config.optim.epochs}")


def _validate_dinov3_objective(config, device_count):
    """The DINOv3 options of config.dino, config.gram, config.schedules and the Gram crops."""
    dino, gram, crops = config.dino, config.gram, config.crops
    _one_of(config, "dino.loss_form", LOSS_FORMS)
    _one_of(config, "schedules.version", SCHEDULE_VERSIONS)
    for key in ("dino.global_ignore_diagonal", "dino.koleo_loss_distributed", "gram.use_loss",
                "gram.ema_teacher", "gram.rep_update", "gram.normalized", "gram.img_level",
                "gram.remove_neg", "gram.remove_only_teacher_neg",
                "gram.global_teacher_resize_antialias", "crops.horizontal_flips",
                "crops.gram_teacher_no_distortions"):
        if not isinstance(_get(config, key), bool):
            _fail(key, f"{_get(config, key)!r} is not a bool")
    _schedule_block(config, "dino.local_loss_weight_schedule")
    _schedule_block(config, "gram.loss_weight_schedule")
    for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
        if config.schedules.version == "dinov3":
            _schedule_block(config, f"schedules.{name}", allow_empty=False)
        elif tuple(config.schedules[name]):
            _fail(f"schedules.{name}", "is set but schedules.version is 'dinov2' (the optim "
                  "and teacher keys give the schedules); set schedules.version='dinov3'")
    if config.schedules.version == "dinov3":
        lr, wd, momentum, temp = (tuple(config.schedules[n]) for n in
                                  ("lr", "weight_decay", "momentum", "teacher_temp"))
        if min(lr[:3] + wd[:3]) < 0:
            _fail("schedules.lr", "lr and weight decay values must be >= 0")
        if not all(0 <= v <= 1 for v in momentum[:3]):
            _fail("schedules.momentum", f"{momentum[:3]} are not in [0, 1]")
        if not min(temp[:3]) > 0:
            _fail("schedules.teacher_temp", f"{temp[:3]} must be > 0")
    _positive(config, "dino.koleo_topk", "gram.update_frequency")
    _non_negative(config, "dino.koleo_distributed_loss_group_size", "gram.loss_weight",
                  "gram.it_first_update", "crops.gram_teacher_crops_size")
    if dino.koleo_loss_distributed:
        batch, group = config.train.batch_size, dino.koleo_distributed_loss_group_size or None
        local = batch // device_count
        if group and (group % local or batch % group):
            _fail("dino.koleo_distributed_loss_group_size", f"{group} images must be a multiple "
                  f"of the per-device batch {local} and divide the global batch {batch}")
        if dino.koleo_topk >= (group or batch):
            _fail("dino.koleo_topk", f"{dino.koleo_topk} neighbours need groups of more "
                  f"images, got {group or batch}")
    if crops.gram_teacher_crops_size % config.student.patch_size:
        _fail("crops.gram_teacher_crops_size", f"{crops.gram_teacher_crops_size} is not a "
              f"multiple of student.patch_size={config.student.patch_size}")
    if not gram.use_loss:
        if crops.gram_teacher_crops_size:
            _fail("crops.gram_teacher_crops_size", "is set but gram.use_loss is False")
        return
    if gram.remove_neg and gram.remove_only_teacher_neg:
        _fail("gram.remove_neg", "set at most one of remove_neg and remove_only_teacher_neg")
    if gram.ema_teacher:
        if gram.ckpt or gram.it_load_ema_teacher >= 0:
            _fail("gram.ema_teacher", "the EMA teacher is the Gram teacher: leave gram.ckpt "
                  "empty and gram.it_load_ema_teacher at -1")
        if crops.gram_teacher_crops_size:
            _fail("crops.gram_teacher_crops_size", "must be 0 with gram.ema_teacher (the EMA "
                  "teacher sees the global crops)")
    elif not gram.ckpt and gram.it_load_ema_teacher < 0:
        _fail("gram.ckpt", "the Gram teacher needs a checkpoint (gram.ckpt, a dinov2_jax "
              "workdir) or gram.it_load_ema_teacher >= 0 (copy the EMA teacher at that step)")
    elif gram.ckpt and gram.it_load_ema_teacher >= 0:
        _fail("gram.it_load_ema_teacher", "set gram.ckpt or gram.it_load_ema_teacher, not both")
    if gram.max_updates < -1:
        _fail("gram.max_updates", f"{gram.max_updates} must be >= 0, or -1 for no limit")
    if crops.gram_teacher_crops_size and crops.gram_teacher_crops_size < crops.global_crops_size:
        _fail("crops.gram_teacher_crops_size", f"{crops.gram_teacher_crops_size} is smaller "
              f"than crops.global_crops_size={crops.global_crops_size}")


def validate(config, device_count, process_count=1):
    """Checks the config before anything is built; raises ConfigError naming the key."""
    unknown = sorted(key for key in set(_flat(config)) - set(_flat(default_config()))
                     if not key.startswith("distillation.students."))
    if unknown:
        _fail(unknown[0], "unknown key (not in dinov2_jax.configs.default_config)")
    s, crops, train, optim = config.student, config.crops, config.train, config.optim
    _one_of(config, "student.arch", vit.ARCHS)
    _one_of(config, "student.ffn_layer", vit.FFN_LAYERS)
    _one_of(config, "student.dtype", vit.DTYPES)
    _one_of(config, "student.remat_policy", vit.REMAT_POLICIES)
    _one_of(config, "student.attention", attention.BACKENDS)
    _validate_dinov3_student(config)
    _validate_dinov3_objective(config, device_count)
    _one_of(config, "train.centering", CENTERINGS)
    for key in ("student.pack_crops", "student.drop_path_uniform", "ibot.separate_head",
                "crops.paper_blur_probs", "student.interpolate_antialias",
                "evaluation.at_start", "train.skip_bad_shards", "train.stop_on_collapse"):
        if not isinstance(_get(config, key), bool):
            _fail(key, f"{_get(config, key)!r} is not a bool")
    if not s.drop_path_uniform:
        _fail("student.drop_path_uniform", "False is not supported: scanned blocks share one "
              "static drop-path subset size")
    if config.evaluation.dense_size % s.patch_size:
        _fail("evaluation.dense_size", f"{config.evaluation.dense_size} is not a multiple of "
              f"student.patch_size={s.patch_size}")
    for key in ("global_crops_size", "local_crops_size"):
        if crops[key] <= 0 or crops[key] % s.patch_size:
            _fail(f"crops.{key}", f"{crops[key]} is not a positive multiple of "
                  f"student.patch_size={s.patch_size}")
    _positive(config, "student.patch_size", "optim.base_lr", "optim.epochs",
              "train.batch_size", "train.epoch_length", "train.log_every",
              "train.checkpoint_every", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
              "optim.clip_grad", "dino.head_n_prototypes", "ibot.head_n_prototypes",
              "evaluation.batch_size", "evaluation.dense_steps",
              "evaluation.dense_head_batch_size", "evaluation.dense_lr")
    _non_negative(config, "optim.min_lr", "optim.weight_decay", "optim.weight_decay_end",
                  "optim.warmup_epochs", "optim.freeze_last_layer_epochs",
                  "teacher.warmup_teacher_temp_epochs", "dino.loss_weight",
                  "dino.koleo_loss_weight", "ibot.loss_weight", "crops.local_crops_number",
                  "student.layerscale", "train.mask_groups", "evaluation.every",
                  "train.collapse_intervals", "evaluation.dense_size",
                  "evaluation.dense_warmup_steps")
    _in_unit_interval(config, "teacher.momentum_teacher", "teacher.final_momentum_teacher",
                      "optim.layerwise_decay", "optim.adamw_beta1", "optim.adamw_beta2",
                      "crops.grayscale_prob", "ibot.mask_sample_probability",
                      "train.max_bad_fraction", "train.collapse_uniform",
                      "train.collapse_one_prototype")
    if not 0 <= s.drop_path_rate < 1:
        _fail("student.drop_path_rate", f"{s.drop_path_rate} is not in [0, 1)")
    _interval(config, "ibot.mask_ratio_min_max")
    _interval(config, "crops.global_crops_scale")
    _interval(config, "crops.local_crops_scale")
    if train.batch_size % device_count:
        _fail("train.batch_size", f"global batch {train.batch_size} is not divisible by the "
              f"{device_count} devices")
    groups = (train.mask_groups * process_count if train.mask_groups else device_count)
    if config.dino.koleo_loss_weight > 0 and train.batch_size // groups < 2:
        _fail("train.batch_size", f"{train.batch_size} images in {groups} mask groups: KoLeo "
              "needs at least 2 images per group (fewer train.mask_groups or a larger batch)")
    for key in ("optim.warmup_epochs", "teacher.warmup_teacher_temp_epochs",
                "optim.freeze_last_layer_epochs"):
        if _get(config, key) > optim.epochs:
            _fail(key, f"{_get(config, key)} epochs exceed optim.epochs={optim.epochs}")
    if total_steps(config) <= 0:
        _fail("optim.epochs", "the run has no steps")
    jitter = tuple(crops.color_jitter)
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        _fail("crops.color_jitter", f"{jitter} is not (brightness, contrast, saturation, hue) "
              "with all >= 0 and hue <= 0.5")
    try:
        parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, device_count)
    except ValueError as error:
        _fail("mesh", str(error))
    _validate_stages(config)
    try:
        profiling.parse_steps(config.profile_steps)
    except ConfigError as error:
        _fail("profile_steps", str(error).removeprefix("profile_steps: "))
    _validate_distillation(config, device_count, process_count)
    return config


def _validate_distillation(config, device_count, process_count):
    """distillation.*: the teacher source's form, the students' keys and settings. The teacher
    itself (readable, its arch and heads) is checked when `train/teacher.py` opens it."""
    d = config.distillation
    if d.teacher is None:
        _fail("distillation.teacher", "this recipe distils from a frozen teacher: set "
              "--config.distillation.teacher=WORKDIR (a dinov2_jax run of the teacher)")
    for key in ("teacher", "teacher_arch"):
        if not isinstance(d[key], str):
            _fail(f"distillation.{key}", f"{d[key]!r} is not a string")
    if d.teacher_arch and d.teacher_arch not in vit.HUB_MODELS and d.teacher_arch not in vit.ARCHS:
        _fail("distillation.teacher_arch", f"{d.teacher_arch!r} is not one of "
              f"{sorted(vit.HUB_MODELS) + sorted(vit.ARCHS)}")
    if not d.teacher:
        if d.students:
            _fail("distillation.students", "students need a teacher: set distillation.teacher")
        return
    for key in ("gram.use_loss", "dino.koleo_loss_distributed", "train.freeze_backbone_steps",
                "train.init_from"):
        if _get(config, key):
            _fail(key, "is not an option of distillation runs (train/distill.py): turn it off")
    if config.student.drop_path_rate:
        _fail("student.drop_path_rate", f"{config.student.drop_path_rate}: a distilled student "
              "trains without stochastic depth (the DINOv2 paper's distillation); set 0.0")
    for name in student_names(config):
        entry = d.students[name]
        if not name.isidentifier():
            _fail(f"distillation.students.{name}", "a student name is a Python identifier "
                  "(it prefixes metrics and names the student's checkpoint subtree)")
        if not isinstance(entry, ml_collections.ConfigDict):
            _fail(f"distillation.students.{name}", f"{entry!r} is not a dict of student keys")
        for key in sorted(entry):
            if key not in config.student:
                _fail(f"distillation.students.{name}.{key}", "not a key of config.student")
        try:
            validate(distillation_student(config, name), device_count, process_count)
        except ConfigError as error:
            raise ConfigError(str(error).replace(
                "config error at student.", f"config error at distillation.students.{name}.",
                1)) from None
