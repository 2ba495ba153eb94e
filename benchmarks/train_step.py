"""Times the real DINOv2 train step of a recipe and prints step time, img/s, MFU and memory.

The step is the training loop's own (`dinov2_jax/train/setup.py`): state born sharded on all
devices by the recipe's mesh rules, `jax.jit` with the state donated, one fixed random batch
(crops and iBOT masks, one mask group per device) placed on the devices once, as the
reference's measurement had its inputs on the GPU. Step times are the median and minimum of
>= 20 timed steps after warm-up, each timed to completion. MFU uses `dinov2_jax.flops` (model
FLOPs, drop path's skipped work excluded) and the device's peak (`--config.peak_flops`
overrides it). Memory: the device allocator's peak (the process's, so a later, larger batch
shows its own) and XLA's buffer assignment of the compiled step.

  python benchmarks/train_step.py --config=configs/vitl14.py --batch=32,64
  python benchmarks/train_step.py --config=configs/vitl14.py --batch=64 \
      --config.student.remat_policy=dots --config.student.attention=cudnn
  python benchmarks/train_step.py --config=configs/vitg14.py --batch=12 \
      --json_out=results.jsonl --profile_steps=25,27 --profile_dir=/tmp/profile

`--batch` takes several sizes, run one after another in this process (a size that fails,
e.g. out of memory, prints its error and the others still run). `--profile_steps=FIRST,LAST`
traces those steps (numbered from 1 over warm-up, then timed steps, then extra steps up to
LAST) into `--profile_dir/batch_B` and prints the top ops; pick FIRST after the timed steps to
keep the trace out of the timings. On CPU, `--config=FILE` runs `FILE:smoke` (the recipe
shrunk by `configs.smoke`), so the script itself is tested; `--config.*` overrides apply on top.
"""
import os
import random
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from dinov2_jax import cli, configs, flops, parallel, profiling
from dinov2_jax.data import masking
from dinov2_jax.train import setup as setup_lib
import results
from text_table import table


def define(flag_values):
    config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/vitl14.py",
                                    lock_config=True, flag_values=flag_values)
    flags.DEFINE_list("batch", ["32"], "images per device, one or more sizes "
                      "(train.batch_size = batch x devices)", flag_values=flag_values)
    flags.DEFINE_integer("steps", 20, "timed steps (at least 20 for the reported median)",
                         flag_values=flag_values)
    flags.DEFINE_integer("warmup", 3, "untimed steps first (the first one compiles)",
                         flag_values=flag_values)
    flags.DEFINE_string("json_out", "", "append one JSON line per batch size to this file",
                        flag_values=flag_values)
    flags.DEFINE_string("profile_steps", "", "FIRST,LAST: trace these steps (see the module "
                        "docstring)", flag_values=flag_values)
    flags.DEFINE_string("profile_dir", "", "where traces go, one folder per batch size",
                        flag_values=flag_values)


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


def build(config):
    """Born-sharded state, the on-device batch, the compiled donating step and its FLOPs."""
    setup = setup_lib.build(config, parallel.make_mesh(config.mesh))
    mask_groups = config.train.mask_groups or jax.local_device_count()
    host_batch = random_batch(config, config.train.batch_size // jax.process_count(),
                              mask_groups, config.train.seed)
    batch_shardings = parallel.batch_shardings(setup.mesh, host_batch)
    batch = parallel.global_batch(host_batch, batch_shardings)
    step_flops = setup.step_flops(host_batch["mask_indices"].size * jax.process_count())
    state = setup.create_state()
    start = time.perf_counter()
    compiled = setup.train_step(batch_shardings).lower(state, batch).compile()
    return (setup.networks.backbone, state, batch, compiled, step_flops,
            time.perf_counter() - start)


def time_steps(state, batch, train_step, steps, warmup, profiler):
    """Seconds of each timed step, every step run to completion. Steps are numbered from 1
    over warm-up and timed steps, then run on to the profiler's LAST step."""
    step, metrics = 0, None
    for _ in range(warmup):
        state, metrics = train_step(state, batch)
        step += 1
        profiler.after_step(step, (state, metrics))
    jax.block_until_ready((state, metrics))
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the step diverged on the random batch: loss {metrics['loss']}")
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
        step += 1
        profiler.after_step(step, (state, metrics))
    while profiler.steps and step < profiler.steps[1]:
        state, metrics = train_step(state, batch)
        step += 1
        profiler.after_step(step, (state, metrics))
    profiler.close((state, metrics))
    return np.asarray(seconds), float(metrics["loss"])


def measure(config, batch, flag_values, name):
    """The JSON row of one batch size per device."""
    devices = jax.device_count()
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch * devices
    configs.validate(config, devices)
    backbone, state, device_batch, train_step, step_flops, compile_s = build(config)
    profiler = profiling.StepProfiler(flag_values.profile_steps,
                                      os.path.join(flag_values.profile_dir, f"batch_{batch}"))
    seconds, loss = time_steps(state, device_batch, train_step, flag_values.steps,
                               flag_values.warmup, profiler)
    median = float(np.median(seconds))
    peak = flops.peak_flops_per_device(override=config.peak_flops)
    student = config.student
    row = {
        "benchmark": "train_step", "impl": "dinov2_jax", **results.device_facts(),
        "config": name, "batch": batch, "global_batch": config.train.batch_size,
        "model": (f"D{backbone.embed_dim} L{backbone.depth} p{backbone.patch_size} "
                  f"{backbone.ffn_layer}"),
        "dtype": student.dtype, "attention": student.attention,
        "pack_crops": student.pack_crops, "remat_policy": student.remat_policy,
        "overrides": {k: str(v) for k, v in sorted(
            config_flags.get_override_values(flag_values["config"]).items())},
        "steps": len(seconds), "warmup": flag_values.warmup, "compile_s": round(compile_s, 2),
        "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * float(seconds.min()),
        "images_per_s": config.train.batch_size / median,
        "images_per_s_per_device": batch / median,
        "flops_per_image": step_flops / config.train.batch_size,
        "mfu": step_flops / median / devices / peak if peak else None,
        "peak_mem_GiB": results.gib(results.peak_memory_bytes()),
        "step_mem_GiB": results.gib(results.compiled_peak_bytes(train_step)),
        "loss": loss,
    }
    if profiler.summary:
        row["profile"] = {"dir": str(profiler.directory),
                          "per_step_ms": profiler.summary["per_step_ms"],
                          "top_ops": profiler.summary["ops"][:10]}
        print(profiling.format_summary(profiler.summary))
    return row


def table_row(row):
    def gib(value):
        return "n/a" if value is None else f"{value:.2f}"
    return {
        "config": row["config"], "model": f"{row['model']} {row['dtype']}",
        "batch/device": row["batch"],
        "median ms": f"{row['step_ms_median']:.1f}", "min ms": f"{row['step_ms_min']:.1f}",
        "img/s": f"{row['images_per_s']:.1f}",
        "img/s/device": f"{row['images_per_s_per_device']:.1f}",
        "GFLOP/img": f"{row['flops_per_image'] / 1e9:.4g}",
        "MFU": "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
        "peak GiB": gib(row["peak_mem_GiB"]), "step GiB": gib(row["step_mem_GiB"]),
    }


def main(argv):
    flag_values = cli.parse(argv, define, __doc__)
    if flag_values.config is None:
        raise cli.ConfigError("--config is required (see --help)")
    if flag_values.steps < 1 or flag_values.warmup < 1:
        raise cli.ConfigError("--steps and --warmup must be at least 1")
    try:
        batches = [int(b) for b in flag_values.batch]
    except ValueError:
        raise cli.ConfigError(f"--batch: {flag_values.batch} are not integers") from None
    if not batches or min(batches) < 1:
        raise cli.ConfigError(f"--batch: {flag_values.batch}: sizes must be >= 1")
    if profiling.parse_steps(flag_values.profile_steps) and not flag_values.profile_dir:
        raise cli.ConfigError("--profile_steps needs --profile_dir")
    # "configs/vitl14.py:smoke" -> "vitl14:smoke"
    name = os.path.basename(config_flags.get_config_filename(flag_values["config"])).replace(
        ".py", "", 1)
    overrides = config_flags.get_override_values(flag_values["config"])
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}; {flag_values.steps} timed steps "
          f"after {flag_values.warmup} warm-up")
    if overrides:
        print("overrides: " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())))
    rows, failed = [], []
    for batch in batches:
        try:
            row = measure(flag_values.config, batch, flag_values, name)
        except cli.ConfigError:
            raise
        except Exception as error:  # e.g. out of memory: report it, measure the next size
            message = f"{type(error).__name__}: {error}"[:2000]
            print(f"batch {batch}: {message}", file=sys.stderr)
            row = {"benchmark": "train_step", "impl": "dinov2_jax", **results.device_facts(),
                   "config": name, "batch": batch, "error": message}
            failed.append(batch)
        results.append_rows(flag_values.json_out, [row])
        rows.append(row)
    measured = [table_row(row) for row in rows if "error" not in row]
    if measured:
        print(table(measured))
    if failed:
        raise SystemExit(f"failed batch sizes: {failed}")


def smoke_on_cpu(argv):
    """On CPU, `--config=FILE` becomes `--config=FILE:smoke` (before the flags are parsed, so
    that `--config.*` overrides apply to the smoke config)."""
    if jax.default_backend() != "cpu":
        return argv
    return [f"{arg}:smoke" if arg.startswith("--config=") and ":" not in arg else arg
            for arg in argv]


if __name__ == "__main__":
    cli.run(main, smoke_on_cpu(sys.argv))
