"""DINOv3's objective options in the one train step (`dinov3/train/ssl_meta_arch.py`,
`dinov3/train/train.py`): the Gram loss and its teacher (copy, refresh, checkpoint, 2x crops),
the DINO loss form with same-view pairs, the local-crop weight schedule, schedules v2, and
distributed KoLeo on 8 fake CPU devices. Each test checks that the step uses the option: its
loss equals the option's formula on the step's own logged terms, or a direct computation.
"""
import json
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import configs, losses
from dinov2_jax.data import augment, masking
from dinov2_jax.train import schedules as schedules_lib
from dinov2_jax.train import setup as setup_lib
from dinov2_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 throughout; the loss recombined from its logged terms differs from the step's own sum
# only by the order of a few fp32 additions of O(10) values (~1e-6 relative).
RTOL = 1e-5


def tiny_config(**gram):
    """A 2-block ViT on 16 px global / 8 px local crops (patch 4: 16 and 4 patches), batch 4."""
    config = configs.default_config()
    config.student.update(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4,
                          layerscale=0.5, drop_path_rate=0.0, dtype="float32", attention="xla",
                          pos_embed="rope", num_register_tokens=2)
    config.dino.update(head_n_prototypes=64, head_bottleneck_dim=16, head_hidden_dim=40)
    config.ibot.update(head_n_prototypes=64, head_bottleneck_dim=16, head_hidden_dim=40)
    config.crops.update(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    config.train.update(batch_size=4, epoch_length=2, dataset="demo:train")
    config.optim.update(epochs=5, warmup_epochs=1, freeze_last_layer_epochs=1)
    config.teacher.warmup_teacher_temp_epochs = 1
    if gram:
        config.gram.update(use_loss=True, **gram)
    return config


def random_batch(config, seed, gram_size=0, groups=1):
    """Random crops and masks, laid out as the pipeline's batch with `groups` mask groups."""
    rng = np.random.RandomState(seed)
    crops, b = config.crops, config.train.batch_size
    grid = crops.global_crops_size // config.student.patch_size
    group = b // groups
    generator = masking.make_mask_generator(crops.global_crops_size, config.student.patch_size)
    upperbound = masking.mask_upperbound(2 * group, grid * grid, config.ibot.mask_ratio_min_max,
                                         1.0)
    masks = np.zeros((2, b, grid * grid), bool)
    indices = np.zeros((groups, upperbound), np.int32)
    weights = np.zeros((groups, upperbound), np.float32)
    for g in range(groups):
        group_masks = masking.sample_masks(2 * group, grid * grid, config.ibot.mask_ratio_min_max,
                                           1.0, generator, random.Random(seed + g))
        masks[:, g * group:(g + 1) * group] = group_masks.reshape(2, group, -1)
        indices[g], weights[g] = masking.padded_mask_indices(group_masks, upperbound)
    g, l = crops.global_crops_size, crops.local_crops_size
    batch = {"global_crops": np.float32(rng.randn(2, b, g, g, 3)),
             "local_crops": np.float32(rng.randn(crops.local_crops_number, b, l, l, 3)),
             "masks": masks, "mask_indices": indices, "masks_weight": weights}
    if gram_size:
        batch["gram_teacher_crops"] = np.float32(rng.randn(2, b, gram_size, gram_size, 3))
    return batch


def build(config):
    configs.validate(config, 1)
    setup = setup_lib.build(config, jax.make_mesh((1, 1), ("data", "fsdp")))
    step = jax.jit(step_lib.make_train_step(setup.networks, config, setup.optimizer,
                                            setup.schedules),
                   compiler_options={"xla_backend_optimization_level": 0})
    return setup, step, setup.init_state(jax.random.PRNGKey(np.random.randint(2**31)))


def rest_of_loss(metrics):
    """KoLeo and iBOT as the step adds them (logged: weight * koleo / 2, ibot / 2)."""
    return 2 * metrics["koleo_loss"] + 2 * metrics["ibot_loss"]


# ------------------------------------------------------------------ Gram loss


@pytest.mark.parametrize("gram_size", [0, 32])
def test_gram_loss_in_the_step_equals_a_direct_computation(gram_size):
    """The step's gram_loss is losses.gram_loss of the student's masked global-crop patch tokens
    against the Gram teacher's (on 2x crops: resized to the student's grid, no antialias),
    and the optimised loss adds weight * gram_loss (and, in the DINOv2 loss form, weights the
    local-crop DINO term by dino.local_loss_weight_schedule)."""
    config = tiny_config(it_load_ema_teacher=0, loss_weight=1.7, img_level=gram_size == 0)
    config.crops.gram_teacher_crops_size = gram_size
    config.dino.local_loss_weight_schedule = (0.5, 0.5, 0.5, 0, 0)  # DINOv2 form: local x 0.5
    setup, step, state = build(config)
    batch = random_batch(config, np.random.randint(2**31), gram_size)
    _, metrics = step(state, batch)
    model, flat = setup.networks.backbone, step_lib._flatten_crops
    student = model.apply({"params": state["student"]["backbone"]},
                          [flat(batch["global_crops"]), flat(batch["local_crops"])],
                          [flat(batch["masks"]), None], train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})[0]["x_norm_patchtokens"]
    crops = batch.get("gram_teacher_crops", batch["global_crops"])
    teacher = model.apply({"params": state["teacher"]["backbone"]},
                          flat(crops))["x_norm_patchtokens"]
    if gram_size:
        teacher = losses.resize_patch_tokens(teacher, (8, 8), (4, 4))
    # image-major rows of both; a matrix per image, or one over the batch (one mask group)
    expected = losses.gram_loss(student, teacher, img_level=config.gram.img_level)
    np.testing.assert_allclose(metrics["gram_loss"], expected, rtol=RTOL)
    assert metrics["gram_loss"] > 1e-4
    dino = 0.5 * metrics["dino_local_crops_loss"] + metrics["dino_global_crops_loss"]
    np.testing.assert_allclose(metrics["loss"], dino + rest_of_loss(metrics)
                               + 1.7 * metrics["gram_loss"], rtol=RTOL)


def _simulated_reference_updates(steps, first, freq, max_updates):
    """The iterations after which `dinov3/train/train.py` refreshes the Gram teacher."""
    done, updates = [], 0
    for it in range(steps):
        if (it + 1) >= first and (it + 1) % freq == 0 and (max_updates < 0
                                                            or updates < max_updates):
            done.append(it)
            updates += 1
    return done


@pytest.mark.parametrize("first, freq, max_updates", [
    (0, 3, -1), (0, 1, 2), (5, 4, 3), (7, 7, 1), (10, 3, 0), (1, 2, 5)])
def test_gram_refreshes_follow_the_reference_loop(first, freq, max_updates):
    gram = tiny_config().gram
    gram.update(it_first_update=first, update_frequency=freq, max_updates=max_updates)
    steps = jnp.arange(1, 41)
    due = jax.vmap(lambda s: step_lib.gram_refresh_due(s, gram))(steps)
    assert [int(s) - 1 for s in steps[due]] == _simulated_reference_updates(40, first, freq,
                                                                            max_updates)


def test_gram_teacher_is_copied_then_refreshed_inside_the_step():
    """gram.it_load_ema_teacher=1: the EMA teacher before step 1 becomes the Gram teacher;
    refreshes after steps 1 and 3 (every 2 from step 2), then max_updates=2 freezes it. The
    Gram term is off before the copy. The state keeps its shapes all along."""
    config = tiny_config(it_load_ema_teacher=1, rep_update=True, update_frequency=2,
                         it_first_update=2, max_updates=2)
    setup, step, state = build(config)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    teachers, grams, metrics = [state["teacher"]["backbone"]], [], []
    for i in range(7):
        state, m = step(state, random_batch(config, i))
        teachers.append(state["teacher"]["backbone"])
        grams.append(state["gram_teacher"])
        metrics.append(m)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    same = lambda a, b: all(np.array_equal(x, y) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # grams[i]: after step i. teachers[i]: before step i.
    assert same(grams[0], teachers[0])  # the step-0 copy, not used before step 1
    assert same(grams[1], teachers[2]) and same(grams[2], teachers[2])  # refreshed after step 1
    assert same(grams[3], teachers[4])  # after step 3 (the 2nd and last refresh)
    assert all(same(g, teachers[4]) for g in grams[4:]) and not same(teachers[4], teachers[7])
    assert metrics[0]["gram_loss"] == 0 and metrics[0]["gram_loss_weight"] == 0
    assert all(m["gram_loss"] > 0 for m in metrics[1:])


def test_the_gram_teacher_is_in_the_state_only_when_needed():
    def keys(config):
        return set(setup_lib.build(config, jax.make_mesh((1, 1), ("data", "fsdp")))
                   .abstract_state)
    base = {"step", "student", "teacher", "opt_state", "centers"}
    assert keys(tiny_config()) == base
    assert keys(tiny_config(ema_teacher=True)) == base
    assert keys(tiny_config(it_load_ema_teacher=3)) == base | {"gram_teacher"}


@pytest.mark.parametrize("changes, key", [
    ({"gram.use_loss": True}, "gram.ckpt"),
    ({"gram.use_loss": True, "gram.ckpt": "/w", "gram.it_load_ema_teacher": 2},
     "gram.it_load_ema_teacher"),
    ({"gram.use_loss": True, "gram.ema_teacher": True, "gram.ckpt": "/w"}, "gram.ema_teacher"),
    ({"gram.use_loss": True, "gram.it_load_ema_teacher": 0, "gram.remove_neg": True,
      "gram.remove_only_teacher_neg": True}, "gram.remove_neg"),
    ({"crops.gram_teacher_crops_size": 32}, "crops.gram_teacher_crops_size"),
    ({"gram.use_loss": True, "gram.it_load_ema_teacher": 0,
      "crops.gram_teacher_crops_size": 18}, "crops.gram_teacher_crops_size"),
    ({"gram.loss_weight_schedule": (0, 1, 2)}, "gram.loss_weight_schedule"),
    ({"dino.local_loss_weight_schedule": (1, 1, 0.5, 4, 3)}, "dino.local_loss_weight_schedule"),
    ({"schedules.version": "dinov3"}, "schedules.lr"),
    ({"schedules.lr": (0, 1e-3, 1e-3, 1, -1)}, "schedules.lr"),
    ({"dino.loss_form": "v3"}, "dino.loss_form"),
    ({"dino.koleo_loss_distributed": True, "dino.koleo_distributed_loss_group_size": 3},
     "dino.koleo_distributed_loss_group_size"),
])
def test_bad_dinov3_options_name_the_key(changes, key):
    config = tiny_config()
    for name, value in changes.items():
        section, field = name.split(".")
        config[section][field] = value
    with pytest.raises(configs.ConfigError, match=f"config error at {key}"):
        configs.validate(config, 1)


# ------------------------------------------------------------------ DINO form, weights, schedules


def _np_warmup_cosine_constant(start, peak, end, warmup, total, cosine):
    """`linear_warmup_cosine_decay` of dinov3/train/cosine_lr_scheduler.py, in numpy."""
    cosine = total - warmup if cosine is None else cosine
    cos = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 + end
    return np.concatenate([np.linspace(start, peak, warmup, endpoint=False), cos,
                           np.full((total - cosine - warmup,), end)])


def dinov3_form_config():
    config = tiny_config()
    config.dino.update(loss_form="dinov3", global_ignore_diagonal=False,
                       local_loss_weight_schedule=(1.0, 1.0, 0.25, 1, 3))
    config.schedules.update(version="dinov3", lr=(1e-4, 1e-3, 2e-4, 1, 2),
                            weight_decay=(0.04, 0.04, 0.2, 0, -1),
                            momentum=(0.9, 0.95, 0.99, 2, 2),
                            teacher_temp=(0.04, 0.07, 0.07, 1, 0))
    return config


def test_dinov3_schedules_are_dinov3s_arrays_with_its_lr_scaling():
    config = dinov3_form_config()
    s = schedules_lib.make_schedules(config)
    total, steps = 10, np.arange(10)
    factor = 4 * np.sqrt(4 / 1024)  # DINOv3's sqrt_wrt_1024 at batch 4
    # the blocks are in epochs of 2 steps
    expected = {
        "lr": _np_warmup_cosine_constant(1e-4 * factor, 1e-3 * factor, 2e-4 * factor, 2, total, 4),
        "weight_decay": _np_warmup_cosine_constant(0.04, 0.04, 0.2, 0, total, None),
        "momentum": _np_warmup_cosine_constant(0.9, 0.95, 0.99, 4, total, 4),
        "teacher_temp": _np_warmup_cosine_constant(0.04, 0.07, 0.07, 2, total, 0),
        "dino_local_weight": _np_warmup_cosine_constant(1.0, 1.0, 0.25, 2, total, 6)}
    for name, values in expected.items():
        np.testing.assert_allclose(jax.vmap(getattr(s, name))(steps), values, rtol=1e-6,
                                   err_msg=name)  # fp32 cosines of the float64 transcription
    np.testing.assert_allclose(jax.vmap(s.last_layer_lr)(steps), np.where(
        steps < 2, 0, expected["lr"]), rtol=1e-6)


def test_the_step_uses_the_dinov3_dino_form_weight_schedule_and_schedules():
    """loss_form dinov3 with same-view pairs: loss = local_scale * w_local(step) * local +
    global_scale * global + KoLeo + iBOT, with DINOv3's pair-count scales (4 global pairs, 4
    local pairs); the global term is the mean over all 4 pairs (dino_pairs_loss). The step's
    momentum and teacher temperature are the dinov3 schedules at its step, and its lr (the
    optimizer's own count) the dinov3 lr schedule."""
    config = dinov3_form_config()
    setup, step, state = build(config)
    state = {**state, "step": jnp.asarray(4, jnp.int32)}  # in the local weight's cosine
    batch = random_batch(config, np.random.randint(2**31))
    _, metrics = step(state, batch)
    weight = float(setup.schedules.dino_local_weight(4))
    assert 0.25 < weight < 1.0
    np.testing.assert_allclose(metrics["dino_local_loss_weight"], weight, rtol=1e-6)
    global_scale, local_scale = losses.dino_loss_scales(2, 2, ignore_diagonal=False)
    assert (global_scale, local_scale) == (0.5, 0.5)
    np.testing.assert_allclose(metrics["loss"], local_scale * weight
                               * metrics["dino_local_crops_loss"] + global_scale
                               * metrics["dino_global_crops_loss"] + rest_of_loss(metrics),
                               rtol=RTOL)
    for name in ("momentum", "teacher_temp"):
        np.testing.assert_allclose(metrics[name], getattr(setup.schedules, name)(4), rtol=1e-6)
    # the optimizer counts its own updates (0 here): its lr is the schedule's at its count
    np.testing.assert_allclose(metrics["lr"], setup.schedules.lr(0), rtol=1e-6)
    # the global term: the mean CE over all four (student, teacher) global pairs, diagonal in
    net, flat, unflat = setup.networks, step_lib._flatten_crops, step_lib._unflatten_crops
    student = net.backbone.apply({"params": state["student"]["backbone"]},
                                 [flat(batch["global_crops"]), flat(batch["local_crops"])],
                                 [flat(batch["masks"]), None], train=True,
                                 rngs={"dropout": jax.random.PRNGKey(0)})[0]
    logits = net.dino_head.apply({"params": state["student"]["dino_head"]},
                                 unflat(student["x_norm_clstoken"], 2))
    teacher = net.backbone.apply({"params": state["teacher"]["backbone"]},
                                 flat(batch["global_crops"]))["x_norm_clstoken"]
    probs = losses.softmax_center(net.dino_head.apply(
        {"params": state["teacher"]["dino_head"]}, unflat(teacher, 2)),
        state["centers"]["dino"], metrics["teacher_temp"])
    np.testing.assert_allclose(metrics["dino_global_crops_loss"],
                               losses.dino_pairs_loss(logits, probs), rtol=1e-4)


# ------------------------------------------------------------------ distributed KoLeo


KOLEO_STEP = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_dinov3_step import tiny_config, random_batch
    from dinov2_jax import configs, parallel
    from dinov2_jax.train import setup as setup_lib, step as step_lib

    config = tiny_config()
    config.train.batch_size = 16
    config.dino.update(koleo_loss_distributed=True, koleo_distributed_loss_group_size=4,
                       koleo_loss_weight=1.0)
    configs.validate(config, 8)
    mesh = parallel.make_mesh(config.mesh)
    setup = setup_lib.build(config, mesh)
    state = setup.create_state()
    batch = random_batch(config, int(sys.argv[1]), groups=8)
    shardings = parallel.batch_shardings(mesh, batch)
    sharded = jax.jit(step_lib.make_train_step(setup.networks, config, setup.optimizer,
                                               setup.schedules, mesh=mesh),
                      in_shardings=(setup.state_shardings, shardings))
    jaxpr = str(jax.make_jaxpr(step_lib.make_train_step(
        setup.networks, config, setup.optimizer, setup.schedules, mesh=mesh))(state, batch))
    single = jax.jit(step_lib.make_train_step(setup.networks, config, setup.optimizer,
                                              setup.schedules))
    a, b = sharded(state, batch)[1], single(jax.device_get(state), batch)[1]
    print("RESULTS" + json.dumps({"sharded": float(a["koleo_loss"]), "single": float(b["koleo_loss"]),
                                  "shard_map": "shard_map" in jaxpr and "all_gather" in jaxpr}))
""")


def test_distributed_koleo_runs_under_the_mesh_on_8_devices():
    """Groups of 4 images = 2 devices of 2: the step's KoLeo under shard_map on 8 fake CPU
    devices (all_gather inside) equals the same groups computed on one device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", KOLEO_STEP, str(np.random.randint(2**31))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULTS", 1)[1])
    assert results["shard_map"]
    # fp32; the two differ in reduction order only
    np.testing.assert_allclose(results["sharded"], results["single"], rtol=1e-5)
    assert results["sharded"] != 0


# ------------------------------------------------------------------ Gram crops in the pipeline


def test_gram_crops_are_the_global_boxes_at_twice_the_size():
    """crops.gram_teacher_crops_size: the Gram crops share the global crops' boxes; without
    distortions (and no colour jitter, grayscale or blur on crop 0) the Gram crop resized down
    is the global crop, and another draw's crop is not."""
    crops = configs.default_config().crops
    crops.update(global_crops_size=32, local_crops_size=16, local_crops_number=1,
                 gram_teacher_crops_size=64, gram_teacher_no_distortions=True,
                 color_jitter=(0.0, 0.0, 0.0, 0.0), grayscale_prob=0.0)
    spec = augment.MultiCropSpec.from_config(crops)
    image = np.uint8(np.random.RandomState(0).randint(0, 255, (48, 64, 3)))
    image = np.uint8(augment.gaussian_blur(image, 2.0))  # smooth: bicubic resizes then agree
    out = augment.multi_crop(image, np.random.default_rng(np.random.randint(2**31)), spec)
    assert out["gram_teacher_crops"].shape == (2, 64, 64, 3)
    assert out["global_crops"].shape == (2, 32, 32, 3)
    down = np.asarray(augment._resize(out["gram_teacher_crops"][0], 32), np.float32)
    same = np.abs(down - out["global_crops"][0]).mean()
    other = np.abs(down - out["global_crops"][1]).mean()
    assert same < 2.0 < other, (same, other)  # uint8 levels: rounding vs another crop
