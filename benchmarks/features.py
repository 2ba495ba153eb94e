"""Images/s of the jitted backbone forward (feature extraction) for the four hub archs.

Each row: a hub-shaped backbone (vits14, vitb14, vitl14, vitg14: random weights cast to the
compute dtype once, as a feature extractor holds them), one fixed random batch already on the
device, the jitted forward returning the normalised cls and patch tokens (the reference's
`forward_features`). Median and minimum of >= 20 timed calls after warm-up, each run to
completion. The reference column is the official code on one H100 80GB (hub backbones, bf16
autocast, PyTorch SDPA; issue 9): compare ratios only on that device.

  python benchmarks/features.py                       # 224 px batch 256, 518 px batch 64
  python benchmarks/features.py --attention=cudnn --archs=vitl14,vitg14
  python benchmarks/features.py --quick               # one-block models, small images (CPU)
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dinov2_jax.models import attention, vit  # noqa: E402
from text_table import table  # noqa: E402

ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")
SIZES = ((224, 256), (518, 64))  # (image size, batch) of the reference's measurement
# Reference images/s on one H100 80GB at (224, 256) and (518, 64).
REFERENCE = {("vits14", 224): 11812, ("vits14", 518): 2138, ("vitb14", 224): 5600,
             ("vitb14", 518): 978, ("vitl14", 224): 2050, ("vitl14", 518): 349,
             ("vitg14", 224): 621, ("vitg14", 518): 108}
QUICK_SIZES = ((28, 2), (56, 2))

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", list(ARCHS), "hub archs to time")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute and weight dtype")
flags.DEFINE_enum("attention", "auto", list(attention.BACKENDS), "attention backend")
flags.DEFINE_integer("steps", 20, "timed calls per row")
flags.DEFINE_integer("warmup", 2, "untimed calls first (the first one compiles)")
flags.DEFINE_bool("quick", False, "one-block models on small images, 3 timed calls: a smoke "
                  "run for CPU tests")


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
    """Seconds per call of the jitted forward on a (batch, size, size, 3) device batch."""

    @jax.jit
    def features(params, images):
        out = model.apply({"params": params}, images)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]

    images = jax.device_put(np.random.default_rng(0).standard_normal(
        (batch, size, size, 3), np.float32))
    for _ in range(warmup):
        jax.block_until_ready(features(params, images))
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(features(params, images))
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds)


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.archs) - set(ARCHS))
    if unknown:
        raise app.UsageError(f"--archs: unknown {unknown}; choose from {ARCHS}")
    if FLAGS.steps < 1 or FLAGS.warmup < 1:
        raise app.UsageError("--steps and --warmup must be at least 1")
    sizes, steps, depth = (QUICK_SIZES, 3, 1) if FLAGS.quick else (SIZES, FLAGS.steps, None)
    dtype = jnp.dtype(FLAGS.dtype)
    rows = []
    for arch in FLAGS.archs:
        model, params = extractor(arch, dtype, FLAGS.attention, depth)
        for size, batch in sizes:
            seconds = time_forward(model, params, size, batch, steps, FLAGS.warmup)
            median = float(np.median(seconds))
            reference = REFERENCE.get((arch, size))
            rows.append({
                "arch": arch + (f" (depth {depth})" if depth else ""),
                "size": size, "batch": batch,
                "median ms": f"{1e3 * median:.2f}", "min ms": f"{1e3 * seconds.min():.2f}",
                "img/s": f"{batch / median:.1f}",
                "ref img/s (H100)": reference or "n/a",
                "x ref": f"{batch / median / reference:.2f}" if reference else "n/a",
            })
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; {FLAGS.dtype}, attention {FLAGS.attention}; {steps} timed "
          f"calls after {FLAGS.warmup} warm-up")
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
