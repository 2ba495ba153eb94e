"""Times the real DINOv2 train step of a recipe and prints step time, img/s, MFU and memory.

The step is the training loop's own: state born sharded on all devices by the recipe's mesh
rules, `jax.jit` with the state donated, one fixed random batch (crops and iBOT masks, one
mask group per device) placed on the devices once, as the reference's measurement had its
inputs on the GPU. Step times are the median and minimum of >= 20 timed steps after warm-up,
each timed to completion. MFU uses `dinov2_jax.flops` (model FLOPs, drop path's skipped work
excluded) and the device's peak (`--config.peak_flops` overrides it).

  python benchmarks/train_step.py --config=configs/vitl14.py --batch=32
  python benchmarks/train_step.py --config=configs/vitl14.py --batch=64 \
      --config.student.remat_policy=dots --config.student.attention=cudnn
  python benchmarks/train_step.py --config=configs/vitg14.py --batch=12 \
      --config.student.dtype=float32

On CPU, `--config=FILE` runs `FILE:smoke` (the recipe shrunk by `configs.smoke`), so the
script itself is tested; `--config.*` overrides apply on top of it.
"""
import os
import random
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dinov2_jax import configs, flops, parallel
from dinov2_jax.data import masking
from dinov2_jax.train import setup as setup_lib
from text_table import table

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/vitl14.py",
                                lock_config=True)
flags.DEFINE_integer("batch", 32, "images per device (train.batch_size = batch x devices)")
flags.DEFINE_integer("steps", 20, "timed steps (at least 20 for the reported median)")
flags.DEFINE_integer("warmup", 3, "untimed steps first (the first one compiles)")
flags.mark_flag_as_required("config")


def random_batch(config, batch_size, mask_groups, seed):
    """A host batch in the training layout: normal crops, iBOT masks per mask group."""
    mask_rng, normal = random.Random(seed), np.random.default_rng(seed).standard_normal
    crops, patch = config.crops, config.student.patch_size
    grid = crops.global_crops_size // patch
    group = batch_size // mask_groups
    ratio, probability = config.ibot.mask_ratio_min_max, config.ibot.mask_sample_probability
    generator = masking.make_mask_generator(crops.global_crops_size, patch)
    upperbound = masking.mask_upperbound(2 * group, grid * grid, ratio, probability)
    masks, indices, weights = [], [], []
    for _ in range(mask_groups):
        group_masks = masking.sample_masks(2 * group, grid * grid, ratio, probability, generator,
                                           mask_rng)
        masks.append(group_masks.reshape(2, group, -1))
        group_indices, group_weights = masking.padded_mask_indices(group_masks, upperbound)
        indices.append(group_indices)
        weights.append(group_weights)
    return {
        "global_crops": normal((2, batch_size, crops.global_crops_size,
                                crops.global_crops_size, 3), np.float32),
        "local_crops": normal((crops.local_crops_number, batch_size, crops.local_crops_size,
                               crops.local_crops_size, 3), np.float32),
        "masks": np.concatenate(masks, axis=1),
        "mask_indices": np.stack(indices),
        "masks_weight": np.stack(weights),
    }


def peak_memory_bytes():
    """The largest peak_bytes_in_use over local devices; None where not reported (CPU)."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use")
             for device in jax.local_devices()]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) if peaks else None


def build(config):
    """Born-sharded state, the on-device batch and the jitted, donating train step."""
    setup = setup_lib.build(config, parallel.make_mesh(config.mesh))
    mask_groups = config.train.mask_groups or jax.local_device_count()
    host_batch = random_batch(config, config.train.batch_size // jax.process_count(),
                              mask_groups, config.train.seed)
    batch_shardings = parallel.batch_shardings(setup.mesh, host_batch)
    batch = parallel.global_batch(host_batch, batch_shardings)
    step_flops = setup.step_flops(host_batch["mask_indices"].size * jax.process_count())
    return (setup.networks.backbone, setup.create_state(), batch,
            setup.train_step(batch_shardings), step_flops)


def time_steps(state, batch, train_step, steps, warmup):
    """Seconds of each timed step, every step run to completion."""
    for _ in range(warmup):
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the step diverged on the random batch: loss {metrics['loss']}")
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def main(argv):
    del argv
    if FLAGS.steps < 1 or FLAGS.warmup < 1:
        raise app.UsageError("--steps and --warmup must be at least 1")
    config = FLAGS.config
    devices = jax.device_count()
    with config.unlocked():
        config.train.batch_size = FLAGS.batch * devices
    configs.validate(config, devices)
    backbone, state, batch, train_step, step_flops = build(config)
    seconds = time_steps(state, batch, train_step, FLAGS.steps, FLAGS.warmup)
    median, fastest = float(np.median(seconds)), float(seconds.min())
    peak = flops.peak_flops_per_device(override=config.peak_flops)
    memory = peak_memory_bytes()
    name = config_flags.get_config_filename(FLAGS["config"])
    overrides = config_flags.get_override_values(FLAGS["config"])
    print(f"device: {devices} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}; {FLAGS.steps} timed steps after {FLAGS.warmup} warm-up")
    if overrides:
        print("overrides: " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())))
    print(table([{
        "config": os.path.basename(name),
        "model": (f"D{backbone.embed_dim} L{backbone.depth} p{backbone.patch_size} "
                  f"{backbone.ffn_layer} {config.student.dtype}"),
        "batch/device": FLAGS.batch,
        "median ms": f"{1e3 * median:.1f}",
        "min ms": f"{1e3 * fastest:.1f}",
        "img/s": f"{config.train.batch_size / median:.1f}",
        "img/s/device": f"{FLAGS.batch / median:.1f}",
        "GFLOP/img": f"{step_flops / config.train.batch_size / 1e9:.4g}",
        "MFU": f"{100 * step_flops / median / devices / peak:.1f}%" if peak else "n/a",
        "peak GiB": f"{memory / 2**30:.2f}" if memory is not None else "n/a",
    }]))


def smoke_on_cpu(argv):
    """On CPU, `--config=FILE` becomes `--config=FILE:smoke` (before the flags are parsed, so
    that `--config.*` overrides apply to the smoke config)."""
    if jax.default_backend() != "cpu":
        return argv
    return [f"{arg}:smoke" if arg.startswith("--config=") and ":" not in arg else arg
            for arg in argv]


if __name__ == "__main__":
    app.run(main, argv=smoke_on_cpu(sys.argv))
