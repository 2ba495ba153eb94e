"""Images/s of the jitted backbone forward (feature extraction) for the four hub archs.

Each row: a hub-shaped backbone (vits14, vitb14, vitl14, vitg14: random weights cast to the
compute dtype once, as a feature extractor holds them), one fixed random batch already on the
device, the compiled forward returning the normalised cls and patch tokens (the reference's
`forward_features`). Median and minimum of >= 20 timed calls after warm-up, each run to
completion; MFU from `dinov2_jax.flops.backbone_flops`; memory from XLA's buffer assignment of
the compiled forward. The reference column is the official code on one H100 80GB (hub
backbones, bf16 autocast, PyTorch SDPA; issue 9): compare ratios only on that device.

  python benchmarks/features.py                       # 224 px batch 256, 518 px batch 64
  python benchmarks/features.py --attention=cudnn --archs=vitl14,vitg14 --json_out=r.jsonl
  python benchmarks/features.py --quick               # one-block models, small images (CPU)
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dinov2_jax import cli, flops
from dinov2_jax.models import attention, vit
import results
from text_table import table

ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")
SIZES = ("224:256", "518:64")  # SIZE:BATCH of the reference's measurement
# Reference images/s on one H100 80GB at (224, 256) and (518, 64).
REFERENCE = {("vits14", 224): 11812, ("vits14", 518): 2138, ("vitb14", 224): 5600,
             ("vitb14", 518): 978, ("vitl14", 224): 2050, ("vitl14", 518): 349,
             ("vitg14", 224): 621, ("vitg14", 518): 108}
QUICK_SIZES = ((28, 2), (56, 2))


def define(flag_values):
    flags.DEFINE_list("archs", list(ARCHS), "hub archs to time", flag_values=flag_values)
    flags.DEFINE_list("sizes", list(SIZES), "SIZE:BATCH pairs (image px, batch)",
                      flag_values=flag_values)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute and weight dtype",
                      flag_values=flag_values)
    flags.DEFINE_enum("attention", "auto", list(attention.BACKENDS), "attention backend",
                      flag_values=flag_values)
    flags.DEFINE_integer("steps", 20, "timed calls per row", flag_values=flag_values)
    flags.DEFINE_integer("warmup", 2, "untimed calls first", flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "one-block models on small images, 3 timed calls: a smoke "
                      "run for CPU tests", flag_values=flag_values)
    flags.DEFINE_float("peak_flops", 0.0, "device peak FLOP/s for MFU (0: dinov2_jax.flops' "
                       "table)", flag_values=flag_values)
    flags.DEFINE_string("json_out", "", "append one JSON line per row to this file",
                        flag_values=flag_values)


def parse_sizes(sizes):
    """["224:256", ...] -> [(224, 256), ...]; ConfigError naming a bad entry."""
    pairs = []
    for entry in sizes:
        size, _, batch = entry.partition(":")
        if not (size.isdigit() and batch.isdigit() and int(size) > 0 and int(batch) > 0):
            raise cli.ConfigError(f"--sizes: {entry!r} is not SIZE:BATCH (e.g. 224:256)")
        pairs.append((int(size), int(batch)))
    return pairs


def extractor(arch, dtype, backend, depth=None):
    """(model, params in `dtype`) of a hub arch with random weights."""
    overrides = {"dtype": dtype, "attention_backend": backend}
    if depth:
        overrides["depth"] = depth
    model = vit.build_backbone(arch, **overrides)
    patch = model.patch_size  # parameter shapes do not depend on the image: init on one patch
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1, patch, patch, 3)))["params"])(
        jax.random.PRNGKey(0))
    return model, jax.tree.map(lambda x: x.astype(dtype), params)


def time_forward(model, params, size, batch, steps, warmup):
    """(seconds per timed call, compiled peak bytes) of the forward on a device batch."""

    def features(params, images):
        out = model.apply({"params": params}, images)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]

    images = jax.device_put(np.random.default_rng(0).standard_normal(
        (batch, size, size, 3), np.float32))
    compiled = jax.jit(features).lower(params, images).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, images))
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, images))
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds), results.compiled_peak_bytes(compiled)


def measure(model, params, arch, size, batch, steps, warmup, depth, peak_flops=0.0):
    seconds, memory = time_forward(model, params, size, batch, steps, warmup)
    median = float(np.median(seconds))
    peak = flops.peak_flops_per_device(override=peak_flops)
    image_flops = flops.backbone_flops(model, size)
    return {
        "benchmark": "features", "impl": "dinov2_jax", **results.device_facts(),
        "config": arch + (f" (depth {depth})" if depth else ""), "arch": arch, "size": size,
        "batch": batch, "dtype": str(jnp.dtype(model.dtype)),
        "attention": model.attention_backend, "steps": len(seconds),
        "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * float(seconds.min()),
        "images_per_s": batch / median, "flops_per_image": image_flops,
        "mfu": image_flops * batch / median / peak if peak else None,
        "peak_mem_GiB": results.gib(memory), "memory": "compiled",
    }


def main(argv):
    flag_values = cli.parse(argv, define, __doc__)
    unknown = sorted(set(flag_values.archs) - set(ARCHS))
    if unknown:
        raise cli.ConfigError(f"--archs: unknown {unknown}; choose from {ARCHS}")
    if flag_values.steps < 1 or flag_values.warmup < 1:
        raise cli.ConfigError("--steps and --warmup must be at least 1")
    if flag_values.quick:
        sizes, steps, depth = QUICK_SIZES, 3, 1
    else:
        sizes, steps, depth = parse_sizes(flag_values.sizes), flag_values.steps, None
    dtype = jnp.dtype(flag_values.dtype)
    rows, failed = [], []
    for arch in flag_values.archs:
        model, params = extractor(arch, dtype, flag_values.attention, depth)
        for size, batch in sizes:
            try:
                row = measure(model, params, arch, size, batch, steps, flag_values.warmup,
                              depth, flag_values.peak_flops)
            except Exception as error:  # e.g. out of memory: report it, time the next row
                message = f"{type(error).__name__}: {error}"[:2000]
                print(f"{arch} {size} px batch {batch}: {message}", file=sys.stderr)
                row = {"benchmark": "features", "impl": "dinov2_jax",
                       **results.device_facts(), "config": arch, "arch": arch, "size": size,
                       "batch": batch, "error": message}
                failed.append((arch, size))
            results.append_rows(flag_values.json_out, [row])
            rows.append(row)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; {flag_values.dtype}, attention {flag_values.attention}; {steps} "
          f"timed calls after {flag_values.warmup} warm-up")
    printed = []
    for row in rows:
        if "error" in row:
            continue
        reference = REFERENCE.get((row["arch"], row["size"]))
        printed.append({
            "arch": row["config"], "size": row["size"], "batch": row["batch"],
            "median ms": f"{row['step_ms_median']:.2f}", "min ms": f"{row['step_ms_min']:.2f}",
            "img/s": f"{row['images_per_s']:.1f}",
            "MFU": "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
            "GiB": "n/a" if row["peak_mem_GiB"] is None else f"{row['peak_mem_GiB']:.2f}",
            "ref img/s (H100)": reference or "n/a",
            "x ref": f"{row['images_per_s'] / reference:.2f}" if reference else "n/a",
        })
    if printed:
        print(table(printed))
    if failed:
        raise SystemExit(f"failed rows: {failed}")


if __name__ == "__main__":
    cli.run(main)
